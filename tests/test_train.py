"""Tests of train.py on a small slice of MNIST-1D: files and schema,
determinism, kill-and-resume, NaN handling and 8 simulated devices."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import run_with_devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train  # noqa: E402

# A few steps on a slice: two runs (rate 0 and 0.5), evaluations and
# checkpoints every 20 steps, MC dropout with 4 passes.
SMALL = [
    "--steps", "60", "--batch-size", "32", "--train-size", "256",
    "--test-size", "128", "--eval-every", "20", "--checkpoint-every", "20",
    "--mc-samples", "4", "--no-progress",
]


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def read_results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
  """The small config, run once in this process; other tests compare with it."""
  workdir = str(tmp_path_factory.mktemp("small"))
  results = train.main([*SMALL, "--workdir", workdir])
  return workdir, results


def test_files_and_schema(small_run):
  workdir, results = small_run
  for name in ("metrics.jsonl", "results.json", "accuracy.png", "config.json", "table.txt"):
    assert os.path.exists(os.path.join(workdir, name)), name
  for run in ("rate0-seed0", "rate0.5-seed0"):
    steps = os.listdir(os.path.join(workdir, "checkpoints", run))
    assert "60" in steps and "40" in steps, steps  # max_to_keep=2
  assert read_results(workdir) == json.loads(json.dumps(results))

  assert results["dataset"] == "mnist1d"
  assert results["model"] == "cnn"
  assert results["steps"] == 60 and results["devices"] == 1
  assert isinstance(results["seconds"], float) and results["seconds"] > 0
  assert [(r["rate"], r["seed"]) for r in results["runs"]] == [(0.0, 0), (0.5, 0)]
  for run in results["runs"]:
    for key in ("train_acc", "test_acc", "test_ece"):
      assert 0.0 <= run[key] <= 1.0, (key, run[key])
    assert run["test_nll"] > 0
    assert set(run["keep_fraction"]) == {"features"}
    if run["rate"] == 0:
      assert run["mc"] is None
      assert run["keep_fraction"]["features"] == 1.0
    else:
      assert set(run["mc"]) == {"samples", "test_acc", "test_nll", "test_ece"}
      assert run["mc"]["samples"] == 4
      assert 0.0 <= run["mc"]["test_acc"] <= 1.0
      assert abs(run["keep_fraction"]["features"] - 0.5) < 0.01
      assert run["keep_check"]["features"]["sigmas"] <= 4.0

  rows = read_metrics(workdir)
  assert [(r["rate"], r["step"]) for r in rows] == [
      (rate, step) for rate in (0.0, 0.5) for step in (20, 40, 60)
  ]
  assert rows[-1]["test_acc"] == results["runs"][-1]["test_acc"]


def test_same_command_twice_gives_identical_metrics(small_run, tmp_path):
  workdir, results = small_run
  again = train.main([*SMALL, "--workdir", str(tmp_path)])
  assert again["runs"] == results["runs"]
  assert read_metrics(str(tmp_path)) == read_metrics(workdir)


def test_kill_and_resume_matches_uninterrupted_run(small_run, tmp_path, capsys):
  workdir, results = small_run
  resumed_dir = str(tmp_path / "killed")
  script = os.path.join(ROOT, "train.py")
  command = [sys.executable, "-W", "error", script, *SMALL, "--workdir", resumed_dir]
  process = subprocess.Popen(
      command, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
  )
  first = os.path.join(resumed_dir, "checkpoints", "rate0-seed0", "20")
  deadline = time.monotonic() + 120
  while not os.path.isdir(first) and process.poll() is None and time.monotonic() < deadline:
    time.sleep(0.01)
  alive = process.poll() is None
  process.send_signal(signal.SIGKILL)
  output = process.communicate()[0].decode()
  assert alive, f"the run ended before it could be killed:\n{output}"
  assert not os.path.exists(os.path.join(resumed_dir, "results.json"))

  # The same command plus --resume (here in this process: only the files carry over).
  resumed = train.main([*SMALL, "--workdir", resumed_dir, "--resume"])
  stdout = capsys.readouterr().out
  assert "resumed from step " in stdout, stdout
  step = int(stdout.split("resumed from step ")[1].split()[0])
  assert 20 <= step <= 60
  assert resumed["runs"] == results["runs"]
  assert read_results(resumed_dir)["runs"] == results["runs"]
  assert read_metrics(resumed_dir) == read_metrics(workdir)


def test_sweep_with_seeds_and_early_dropout(tmp_path):
  results = train.main([
      *SMALL, "--model", "mlp", "--sweep", "0.2,0.5", "--seeds", "2", "--steps", "20",
      "--rate-schedule", "early", "--mc-samples", "0", "--workdir", str(tmp_path),
  ])
  runs = [(r["rate"], r["seed"]) for r in results["runs"]]
  assert runs == [(rate, seed) for rate in (0.0, 0.2, 0.5) for seed in (0, 1)]
  assert all(r["mc"] is None for r in results["runs"])
  assert set(results["runs"][0]["keep_fraction"]) == {"hidden1", "hidden2"}
  # Early dropout: only the first 10 of the 20 steps count (32 examples × 512 units at most).
  assert all(0 < c["n"] <= 10 * 32 * 512 for r in results["runs"] for c in r["keep_check"].values())
  assert os.path.exists(tmp_path / "sweep.png")
  table = (tmp_path / "table.txt").read_text()
  assert "±" in table and "dropout 0.5" in table


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  with pytest.raises(train.NonFiniteError, match="step 2:"):
    train.main([
        *SMALL, "--rate", "0", "--lr", "1e30", "--checkpoint-every", "1",
        "--workdir", str(tmp_path),
    ])
  assert os.listdir(tmp_path / "checkpoints" / "rate0-seed0") == ["1"]


def test_data_restores_global_random_state():
  np.random.seed(123)
  random.seed(123)
  expected = np.random.rand(), random.random()
  np.random.seed(123)
  random.seed(123)
  data = train.generate_mnist1d()
  assert (np.random.rand(), random.random()) == expected
  assert data["x_train"].shape == (4000, 40) and data["x_test"].shape == (1000, 40)
  assert set(np.unique(data["y_test"])) == set(range(10))


def test_batches_depend_on_the_step_only():
  a = [train.batch_indices(0, step, 32, 100) for step in range(10)]
  train.epoch_order.cache_clear()
  b = [train.batch_indices(0, step, 32, 100) for step in reversed(range(10))][::-1]
  np.testing.assert_array_equal(np.stack(a), np.stack(b))
  # Each epoch is a permutation: 100 consecutive positions cover every example once.
  flat = np.concatenate(a)
  assert sorted(flat[:100]) == list(range(100))


def test_help_lists_the_flags(capsys):
  with pytest.raises(SystemExit):
    train.main(["--help"])
  text = capsys.readouterr().out
  for flag in (
      "--model", "--rate", "--sweep", "--seeds", "--steps", "--batch-size", "--lr",
      "--seed", "--mc-samples", "--rate-schedule", "--eval-every",
      "--checkpoint-every", "--workdir", "--resume", "--devices",
  ):
    assert flag in text, flag


def test_eight_devices_match_one(small_run, tmp_path):
  _, one = small_run
  out = run_with_devices(
      f"""
      import json, sys
      sys.path.insert(0, {ROOT!r})
      import jax, train
      assert len(jax.devices()) == 8
      results = train.main({SMALL!r} + ["--devices", "8", "--workdir", {str(tmp_path)!r}])
      print("RESULTS" + json.dumps(results))
      """,
      devices=8,
  )
  eight = json.loads(out.split("RESULTS")[1])
  assert eight["devices"] == 8
  for a, b in zip(one["runs"], eight["runs"], strict=True):
    assert (a["rate"], a["seed"]) == (b["rate"], b["seed"])
    # The masks do not depend on the device count; only float reduction order does.
    for key in ("train_acc", "test_acc"):
      assert abs(a[key] - b[key]) <= 2 / 128, (key, a[key], b[key])
    np.testing.assert_allclose(b["test_nll"], a["test_nll"], rtol=1e-3)
    np.testing.assert_allclose(
        b["keep_fraction"]["features"], a["keep_fraction"]["features"], atol=1e-3
    )
