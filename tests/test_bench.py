"""The device call's issue 10 half (gpu_session.sh) runs on CPU: gpu_check.py and bench.py.

``bench.py --platform gpu`` has Pallas kernel rows and GPU targets that run
nowhere else, so ``--smoke`` runs them here at toy shapes, the kernel in the
Pallas interpreter, as gpu_attention_check.py's smoke test does for the
attention half. The times of a smoke run mean nothing; only that every row and
target is there.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench():
  sys.path.insert(0, str(BENCHMARKS))
  try:
    import bench as module  # benchmarks/ is a folder of scripts, not a package
  finally:
    sys.path.remove(str(BENCHMARKS))
  return module


def test_smoke_run_has_every_gpu_row_and_target(bench, tmp_path):
  pallas = bench.PALLAS_FAST
  out = tmp_path / "smoke.json"
  done = subprocess.run(
      [sys.executable, str(BENCHMARKS / "bench.py"), "--smoke", "--json", str(out)],
      capture_output=True, text=True, timeout=240, check=False,
  )
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  results = json.loads(out.read_text())

  rows = {(r["variant"], r["dtype"], r["mode"]) for r in results["elementwise"]}
  for dtype in ("float32", "bfloat16"):
    for mode in ("fwd", "fwd+bwd"):
      assert (pallas, dtype, mode) in rows
  for step in ("train_step", "block_step"):
    assert pallas in results[step]["memory"] and pallas in results[step]["time"]

  targets = [t["target"] for t in results["targets"]]
  issue10 = [t for t in targets if t.startswith("issue 10, ")]
  # Three against flax, two floors for each fast mode in two dtypes, three of the step.
  assert len(issue10) == 3 + 2 * 2 + 3, issue10
  assert any(pallas in t for t in issue10)
  assert any("remat policy, MLP step temp bytes" in t for t in issue10)


def test_gpu_check_passes_on_cpu():
  done = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py")],
                        capture_output=True, text=True, timeout=120, check=False)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  assert done.stdout.count("bits identical to jax.random.bits") == 5
  assert "gradient mask matches the forward mask" in done.stdout


@pytest.mark.parametrize("backend, expected", [("gpu", True), ("cpu", False)])
def test_gpu_rows_follow_the_backend_unless_set(bench, monkeypatch, backend, expected):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  cfg = bench.Config()
  assert bench.gpu_rows(cfg) is expected
  for rows in (bench.variants(0.1, cfg), bench.train_models(cfg), bench.block_models(cfg)):
    assert (bench.PALLAS_FAST in rows) is expected
  for forced in (True, False):
    assert bench.gpu_rows(bench.Config(gpu_rows=forced)) is forced
