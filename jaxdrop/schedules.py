"""Dropout-rate schedules: optax-style ``step -> rate`` functions.

``jaxdrop.dropout`` takes a traced rate, so a schedule's value can change every
step without recompiling: pass ``schedule(step)`` as the rate inside a jitted
train step. Steps are int32 in JAX (unless x64 is on), so step arguments must
be ints in [0, 2**31 - 1]; larger ones are refused when the schedule is built.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxdrop import _validate

__all__ = ["constant", "early_dropout", "linear_ramp"]


_MAX_STEP = 2**31 - 1  # The largest int32 step.


def _check_step(value: Any, name: str) -> int:
  return _validate.check_int(value, name, minimum=0, maximum=_MAX_STEP)


def _check_rate(rate: Any, name: str) -> float:
  value = _validate.static_rate(rate, name)
  if value is None:
    raise TypeError(f"{name} must be a Python float in [0, 1], got an array")
  return value


def constant(rate: float) -> optax.Schedule:
  """The same rate at every step (as a float32 array, like the others)."""
  rate = _check_rate(rate, "rate")
  return lambda step: jnp.full((), rate, jnp.float32)


def early_dropout(rate: float, until_step: int) -> optax.Schedule:
  """``rate`` for steps ``< until_step``, then 0 (Liu et al. 2023).

  "Early dropout" regularizes only the first phase of training, which can
  help underfitting models; turning dropout off later also removes its noise
  from the final steps.

  Examples:
    >>> import jaxdrop
    >>> schedule = jaxdrop.schedules.early_dropout(0.3, until_step=100)
    >>> float(schedule(99)), float(schedule(100))
    (0.30000001192092896, 0.0)
  """
  rate = _check_rate(rate, "rate")
  until_step = _check_step(until_step, "until_step")
  return lambda step: jnp.where(
      jnp.asarray(step) < until_step, jnp.float32(rate), jnp.float32(0.0)
  )


def linear_ramp(
    start: float, end: float, transition_steps: int, transition_begin: int = 0
) -> optax.Schedule:
  """Linear from ``start`` to ``end`` over ``transition_steps`` steps.

  Holds ``start`` before ``transition_begin`` and ``end`` after the ramp
  (``optax.linear_schedule`` with both ends checked to be rates).

  Examples:
    >>> import jaxdrop
    >>> schedule = jaxdrop.schedules.linear_ramp(0.0, 0.4, transition_steps=100)
    >>> round(float(schedule(50)), 6)
    0.2
  """
  start = _check_rate(start, "start")
  end = _check_rate(end, "end")
  transition_steps = _check_step(transition_steps, "transition_steps")
  transition_begin = _check_step(transition_begin, "transition_begin")
  _check_step(transition_begin + transition_steps, "transition_begin + transition_steps")
  if transition_steps == 0:
    # optax would hold `start` forever; a ramp of no steps jumps to `end`.
    return lambda step: jnp.where(
        jnp.asarray(step) < transition_begin, jnp.float32(start), jnp.float32(end)
    )
  schedule = optax.linear_schedule(start, end, transition_steps, transition_begin)
  return lambda step: jnp.asarray(schedule(step), jnp.float32)
