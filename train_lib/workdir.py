"""The run directory: what goes where, how --resume finds it, and strict JSON files.

  <workdir>/config.json                 the fields that decide the results (written once)
  <workdir>/lock                        held by the process writing the run (its pid inside)
  <workdir>/metrics.jsonl               one row per evaluation of every run
  <workdir>/results.json, table.txt     the final results
  <workdir>/accuracy.png, sweep.png     the plots
  <workdir>/checkpoints/<run>/<step>/   see train_lib.checkpoints

Every file is strict JSON (a non-finite number is written as null) and is
replaced atomically (written beside, then renamed), so a kill never leaves
half a file; metrics.jsonl is appended to, and a resume drops a line cut short.

The workdir is resolved once, when the flags are checked (``~``, relative
paths and symlinks become one absolute path), and is checked there too: a
workdir that cannot be made or written, or whose files are not a run's, is a
ValueError before anything is written. One process at a time writes a run:
``lock`` is held with ``fcntl.flock`` for as long as it runs, and the OS
releases it when the process ends, however it ends.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

from train_lib.checkpoints import saved_steps

RUNS = "runs"


class WorkdirBusy(RuntimeError):
  """Another process is writing the run in this workdir."""


def rate_label(rate: float) -> str:
  """The shortest text that reads back as `rate`: distinct rates get distinct names."""
  short = f"{rate:g}"
  return short if float(short) == rate else repr(rate)


def run_name(rate: float, seed: int) -> str:
  return f"rate{rate_label(rate)}-seed{seed}"


def strict(value: Any) -> Any:
  """`value` with every NaN or infinity replaced by None (JSON null)."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: strict(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [strict(v) for v in value]
  return value


def dumps(value: Any, **kwargs) -> str:
  return json.dumps(strict(value), allow_nan=False, **kwargs)


def write_atomic(path: str, text: str) -> None:
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


ROW_KEYS = ("rate", "seed", "step")  # What every row of metrics.jsonl has.


def read_rows(path: str) -> list[dict[str, Any]]:
  """The rows of a JSON-lines file, without a last line cut short by a kill.

  Raises:
    ValueError: a line is JSON but not a row of train.py's (a JSON object with
      ``ROW_KEYS``): it would be lost or misread, so it is for the user to move.
  """
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if not (isinstance(row, dict) and all(k in row for k in ROW_KEYS)):
        raise ValueError(
            f"{path} line {number} is not a row of train.py's metrics (a JSON object with "
            f"{', '.join(ROW_KEYS)}): {line.strip()[:80]!r}; move that line or that file away"
        )
      rows.append(row)
  return rows


def rewrite_rows(path: str, keep: Callable[[dict], bool], key=None) -> None:
  """Keeps the rows for which `keep` is true (sorted by `key`, if given)."""
  rows = [row for row in read_rows(path) if keep(row)]
  if key is not None:
    rows.sort(key=key)
  write_atomic(path, "".join(dumps(row) + "\n" for row in rows))


def _read_config(workdir: str) -> dict[str, Any] | None:
  path = os.path.join(workdir, "config.json")
  try:
    with open(path) as f:
      saved = json.load(f)
  except FileNotFoundError:
    return None
  except ValueError as error:
    raise ValueError(f"{path} is damaged ({error}), so that run cannot be resumed") from None
  except OSError as error:
    raise ValueError(f"{path} cannot be read ({error.strerror or error})") from None
  if not isinstance(saved, dict):
    raise ValueError(
        f"{path} is not a train.py config (it holds a JSON {type(saved).__name__}), so that "
        f"run cannot be resumed"
    )
  return saved


def _newest_matching_run(signature: dict[str, Any]) -> str:
  candidates = []
  for entry in sorted(os.listdir(RUNS)) if os.path.isdir(RUNS) else ():
    path = os.path.join(RUNS, entry, "config.json")
    try:
      with open(path) as f:
        if json.load(f) == signature:
          candidates.append((os.path.getmtime(path), os.path.join(RUNS, entry)))
    except (OSError, ValueError):
      continue  # Not a run, or a damaged one: not this config's.
  return max(candidates)[1] if candidates else ""


def resolve(path: str) -> str:
  """`path` as the one absolute path it names: ``~`` expanded, symlinks followed."""
  return os.path.realpath(os.path.expanduser(path))


def _check_usable(workdir: str) -> None:
  """ValueError unless `workdir` is, or can be made as, a writable directory whose
  lock, config.json and metrics.jsonl (those there) are files, metrics.jsonl holding
  only train.py's rows."""
  existing = workdir
  while not os.path.lexists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    where = "is" if existing == workdir else f"cannot be made: {existing} is"
    raise ValueError(f"--workdir {workdir} {where} a file, not a directory")
  if not os.access(existing, os.W_OK | os.X_OK):
    where = "" if existing == workdir else f" ({existing} is where it would be made)"
    raise ValueError(f"--workdir {workdir} is not writable{where}")
  for name in ("lock", "config.json", "metrics.jsonl"):
    path = os.path.join(workdir, name)
    if os.path.lexists(path) and not os.path.isfile(path):
      raise ValueError(f"{path} is not a file: move it away")
  read_rows(os.path.join(workdir, "metrics.jsonl"))


def find(workdir: str, resume: bool, model: str, signature: dict[str, Any]) -> str:
  """The workdir a run uses, resolved (see `resolve`). Raises ValueError for flags
  that cannot work, and for a workdir that cannot be used (see `_check_usable`).

  Without --resume: `workdir`, which must not hold a run yet, or a fresh
  directory under runs/. With --resume: `workdir`, which must hold a run with
  this config, or the newest such run under runs/.
  """
  if workdir:
    workdir = resolve(workdir)
    _check_usable(workdir)  # First: "is a file" says more than "holds no run".
  found = _find(workdir, resume, model, json.loads(dumps(signature)))
  if not workdir:
    found = resolve(found)
    _check_usable(found)
  return found


def _has_progress(workdir: str) -> bool:
  """Whether a run there got as far as a metrics row or a checkpoint (a run that
  failed before either, on a bad --lr say, may be started again in its place)."""
  checkpoints = os.path.join(workdir, "checkpoints")
  runs = os.listdir(checkpoints) if os.path.isdir(checkpoints) else ()
  return bool(read_rows(os.path.join(workdir, "metrics.jsonl"))) or any(
      saved_steps(os.path.join(checkpoints, run)) for run in runs
  )


def _find(workdir: str, resume: bool, model: str, signature: dict[str, Any]) -> str:
  if resume:
    if not workdir:
      workdir = _newest_matching_run(signature)
      if not workdir:
        raise ValueError(
            f"--resume: no run under {RUNS}/ has this config; name one with --workdir, "
            f"or leave out --resume to start a new run"
        )
    elif not os.path.lexists(workdir):
      raise ValueError(f"--resume: --workdir {workdir} does not exist")
    saved = _read_config(workdir)
    if saved is None:
      raise ValueError(f"--resume: --workdir {workdir} holds no run (it has no config.json)")
    if saved != signature:
      changed = sorted(k for k in {*saved, *signature} if saved.get(k) != signature.get(k))
      diff = ", ".join(f"{k}={saved.get(k)!r} there, {signature.get(k)!r} here" for k in changed)
      raise ValueError(f"--resume: --workdir {workdir} holds a run with another config: {diff}")
    return workdir
  if workdir:
    if _read_config(workdir) is not None and _has_progress(workdir):
      raise ValueError(
          f"--workdir {workdir} already holds a run: add --resume to continue it, "
          f"or choose another --workdir"
      )
    return workdir
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  workdir, suffix = os.path.join(RUNS, f"{model}-{stamp}"), 1
  while os.path.exists(workdir):
    suffix += 1
    workdir = os.path.join(RUNS, f"{model}-{stamp}-{suffix}")
  return workdir


@contextlib.contextmanager
def create(workdir: str, signature: dict[str, Any]) -> Iterator[None]:
  """Makes the workdir, takes its lock, writes config.json unless it holds this
  signature already, and holds the lock until the block ends.

  Raises:
    WorkdirBusy: another process holds the lock.
  """
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "lock"), "a+") as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
      if error.errno not in (errno.EWOULDBLOCK, errno.EACCES):
        raise
      lock.seek(0)
      holder = lock.read().strip() or "unknown"
      raise WorkdirBusy(
          f"--workdir {workdir} is in use by another train.py (pid {holder}): wait for it "
          f"to finish, or stop it, before resuming there; or choose another --workdir"
      ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    if _read_config(workdir) != json.loads(dumps(signature)):
      write_atomic(os.path.join(workdir, "config.json"), dumps(signature, indent=1) + "\n")
    yield  # The lock is released when the file closes (or the process ends).
