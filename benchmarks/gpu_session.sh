#!/bin/bash
# The device calls for the open GPU work (issues 9 and 10), at most 9.5 minutes:
#   run(command="bash benchmarks/gpu_session.sh", timeout_s=590)
# or in two calls, so that a failure in the first can be mended before the second:
#   run(command="bash benchmarks/gpu_session.sh checks", timeout_s=375)   # 6 minutes
#   run(command="bash benchmarks/gpu_session.sh issue10", timeout_s=300)  # 5 minutes
# "checks" runs the attention script and gpu_check.py; "issue10" runs bench.py.
# "tune" (5.5 minutes, timeout_s=360) times each attention kernel alone under the tile
# candidates of gpu_attention_check.TUNE_*, checked against the default tiles.
# Each step has its own time limit (570 s in all; a last, optional one runs only in
# what is left, to 575 s) and writes its results as it goes, so a failure or a
# cut-off keeps what came before. Results land in $OUT
# (or benchmarks/results): gpu_attention_check.json, gpu-issue10.json,
# gpu-small-steps.json (if time is left), logs.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# The device image's JAX lives in the interpreter that a plain `python3` runs.
PY=${PYTHON:-python3}
PART=${1:-all}
case "$PART" in all|checks|issue10|tune) ;; *) echo "unknown part '$PART': all, checks, issue10 or tune" >&2; exit 2;; esac
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
timeout 30 "$PY" -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"

if [ "$PART" = tune ]; then
  timeout 320 "$PY" benchmarks/gpu_attention_check.py --sections tune --budget-s 280 --total-s 310 \
    --section-timeout-s 310 --out "$OUT" 2>&1 | tee "$OUT/tune.log"
  exit $?
fi
if [ "$PART" != issue10 ]; then
# Issue 9: attention kernels, checks then timings; optional items start only
# within the budget, and a section still running at --total-s is killed.
timeout 305 "$PY" benchmarks/gpu_attention_check.py --budget-s 190 --total-s 290 --out "$OUT" \
  2>&1 | tee "$OUT/attention.log" || status=1

# Issue 10: masks equal jax.random.bits on the device, then the elementwise and
# train-step numbers at the issue's shapes (2^28 elements; 3 x Dense 4096, batch
# 8192; a bf16 transformer step, 2 blocks, batch 16, T 1024, width 1024, 16 heads).
timeout 45 "$PY" benchmarks/gpu_check.py 2>&1 | tee "$OUT/gpu_check.log" || status=1
fi
[ "$PART" = checks ] && exit $status
# Both parts in one call start bench.py at about 350 s; alone, at about 10 s.
start=$SECONDS
timeout 190 "$PY" benchmarks/bench.py --platform gpu --log2-sizes 28 --rates 0.1 \
  --mlp-inputs 4096 --mlp-widths 4096 4096 4096 --mlp-batch 8192 --block-shape 16 1024 1024 16 \
  --json "$OUT/gpu-issue10.json" 2>&1 | tee "$OUT/bench.log" || status=1

# In whatever time is left (bench.py saves after each part): its small default MLP
# step (784-1024-1024-10, batch 256) and transformer step, where kernel launches
# rather than bytes set the time; the elementwise part before them is cut to one
# small size and dtype. Its log goes on the end of bench.log.
left=$((575 - SECONDS))
[ "$PART" = issue10 ] && left=$((285 - (SECONDS - start)))
if [ "$left" -gt 45 ]; then
  timeout "$left" "$PY" benchmarks/bench.py --platform gpu --log2-sizes 16 --dtypes float32 \
    --rates 0.1 --json "$OUT/gpu-small-steps.json" 2>&1 | tee -a "$OUT/bench.log" || status=1
fi
exit $status
