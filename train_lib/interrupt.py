"""Ctrl-C as a request to stop between steps, so that the run can save and say where it is."""

from __future__ import annotations

import signal
import sys
import threading


class Interrupted(Exception):
  """Training stopped on SIGINT after `step`; a checkpoint of that step was saved."""

  def __init__(self, step: int, run: str):
    super().__init__(f"interrupted at step {step} ({run}); continue with --resume")
    self.step, self.run = step, run


class StopRequest:
  """While active, the first SIGINT sets ``requested``; the loop checks it each step.

  A second SIGINT stops at once (a KeyboardInterrupt), as usual.
  """

  requested = False

  def _handle(self, signum, frame):
    if self.requested:
      raise KeyboardInterrupt
    self.requested = True
    print("\nstopping after this step (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

  def __enter__(self) -> StopRequest:
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGINT, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGINT, self._previous)
