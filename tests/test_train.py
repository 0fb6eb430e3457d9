"""Tests of train.py on a small slice of MNIST-1D: files and schema, determinism,
flag errors, kill / Ctrl-C and --resume (with damaged checkpoints), NaN
handling and 8 simulated devices.

One uninterrupted run (`small_run`) and one run stopped by Ctrl-C
(`interrupted_run`) are made once per module; the other tests compare with
them or copy them, so most tests only train a few steps or none.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import errno
import glob
import io
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_with_devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train  # noqa: E402
from train_lib import checkpoints, cli, data, models, workdir  # noqa: E402

# Two runs (rate 0 and 0.5) of 40 steps on a slice, a tiny CNN, evaluations
# every 10 steps, checkpoints every 20, MC dropout with 4 passes.
SMALL = [
    "--steps", "40", "--batch-size", "32", "--train-size", "128", "--test-size", "128",
    "--width", "8", "--eval-every", "10", "--checkpoint-every", "20", "--mc-samples", "4",
    "--no-progress",
]
# interrupted_run gets its SIGINT during the evaluation at step 30 of its rate-0.5 run
# (no checkpoint is due there), and stops after the next step, saving it.
STOP_AT = 31
RUN = "rate0.5-seed0"


def read_metrics(directory):
  with open(os.path.join(directory, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def strict_load(path):
  """json.load that refuses NaN and Infinity, as a strict JSON parser would."""
  def refuse(constant):
    raise ValueError(f"{path}: {constant} is not JSON")
  with open(path) as f:
    return json.load(f, parse_constant=refuse)


def interrupt_during_evaluation(step, rate):
  """Patches the evaluation to deliver SIGINT when it evaluates the run at `rate` at `step`."""
  real = train.evaluation.evaluate

  def evaluate(state, data):
    if float(state.rate) == rate and int(state.step) == step:
      signal.raise_signal(signal.SIGINT)
    return real(state, data)

  patch = pytest.MonkeyPatch()
  patch.setattr(train.evaluation, "evaluate", evaluate)
  return patch


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
  """The small config, run once in this process."""
  directory = str(tmp_path_factory.mktemp("small"))
  return directory, train.main([*SMALL, "--workdir", directory])


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
  """The small config on the command line, stopped by a SIGINT delivered to this
  process (see STOP_AT). Returns (workdir, exit status, stderr)."""
  directory = str(tmp_path_factory.mktemp("interrupted"))
  patch, stderr = interrupt_during_evaluation(STOP_AT - 1, 0.5), io.StringIO()
  try:
    with contextlib.redirect_stderr(stderr):
      code = train.run([*SMALL, "--workdir", directory])
  finally:
    patch.undo()
  return directory, code, stderr.getvalue()


def start_and_signal(cwd, signum, after):
  """Runs `train.py SMALL` in `cwd` as a newcomer would, with the default workdir
  (a relative ``runs/cnn-<stamp>``), and sends `signum` once checkpoint `after`
  exists. Returns (exit status, stderr, the workdir)."""
  os.makedirs(cwd)
  process = subprocess.Popen(
      [sys.executable, "-W", "error", os.path.join(ROOT, "train.py"), *SMALL],
      cwd=cwd, env=dict(os.environ, JAX_PLATFORMS="cpu"),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
  )
  pattern = os.path.join(cwd, workdir.RUNS, "*", "checkpoints", after)
  deadline = time.monotonic() + 240
  while not glob.glob(pattern) and process.poll() is None and time.monotonic() < deadline:
    time.sleep(0.005)
  alive = process.poll() is None
  process.send_signal(signum)
  out, err = process.communicate(timeout=240)
  assert alive, f"the run ended before the signal:\n{out}\n{err}"
  (run,) = glob.glob(os.path.join(cwd, workdir.RUNS, "*"))
  return process.returncode, err, run


def run_on_eight_devices(directory):
  out = run_with_devices(
      f"""
      import json, sys
      sys.path.insert(0, {ROOT!r})
      import jax, train
      assert len(jax.devices()) == 8
      flags = ["--devices", "8", "--mc-samples", "0", "--workdir", {directory!r}]
      print("RESULTS" + json.dumps(train.main({SMALL!r} + flags)))
      """,
      devices=8,
  )
  return json.loads(out.split("RESULTS")[1])


# The runs that need a process of their own, and the tests that wait for them.
BACKGROUND = {
    "test_kill_and_resume_matches_uninterrupted_run": "killed",
    "test_eight_devices_match_one": "devices",
}


@pytest.fixture(scope="module", autouse=True)
def background(request, tmp_path_factory):
  """Starts the runs of BACKGROUND that this session will test, with the module, in
  threads: they use the second core while the in-process tests run. A test calls
  ``.result()`` on its job's future."""
  base = tmp_path_factory.mktemp("background")
  wanted = {BACKGROUND[item.name] for item in request.session.items if item.name in BACKGROUND}
  jobs = {
      "killed": (start_and_signal, str(base / "killed"), signal.SIGKILL, "rate0-seed0/20"),
      "devices": (run_on_eight_devices, str(base / "devices")),
  }
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    yield {name: (pool.submit(*job), job[1]) for name, job in jobs.items() if name in wanted}


def resume_copy(source, target, capsys, damage=None):
  """Copies a workdir, damages it, resumes it; returns (results, stdout)."""
  shutil.copytree(source, target)
  if damage:
    damage(os.path.join(target, "checkpoints", RUN))
  capsys.readouterr()
  results = train.main([*SMALL, "--workdir", str(target), "--resume"])
  return results, capsys.readouterr().out


def test_files_and_schema(small_run):
  directory, results = small_run
  for name in ("metrics.jsonl", "results.json", "accuracy.png", "config.json", "table.txt"):
    assert os.path.exists(os.path.join(directory, name)), name
  for run in ("rate0-seed0", RUN):
    assert sorted(os.listdir(os.path.join(directory, "checkpoints", run))) == ["20", "40"]
  assert strict_load(os.path.join(directory, "results.json")) == results
  assert strict_load(os.path.join(directory, "config.json")) == json.loads(
      json.dumps(train.Config(**results["config"]).signature())
  )
  assert results["dataset"] == "mnist1d" and results["model"] == "cnn"
  assert results["steps"] == 40 and results["devices"] == 1
  assert [(r["rate"], r["seed"]) for r in results["runs"]] == [(0.0, 0), (0.5, 0)]
  for run in results["runs"]:
    for key in ("train_acc", "test_acc", "test_ece"):
      assert 0.0 <= run[key] <= 1.0, (key, run[key])
    assert run["test_nll"] > 0
    assert set(run["keep_fraction"]) == {"features"}
    if run["rate"] == 0:
      assert run["mc"] is None and run["keep_fraction"]["features"] == 1.0
    else:
      assert set(run["mc"]) == {"samples", "test_acc", "test_nll", "test_ece"}
      assert run["mc"]["samples"] == 4 and 0.0 <= run["mc"]["test_acc"] <= 1.0
      # 40 steps × 32 examples × 40 features (5 positions × 8 channels), minus zeros.
      assert 0 < run["keep_check"]["features"]["n"] <= 40 * 32 * 40
      assert abs(run["keep_fraction"]["features"] - 0.5) < 0.02
      assert run["keep_check"]["features"]["sigmas"] <= 4.0
  rows = read_metrics(directory)
  assert [(r["rate"], r["step"]) for r in rows] == [
      (rate, step) for rate in (0.0, 0.5) for step in (10, 20, 30, 40)
  ]
  assert rows[-1]["test_acc"] == results["runs"][-1]["test_acc"]
  with open(os.path.join(directory, "table.txt")) as f:
    table = f.read()
  assert "dropout 0.5" in table and "MC dropout K=4" in table


def test_same_command_twice_gives_identical_results(small_run, tmp_path):
  directory, results = small_run
  again = train.main([*SMALL, "--workdir", str(tmp_path)])
  assert again["runs"] == results["runs"]
  assert read_metrics(str(tmp_path)) == read_metrics(directory)


def test_ctrl_c_saves_and_resume_matches_uninterrupted_run(small_run, interrupted_run, tmp_path,
                                                           capsys):
  directory, code, stderr = interrupted_run
  # What the command line ends with: a real SIGINT, then the message and status 130. The
  # step it names was saved, although the signal came during an evaluation.
  assert code == 130, stderr
  assert stderr.strip().splitlines()[-1] == (
      f"interrupted at step {STOP_AT} ({RUN}); continue with --resume"
  )
  assert sorted(os.listdir(os.path.join(directory, "checkpoints", RUN))) == ["20", str(STOP_AT)]
  assert not os.path.exists(os.path.join(directory, "results.json"))

  resumed, out = resume_copy(directory, tmp_path / "run", capsys)
  assert f"resumed from step 40 (rate0-seed0)" in out
  assert f"resumed from step {STOP_AT} ({RUN})" in out
  assert resumed["runs"] == small_run[1]["runs"]
  assert read_metrics(str(tmp_path / "run")) == read_metrics(small_run[0])


def _cut_metadata(run_dir):
  path = os.path.join(run_dir, str(STOP_AT), "_METADATA")
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(size // 2)


def _empty_files(run_dir):
  for path in glob.glob(os.path.join(run_dir, str(STOP_AT), "**"), recursive=True):
    if os.path.isfile(path):
      open(path, "w").close()


def _empty_newer_step(run_dir):
  os.makedirs(os.path.join(run_dir, "40"))


@pytest.mark.parametrize(
    "damage, skipped, resumed_from",
    [
        (_cut_metadata, STOP_AT, 20),  # 20 < the metrics row at 30: that row is redone.
        (_empty_files, STOP_AT, 20),
        (_empty_newer_step, 40, STOP_AT),
    ],
    ids=["cut-metadata", "empty-files", "empty-newer-step"],
)
def test_resume_skips_a_damaged_checkpoint(small_run, interrupted_run, tmp_path, capsys,
                                           damage, skipped, resumed_from):
  resumed, out = resume_copy(interrupted_run[0], tmp_path / "run", capsys, damage)
  run_dir = tmp_path / "run" / "checkpoints" / RUN
  assert f"checkpoint {run_dir / str(skipped)} is damaged (" in out, out
  assert f"moved it to {run_dir / 'damaged' / str(skipped)}" in out
  assert f"resumed from step {resumed_from} ({RUN})" in out
  assert resumed["runs"] == small_run[1]["runs"]
  assert read_metrics(str(tmp_path / "run")) == read_metrics(small_run[0])
  # Nothing is left to block a later resume: the steps are the run's own last two.
  assert sorted(os.listdir(run_dir)) == sorted([str(resumed_from), "40", "damaged"])
  again = train.main([*SMALL, "--workdir", str(tmp_path / "run"), "--resume"])
  assert again["runs"] == small_run[1]["runs"]


def test_resume_with_no_intact_checkpoint_is_an_error(interrupted_run, tmp_path):
  shutil.copytree(interrupted_run[0], tmp_path / "run")
  run_dir = tmp_path / "run" / "checkpoints" / RUN
  _cut_metadata(str(run_dir))
  os.remove(run_dir / "20" / checkpoints.CHECKSUMS)
  with pytest.raises(checkpoints.CheckpointError) as error:
    train.main([*SMALL, "--workdir", str(tmp_path / "run"), "--resume"])
  assert str(error.value).startswith(f"no intact checkpoint in {os.path.abspath(run_dir)} (")
  assert f"step {STOP_AT}: _METADATA has " in str(error.value)
  assert "step 20: CHECKSUMS.json is missing" in str(error.value)
  assert sorted(os.listdir(run_dir)) == ["20", str(STOP_AT)]  # Nothing moved.


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--steps", "0"], "argument --steps: must be >= 1, got 0"),
        (["--rate", "1.5"], "argument --rate: must be in [0, 1), got 1.5"),
        (["--rate", "nan"], "argument --rate: must be in [0, 1), got nan"),
        (["--sweep", "abc"], "argument --sweep: expected float, got 'abc'"),
        (["--sweep", "0.3,0.30"], "--sweep lists 0.3 twice"),
        (["--seeds", "1", "--seed", "7"], "--seed and --seeds conflict"),
        (["--rate", "0.3", "--sweep", "0.5"], "--rate and --sweep conflict"),
        (["--early-fraction", "0.2"], "--early-fraction applies to --rate-schedule early only"),
        (["--devices", "2"], "--devices 2 asks for more devices than the 1 available"),
        (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
        (["--train-size", "5000"], "argument --train-size: must be in [1, 4000], got 5000"),
        (["--model", "rnn"], "argument --model: invalid choice: 'rnn'"),
    ],
)
def test_flag_errors_come_through_argparse(flags, message, capsys):
  with pytest.raises(SystemExit) as exit_:
    train.main(flags)
  assert exit_.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("usage: ") and f"error: {message}" in err, err


def test_resume_needs_a_run_to_resume(small_run, tmp_path, monkeypatch, capsys):
  cases = [
      (["--workdir", str(tmp_path / "typo")], f"--workdir {tmp_path / 'typo'} does not exist"),
      (["--workdir", str(tmp_path)], f"--workdir {tmp_path} holds no run (it has no config.json)"),
      ([], "--resume: no run under runs/ has this config"),
      (["--workdir", small_run[0], "--steps", "50"], "holds a run with another config: steps=40"),
  ]
  monkeypatch.chdir(tmp_path)  # No runs/ here.
  for flags, message in cases:
    with pytest.raises(SystemExit):
      train.main([*SMALL, "--resume", *flags])
    assert message in capsys.readouterr().err, flags
  with pytest.raises(SystemExit):  # And a workdir that holds a run needs --resume.
    train.main([*SMALL, "--workdir", small_run[0]])
  assert "already holds a run: add --resume" in capsys.readouterr().err


def test_config_json_is_written_atomically(tmp_path, monkeypatch):
  signature = {"model": "cnn", "rate": 0.5}

  def crash(source, target):
    raise OSError("killed while writing")

  with monkeypatch.context() as patch:
    patch.setattr(workdir.os, "replace", crash)
    with pytest.raises(OSError), workdir.create(str(tmp_path / "a"), signature):
      pass
  assert not os.path.exists(tmp_path / "a" / "config.json")  # No half-written file.
  with workdir.create(str(tmp_path / "a"), signature):
    pass
  assert strict_load(tmp_path / "a" / "config.json") == signature
  assert sorted(os.listdir(tmp_path / "a")) == ["config.json", "lock"]


def _file(path, text=""):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)


# (what is made first under the test's directory, the flags, the error), where the
# flags and the error name the directory as {d}.
WORKDIR_ERRORS = {
    "batch larger than the data": (
        None, ["--batch-size", "1000000000000"],
        "--batch-size 1000000000000 is larger than the 128 training examples (--train-size): "
        "give at most 128",
    ),
    "--lr inf": (None, ["--lr", "inf"], "argument --lr: must be finite, got inf"),
    "workdir is a file": (
        lambda d: _file(f"{d}/w"), [], "--workdir {d}/w is a file, not a directory"
    ),
    "workdir under a file": (
        lambda d: _file(f"{d}/f"), ["--workdir", "{d}/f/w"],
        "--workdir {d}/f/w cannot be made: {d}/f is a file, not a directory",
    ),
    "config.json is a list": (
        lambda d: _file(f"{d}/w/config.json", "[]"), ["--resume"],
        "{d}/w/config.json is not a train.py config (it holds a JSON list)",
    ),
    "foreign rows in metrics.jsonl": (
        lambda d: _file(f"{d}/w/metrics.jsonl", '{"loss": 1}\n'), [],
        "{d}/w/metrics.jsonl line 1 is not a row of train.py's metrics",
    ),
    "metrics.jsonl is a directory": (
        lambda d: os.makedirs(f"{d}/w/metrics.jsonl"), [],
        "{d}/w/metrics.jsonl is not a file: move it away",
    ),
    "lock is a directory": (
        lambda d: os.makedirs(f"{d}/w/lock"), [], "{d}/w/lock is not a file: move it away",
    ),
    "config.json is a directory": (
        lambda d: os.makedirs(f"{d}/w/config.json"), ["--resume"],
        "{d}/w/config.json is not a file: move it away",
    ),
}


@pytest.mark.parametrize("case", WORKDIR_ERRORS)
def test_workdir_problems_are_flag_errors_before_anything_is_written(case, tmp_path, capsys):
  make, flags, message = WORKDIR_ERRORS[case]
  d = os.path.realpath(tmp_path)
  if make:
    make(d)
  before = sorted(glob.glob(f"{d}/**", recursive=True))
  flags = ["--workdir", "{d}/w", *flags] if "--workdir" not in flags else flags
  with pytest.raises(SystemExit) as exit_:
    train.main([*SMALL, *(flag.format(d=d) for flag in flags)])
  assert exit_.value.code == 2
  assert f"error: {message.format(d=d)}" in capsys.readouterr().err
  assert sorted(glob.glob(f"{d}/**", recursive=True)) == before  # Nothing made or changed.


def test_a_workdir_that_cannot_be_written_is_a_flag_error(tmp_path, monkeypatch, capsys):
  # The tests may run as root, whom no permission bit stops: the check is os.access's.
  target = str(tmp_path / "w")
  monkeypatch.setattr(workdir.os, "access", lambda path, mode: path != str(tmp_path))
  with pytest.raises(SystemExit):
    train.main([*SMALL, "--workdir", target])
  assert f"--workdir {target} is not writable ({tmp_path} is where it would be made)" in (
      capsys.readouterr().err)


def test_the_workdir_is_resolved_once(tmp_path, monkeypatch):
  signature = {"model": "cnn"}
  os.makedirs(tmp_path / "real")
  os.symlink(tmp_path / "real", tmp_path / "link")
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  real = os.path.realpath(tmp_path)
  assert workdir.find("link", False, "cnn", signature) == f"{real}/real"
  assert workdir.find("./link/../x", False, "cnn", signature) == f"{real}/x"
  assert workdir.find("~/runs/a", False, "cnn", signature) == f"{real}/home/runs/a"
  default = workdir.find("", False, "cnn", signature)
  assert os.path.dirname(default) == f"{real}/runs" and os.path.isabs(default)


def python_train(flags, cwd=ROOT, before=""):
  """`python train.py FLAGS` as a subprocess, after the Python lines `before`."""
  script = f"import sys; sys.path.insert(0, {ROOT!r}); import train\n{before}\n" \
           f"sys.exit(train.run({flags!r}))"
  return subprocess.Popen(
      [sys.executable, "-W", "error", "-c", script], cwd=cwd,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
  )


@pytest.mark.parametrize("checked_first", [True, False], ids=["checked-first", "save-fails"])
def test_unwritable_checkpoints_end_the_run_instead_of_hanging(checked_first, tmp_path):
  # checkpoints/<run> cannot be made: a file stands where checkpoints/ should be. Either
  # the check at the start says so, or (with the check off) the first save fails: both
  # end the process (an asynchronous Orbax save used to leave it waiting forever). The
  # run takes about 11 s alone on 2 cores; the timeout only has to tell that from forever,
  # on cores that other test processes share.
  _file(f"{tmp_path}/checkpoints")
  skip_check = "" if checked_first else "train.Checkpointer._check_writable = lambda self: None"
  process = python_train([*SMALL, "--workdir", str(tmp_path)], before=skip_check)
  try:
    _, err = process.communicate(timeout=180)
  except subprocess.TimeoutExpired:
    process.kill()
    process.communicate()  # Closes the pipes.
    raise
  assert process.returncode == 1, err
  path = f"{tmp_path}/checkpoints/rate0-seed0"
  expected = (f"error: cannot write checkpoints to {path} (" if checked_first
              else f"error: saving step 20 to {path}/20 failed (")
  assert expected in err, err


def test_one_writer_per_workdir_and_no_stale_lock_after_kill(tmp_path, capsys):
  long = [*SMALL, "--steps", "100000", "--workdir", str(tmp_path)]
  first = python_train(long)
  try:
    deadline = time.monotonic() + 120
    while first.poll() is None and time.monotonic() < deadline and not glob.glob(
        f"{tmp_path}/checkpoints/*/20"):
      time.sleep(0.01)
    assert first.poll() is None, first.communicate()
    assert train.run([*long, "--resume"]) == 1
    assert f"is in use by another train.py (pid {first.pid})" in capsys.readouterr().err
  finally:
    first.kill()
    first.communicate()
  assert first.returncode == -signal.SIGKILL
  with workdir.create(str(tmp_path), strict_load(tmp_path / "config.json")):
    assert (tmp_path / "lock").read_text() == f"{os.getpid()}\n"


# A full disk as Python's file functions report it, and as orbax's writers do (seen on a
# 2 MiB tmpfs, jax 0.10.2, orbax-checkpoint 0.11): each thread logs it, then it is raised.
FULL_DISK = {
    "OSError": lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    "orbax": lambda: ValueError(
        'RESOURCE_EXHAUSTED: Error writing "opt_state.0.count/0" in OCDBT database at local '
        'file "x/ocdbt.process_0/": Failed writing: "x/ocdbt.process_0/d/1fa8": Failed to write '
        "1146849 bytes to file 18: No space left on device [os_error_code='28']"),
}


@pytest.mark.parametrize("raised", FULL_DISK)
def test_a_full_disk_keeps_the_steps_saved_before_it(raised, small_run, tmp_path, monkeypatch,
                                                     capsys, caplog):
  real_save = checkpoints.ocp.Checkpointer.save

  def save(self, directory, *args, **kwargs):
    if os.path.basename(os.fspath(directory)) == "40.partial":
      _file(os.path.join(directory, "half"))
      logging.getLogger("absl").error("_SignalingThread.run() raised an exception")
      raise FULL_DISK[raised]()
    return real_save(self, directory, *args, **kwargs)

  with monkeypatch.context() as patch:
    patch.setattr(checkpoints.ocp.Checkpointer, "save", save)
    assert train.run([*SMALL, "--workdir", str(tmp_path)]) == 1
  run_dir = tmp_path / "checkpoints" / "rate0-seed0"
  err = capsys.readouterr().err
  assert (f"error: saving step 40 to {run_dir}/40 failed (the disk is full: free space, then "
          f"rerun with --resume); the steps saved before it are kept (steps: 20)") in err
  assert "_SignalingThread" not in caplog.text  # Orbax's own log of it stays quiet.
  assert os.listdir(run_dir) == ["20"]  # And no partial save.
  resumed = train.main([*SMALL, "--workdir", str(tmp_path), "--resume"])
  assert resumed["runs"] == small_run[1]["runs"]
  assert read_metrics(tmp_path) == read_metrics(small_run[0])


def test_resume_leaves_config_json_alone(interrupted_run, tmp_path, capsys):
  shutil.copytree(interrupted_run[0], tmp_path / "run")
  path = tmp_path / "run" / "config.json"
  before = path.read_bytes(), os.stat(path).st_mtime_ns
  train.main([*SMALL, "--workdir", str(tmp_path / "run"), "--resume"])
  assert (path.read_bytes(), os.stat(path).st_mtime_ns) == before


def test_no_dropout_step_gives_null_not_nan(tmp_path):
  # round(0.01 × 40) = 0: the early schedule never turns dropout on.
  results = train.main([
      *SMALL, "--rate-schedule", "early", "--early-fraction", "0.01", "--mc-samples", "0",
      "--workdir", str(tmp_path),
  ])
  run = results["runs"][1]
  assert run["rate"] == 0.5 and run["keep_fraction"] == {"features": None}
  assert run["keep_check"] == {"features": {"n": 0, "sigmas": None}}
  assert strict_load(tmp_path / "results.json") == results
  for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
    json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))
  assert "no step had dropout on" in (tmp_path / "table.txt").read_text()


def test_sweep_with_seeds_and_early_dropout(tmp_path):
  results = train.main([
      *SMALL, "--sweep", "0.5", "--seeds", "2", "--rate-schedule", "early", "--mc-samples", "0",
      "--workdir", str(tmp_path),
  ])
  runs = [(r["rate"], r["seed"]) for r in results["runs"]]
  assert runs == [(rate, seed) for rate in (0.0, 0.5) for seed in (0, 1)]
  assert all(r["mc"] is None for r in results["runs"])
  # Early dropout: only the first 20 of the 40 steps count. Counting the other 20 (all
  # kept) as well would pull the rate-0.5 fractions to about 0.75.
  for run in results["runs"]:
    layer = run["keep_check"]["features"]
    assert 0 < layer["n"] <= 20 * 32 * 40, layer  # 40 features (5 positions × 8 channels)
    assert abs(run["keep_fraction"]["features"] - (1 - run["rate"])) < 0.05, run
  assert os.path.exists(tmp_path / "sweep.png")
  table = (tmp_path / "table.txt").read_text()
  assert "±" in table and "dropout 0.5" in table


def test_mlp_has_a_checked_dropout_after_each_hidden_layer():
  model, _ = models.model_and_optimizer("mlp", 16, 1e-3, "constant", 10)
  x = jnp.ones((4, data.NUM_FEATURES))
  variables = model.init(jax.random.key(0), x, 0.0, train=False)
  assert set(variables["params"]) == {"Dense_0", "Dense_1", "Dense_2"}
  logits, sown = model.apply(variables, x, 0.5, train=True, mutable="keep_fraction",
                             rngs={"dropout": jax.random.key(1)})
  assert logits.shape == (4, data.NUM_CLASSES)
  assert set(sown["keep_fraction"]) == {"hidden1", "hidden2"}
  for layer in sown["keep_fraction"].values():
    (fraction,), (count,) = layer["fraction"], layer["count"]
    assert 0 < int(count) <= 4 * 16 and 0 <= float(fraction) <= 1


def test_distinct_rates_get_distinct_names():
  assert workdir.run_name(0.3, 0) == "rate0.3-seed0"
  assert workdir.run_name(0.0, 1) == "rate0-seed1"
  near = 0.1 + 0.2  # 0.30000000000000004: `:g` would print it as 0.3.
  assert workdir.run_name(near, 0) == "rate0.30000000000000004-seed0"
  assert workdir.rate_label(1e-7) == "1e-07"


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  real = train.load_mnist1d

  def with_a_nan(train_size, test_size):  # in an example of the second step's batch
    loaded = {k: v.copy() for k, v in real(train_size, test_size).items()}
    loaded["x_train"][data.batch_indices(0, 1, 32, train_size)[0], 3] = np.nan
    return loaded

  monkeypatch.setattr(train, "load_mnist1d", with_a_nan)
  with pytest.raises(train.NonFiniteError, match="^step 2: the loss or the gradients are NaN") as e:
    train.main([*SMALL, "--rate", "0", "--checkpoint-every", "1", "--workdir", str(tmp_path)])
  run_dir = tmp_path / "checkpoints" / "rate0-seed0"
  assert f"the last good one, step 1, is in {run_dir}. Try a smaller --lr." in str(e.value)
  assert os.listdir(run_dir) == ["1"]


def test_a_run_that_diverged_before_saving_anything_can_be_started_again(tmp_path):
  with pytest.raises(train.NonFiniteError) as error:
    train.main([*SMALL, "--lr", "1e30", "--workdir", str(tmp_path)])
  assert "No checkpoint was written after it; this run had saved none yet." in str(error.value)
  # It left no metrics row and no checkpoint, so the same workdir takes a new run as is.
  quick = ["--steps", "10", "--eval-every", "10", "--checkpoint-every", "10", "--mc-samples", "0"]
  train.main([*SMALL, *quick, "--workdir", str(tmp_path)])
  assert strict_load(tmp_path / "config.json")["lr"] != 1e30
  assert os.path.exists(tmp_path / "results.json")


def test_data_restores_global_random_state():
  np.random.seed(123)
  random.seed(123)
  expected = np.random.rand(), random.random()
  np.random.seed(123)
  random.seed(123)
  generated = data.generate_mnist1d()
  assert (np.random.rand(), random.random()) == expected
  assert generated["x_train"].shape == (4000, 40) and generated["x_test"].shape == (1000, 40)
  assert set(np.unique(generated["y_test"])) == set(range(10))


def test_batches_depend_on_the_step_only():
  a = [data.batch_indices(0, step, 32, 100) for step in range(10)]
  data.epoch_order.cache_clear()
  b = [data.batch_indices(0, step, 32, 100) for step in reversed(range(10))][::-1]
  np.testing.assert_array_equal(np.stack(a), np.stack(b))
  # Each epoch is a permutation: 100 consecutive positions cover every example once.
  flat = np.concatenate(a)
  assert sorted(flat[:100]) == list(range(100))


def test_help_is_the_config_declared_once(capsys, monkeypatch):
  monkeypatch.setenv("COLUMNS", "1000")  # One line per flag: no wrapping at hyphens.
  with pytest.raises(SystemExit) as exit_:
    train.main(["--help"])
  assert exit_.value.code == 0
  text = " ".join(capsys.readouterr().out.split())
  comments = cli.field_comments(train.Config)
  for field in dataclasses.fields(train.Config):
    flag = "--" + field.name.replace("_", "-")
    assert (flag if field.name != "progress" else "--no-progress") in text, flag
    assert comments[field.name] in text, field.name  # Its comment is its help.
  assert "(default: 0.5)" in text and "(default: cnn)" in text


def test_kill_and_resume_matches_uninterrupted_run(small_run, background, capsys, monkeypatch):
  job, cwd = background["killed"]
  code, _, directory = job.result()
  assert code == -signal.SIGKILL
  assert not os.path.exists(os.path.join(directory, "results.json"))

  # The same command plus --resume, from the same directory (here in this process: only
  # the files carry over). It finds the relative default workdir, and Orbax, which
  # needs absolute paths, restores its checkpoints.
  monkeypatch.chdir(cwd)
  capsys.readouterr()
  resumed = train.main([*SMALL, "--resume"])
  out = capsys.readouterr().out
  assert f"workdir: {os.path.realpath(directory)}" in out
  assert "resumed from step " in out and "damaged" not in out, out
  assert resumed["runs"] == small_run[1]["runs"]
  assert strict_load(os.path.join(directory, "results.json"))["runs"] == small_run[1]["runs"]
  assert read_metrics(directory) == read_metrics(small_run[0])


def test_eight_devices_match_one(small_run, background):
  _, one = small_run
  eight = background["devices"][0].result()
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
