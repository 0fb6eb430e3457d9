#!/bin/bash
# Everything that needs an NVIDIA GPU, in one call: the gpu-marked tests, then the timings.
#
#   bash benchmarks/run_gpu.sh
#
# Each step runs whatever the steps before it did; a step that fails is named
# and the script goes on with the next, and exits 1 at the end. The headline
# numbers come first and the timing scripts write their JSON as they go, so a
# run cut short keeps what it measured: into $OUT when it is set (a device
# machine's output folder), else into benchmarks/results/, with a log per step:
#   gpu-tests.log                     python -m pytest -m gpu tests/
#   bench-gpu.json                    bench.py: elementwise at 2^28; the MLP step
#                                     (3 x Dense 4096, batch 8192) and the transformer step
#   bench_attention-gpu.json          bench_attention.py: B 8, N 16, T = S = 2048, H 64, bf16
#   tune_attention-gpu.json           tune_attention.py: each attention kernel alone
#   bench_attention_causal-gpu.json   bench_attention.py, causal, T = S = 4096
# The tile candidates are a longer run of their own:
#   python benchmarks/tune_attention.py --tiles
# Render any of the files with `python benchmarks/report.py FILE`.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # jaxdrop from this checkout
PY=${PYTHON:-python3}  # a device image's JAX lives in the interpreter `python3` runs
failed=()

step() {  # step NAME COMMAND...: runs COMMAND, its output also in $OUT/NAME.log
  local name=$1
  shift
  echo "== $name: $*"
  "$@" 2>&1 | tee "$OUT/$name.log"
  local status=${PIPESTATUS[0]}
  if [ "$status" -eq 0 ]; then
    echo "== $name: ok"
  else
    echo "== $name: FAILED (exit status $status)"
    failed+=("$name")
  fi
}

step device nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
# One process: xdist workers would each take most of the GPU's memory.
step gpu-tests "$PY" -m pytest -m gpu -n 0 -p no:cacheprovider tests/
step bench "$PY" benchmarks/bench.py --platform gpu --log2-sizes 28 --rates 0.1 \
  --mlp-inputs 4096 --mlp-widths 4096 4096 4096 --mlp-batch 8192 --block-shape 16 1024 1024 16 \
  --json "$OUT/bench-gpu.json"
step bench_attention "$PY" benchmarks/bench_attention.py --platform gpu \
  --json "$OUT/bench_attention-gpu.json"
step tune_attention "$PY" benchmarks/tune_attention.py --json "$OUT/tune_attention-gpu.json"
step bench_attention_causal "$PY" benchmarks/bench_attention.py --platform gpu --causal \
  --length 4096 --no-block --json "$OUT/bench_attention_causal-gpu.json"

if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}"
  exit 1
fi
echo "every step ran"
