"""The prepared GPU script runs end to end on CPU (--smoke: tiny shapes, Pallas interpreter).

The one device call a session gets depends on it, so it must not rot: each
section runs in its own process and the parent merges what they write.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_attention_check.py"


def test_smoke_run_passes_its_checks_and_records_the_table(tmp_path):
  # --budget-s 0 skips the optional sections (causal, long), which then leave notes.
  done = subprocess.run(
      [sys.executable, str(SCRIPT), "--smoke", "--no-sweep", "--budget-s", "0",
       "--out", str(tmp_path)],
      capture_output=True, text=True, timeout=240, check=False,
  )
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  results = json.loads((tmp_path / "gpu_attention_check_smoke.json").read_text())
  failed = [c for c in results["checks"] if not c["ok"]]
  assert not failed, failed
  names = " ".join(c["name"] for c in results["checks"])
  assert "(a) mask bits == attention_keep_mask, shared=False" in names
  assert "(b) small: bf16 causal GQA padding-mask dropout" in names
  assert "(b) small: bf16 padding-mask dropout H=24 (padded)" in names
  assert "(b) benchmark shape: pallas == xla, rate=0.1" in names
  labels = {(t["label"], t["rate"], t["mode"]) for t in results["timings"]}
  assert ("jaxdrop pallas", 0.1, "fwd+bwd") in labels
  assert ("jaxdrop xla", 0.1, "fwd") in labels
  assert any("skipped the long sequence" in note for note in results["notes"])
  profiled = {(r["kernel"], r["rate"]) for r in results["profile"]}
  assert profiled == {(k, r) for k in ("forward", "dq", "dk/dv") for r in (0.0, 0.1)}
  assert not list(tmp_path.glob("*.part.json"))  # merged and removed


def test_smoke_tune_times_each_kernel_under_each_candidate(tmp_path):
  done = subprocess.run(
      [sys.executable, str(SCRIPT), "--smoke", "--sections", "tune", "--out", str(tmp_path)],
      capture_output=True, text=True, timeout=240, check=False,
  )
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  results = json.loads((tmp_path / "gpu_attention_check_smoke.json").read_text())
  failed = [c for c in results["checks"] if not c["ok"]]
  assert not failed, failed
  assert not results["timings"] and not results["profile"]  # only the section asked for
  timed = {(r["kernel"], r["label"], r["rate"]) for r in results["tune"]}
  # Two forward and two backward candidates (shrunk to 16 x 16 tiles), at rate 0.1.
  assert len({label for kernel, label, _ in timed if kernel == "forward"}) == 2
  assert len({label for kernel, label, _ in timed if kernel == "dk/dv"}) == 2
  assert {kernel for kernel, _, _ in timed} == {"forward", "dq", "dk/dv"}
  assert {rate for _, _, rate in timed} == {0.1}
  assert "| forward |" in results["tune_markdown"]
