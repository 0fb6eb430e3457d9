"""The run directory: what goes where, how --resume finds it, and strict JSON files.

  <workdir>/config.json                 the fields that decide the results (written once)
  <workdir>/metrics.jsonl               one row per evaluation of every run
  <workdir>/results.json, table.txt     the final results
  <workdir>/accuracy.png, sweep.png     the plots
  <workdir>/checkpoints/<run>/<step>/   see train_lib.checkpoints

Every file is strict JSON (a non-finite number is written as null) and is
replaced atomically (written beside, then renamed), so a kill never leaves
half a file; metrics.jsonl is appended to, and a resume drops a line cut short.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from collections.abc import Callable
from typing import Any

RUNS = "runs"


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


def read_rows(path: str) -> list[dict[str, Any]]:
  """The rows of a JSON-lines file, without a last line cut short by a kill."""
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        continue
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
      return json.load(f)
  except FileNotFoundError:
    return None
  except ValueError as error:
    raise ValueError(f"{path} is damaged ({error}), so that run cannot be resumed") from None


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


def find(workdir: str, resume: bool, model: str, signature: dict[str, Any]) -> str:
  """The workdir a run uses. Raises ValueError for flags that cannot work.

  Without --resume: `workdir`, which must not hold a run yet, or a fresh
  directory under runs/. With --resume: `workdir`, which must hold a run with
  this config, or the newest such run under runs/.
  """
  signature = json.loads(dumps(signature))
  if resume:
    if not workdir:
      workdir = _newest_matching_run(signature)
      if not workdir:
        raise ValueError(
            f"--resume: no run under {RUNS}/ has this config; name one with --workdir, "
            f"or leave out --resume to start a new run"
        )
    elif not os.path.isdir(workdir):
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
    if _read_config(workdir) is not None:
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


def create(workdir: str, signature: dict[str, Any]) -> None:
  """Makes the workdir and writes config.json, if it is not there yet."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    write_atomic(path, dumps(signature, indent=1) + "\n")
