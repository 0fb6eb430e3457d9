"""Orbax checkpoints that a resume can trust: checksummed, and skipped when damaged.

A run's checkpoints live in ``<directory>/<step>/``: one Orbax
``StandardCheckpointer`` save of the train state, plus ``CHECKSUMS.json`` (the
size and SHA-256 of every file). A save goes to ``<step>.partial/``, which is
renamed to ``<step>/`` once its checksums are written, so a step directory is
complete when it appears and a save cut short leaves only a ``.partial``.

A step is intact when its files match its checksums and Orbax restores it.
Anything else (a file cut short or emptied, an empty directory, a missing
file) is damaged: a resume moves it to ``<directory>/damaged/`` with a message
naming it, and continues from the newest intact step, or stops with
``CheckpointError`` if no step is intact.

Saves are synchronous (Orbax's ``Checkpointer``, not its ``AsyncCheckpointer``):
the loop waits for each save anyway, and an async save that fails before it
has made its directory leaves Orbax threads waiting forever, so the process
never exits. A save that fails for any reason (a full disk, a directory that
cannot be written) is a ``CheckpointError`` naming the step and the cause; the
steps saved before it are kept.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

import jax
from jax.experimental import multihost_utils

with warnings.catch_warnings():
  # orbax-checkpoint 0.12.8 names jax.sharding.SingleDeviceSharding when it is imported,
  # which jax 0.12 deprecates: orbax's to mend, and silenced for this import only.
  warnings.filterwarnings("ignore", "jax.sharding.SingleDeviceSharding is deprecated",
                          DeprecationWarning)
  import orbax.checkpoint as ocp

CHECKSUMS = "CHECKSUMS.json"


class CheckpointError(RuntimeError):
  """Checkpoints cannot be written, or exist but none of them can be restored."""


def saved_steps(directory: str) -> list[int]:
  """The steps that have a directory, oldest first (unfinished saves excluded)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def _checksums(step_dir: str) -> dict[str, list]:
  table = {}
  for root, _, files in os.walk(step_dir):
    for name in files:
      path = os.path.join(root, name)
      relative = os.path.relpath(path, step_dir)
      if relative != CHECKSUMS:
        with open(path, "rb") as f:
          table[relative] = [os.path.getsize(path), hashlib.file_digest(f, "sha256").hexdigest()]
  return dict(sorted(table.items()))


def _damage(step_dir: str) -> str | None:
  """What is wrong with a step directory's files, or None if they match their checksums."""
  try:
    with open(os.path.join(step_dir, CHECKSUMS)) as f:
      expected = json.load(f)
  except FileNotFoundError:
    return f"{CHECKSUMS} is missing"
  except (OSError, ValueError) as error:
    return f"{CHECKSUMS} is unreadable ({error})"
  found = _checksums(step_dir)
  for name, (size, digest) in expected.items():
    if name not in found:
      return f"{name} is missing"
    if found[name][0] != size:
      return f"{name} has {found[name][0]} bytes, {size} were saved"
    if found[name][1] != digest:
      return f"{name} does not match its checksum"
  return None


def remove_partial_saves(directory: str) -> None:
  """Removes what saves cut short left (Orbax's own temporary names included)."""
  for name in os.listdir(directory) if os.path.isdir(directory) else ():
    if ".partial" in name:
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def _orbax() -> ocp.Checkpointer:
  """A synchronous Orbax checkpointer of one pytree (see the module docstring)."""
  return ocp.Checkpointer(ocp.StandardCheckpointHandler())


def _on_primary(fn: Callable[[], None], tag: str) -> None:
  """Runs a filesystem change on process 0 only; the other processes wait for it."""
  if jax.process_index() == 0:
    fn()
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(tag)


def restore_latest(directory: str, state: Any, log: Callable[[str], None] = print) -> Any:
  """The newest intact checkpoint, restored like `state` (shapes, dtypes, shardings).

  Damaged newer steps are moved to ``<directory>/damaged/`` (with a message
  naming each and why), so they neither block later saves nor get lost.

  Returns:
    The restored state, or None when the directory holds no checkpoint.

  Raises:
    CheckpointError: checkpoints exist, but none is intact.
  """
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  damaged, restored = [], None
  for step in reversed(saved_steps(directory)):
    path = os.path.join(directory, str(step))
    problem = _damage(path)
    if problem is None:
      try:
        with _orbax() as checkpointer:
          restored = checkpointer.restore(path, args=ocp.args.StandardRestore(abstract))
        if int(restored.step) != step:
          problem, restored = f"it holds step {int(restored.step)}", None
      except Exception as error:  # noqa: BLE001 -- any failure to read means damage.
        problem = f"Orbax cannot restore it ({type(error).__name__}: {str(error)[:200]})"
    if problem is None:
      break
    damaged.append((step, problem))
  if restored is None and damaged:
    listing = "; ".join(f"step {s}: {p}" for s, p in damaged)
    raise CheckpointError(
        f"no intact checkpoint in {directory} ({listing}). Move that directory away "
        f"to train this run again from step 0."
    )

  def move_aside():
    for step, problem in damaged:
      target = os.path.join(directory, "damaged", str(step))
      suffix = 1
      while os.path.exists(target):
        suffix += 1
        target = os.path.join(directory, "damaged", f"{step}-{suffix}")
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(os.path.join(directory, str(step)), target)
      log(f"checkpoint {os.path.join(directory, str(step))} is damaged ({problem}); "
          f"moved it to {target}")
    remove_partial_saves(directory)

  _on_primary(move_aside, f"move-aside:{directory}")
  return restored


@contextlib.contextmanager
def _orbax_logs_quiet():
  """Orbax logs a failed save's traceback from each of its threads (``ERROR:absl``) before
  it raises; the ``CheckpointError`` says what failed once."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    logger.setLevel(level)


def _reason(error: BaseException) -> str:
  """What made a save fail, in words a user can act on."""
  if isinstance(error, OSError) and error.errno == errno.ENOSPC or (
      "No space left on device" in str(error)):  # Orbax's writers raise it as a ValueError.
    return "the disk is full: free space, then rerun with --resume"
  return f"{type(error).__name__}: {str(error)[:300]}"


class Checkpointer:
  """Saves a run's train state every so often, keeping the newest `keep` steps.

  Raises:
    CheckpointError: `directory` cannot be made or written (at once, before
      any training), or a save failed.
  """

  def __init__(self, directory: str, keep: int = 2):
    self.directory = os.path.abspath(directory)
    self.keep = keep
    _on_primary(self._check_writable, f"check:{self.directory}")
    self._orbax = _orbax()

  def _check_writable(self) -> None:
    try:
      os.makedirs(self.directory, exist_ok=True)
      with tempfile.TemporaryFile(dir=self.directory):
        pass
    except OSError as error:
      raise CheckpointError(
          f"cannot write checkpoints to {self.directory} ({error.strerror or error})"
      ) from None

  def save(self, step: int, state: Any) -> None:
    """Saves `state` as `step`, synchronously; a step directory that exists is complete."""
    final = os.path.join(self.directory, str(step))
    partial = final + ".partial"

    def commit():
      table = _checksums(partial)
      with open(os.path.join(partial, CHECKSUMS), "w") as f:
        json.dump(table, f, indent=0)
      shutil.rmtree(final, ignore_errors=True)
      os.rename(partial, final)
      for old in saved_steps(self.directory)[: -self.keep]:
        shutil.rmtree(os.path.join(self.directory, str(old)))

    try:
      _on_primary(lambda: shutil.rmtree(partial, ignore_errors=True), f"clear:{partial}")
      with _orbax_logs_quiet():
        self._orbax.save(partial, args=ocp.args.StandardSave(state))
      _on_primary(commit, f"save:{final}")
    except Exception as error:  # noqa: BLE001 -- whatever failed, the save did not happen.
      _on_primary(lambda: remove_partial_saves(self.directory), f"failed:{partial}")
      kept = ", ".join(map(str, saved_steps(self.directory))) or "none"
      raise CheckpointError(
          f"saving step {step} to {final} failed ({_reason(error)}); the steps saved before "
          f"it are kept (steps: {kept})"
      ) from error

  def close(self) -> None:
    self._orbax.close()
