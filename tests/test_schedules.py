"""Tests of jaxdrop.schedules: step -> rate functions for traced rates."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdrop
from jaxdrop import schedules


def values(schedule, steps):
  return [float(schedule(step)) for step in steps]


def test_constant():
  rate = schedules.constant(0.25)(123)
  chex.assert_shape(rate, ())
  chex.assert_type(rate, jnp.float32)
  assert float(rate) == 0.25


def test_the_largest_int32_step_is_accepted():
  schedule = schedules.early_dropout(0.5, until_step=2**31 - 1)
  assert values(schedule, [0, 2**31 - 2]) == [0.5, 0.5]


def test_early_dropout_values():
  schedule = schedules.early_dropout(0.5, until_step=100)
  assert values(schedule, [0, 1, 99, 100, 101, 10_000]) == [0.5, 0.5, 0.5, 0.0, 0.0, 0.0]
  chex.assert_type(schedule(0), jnp.float32)
  # Steps may be arrays, e.g. an optimizer's count.
  np.testing.assert_array_equal(schedule(jnp.arange(98, 102)), [0.5, 0.5, 0.0, 0.0])
  assert values(schedules.early_dropout(0.5, until_step=0), [0, 5]) == [0.0, 0.0]


def test_linear_ramp_values():
  schedule = schedules.linear_ramp(0.0, 0.4, transition_steps=100, transition_begin=10)
  got = values(schedule, [0, 10, 35, 60, 110, 1000])
  np.testing.assert_allclose(got, [0.0, 0.0, 0.1, 0.2, 0.4, 0.4], rtol=1e-6, atol=1e-7)
  assert got[-1] == np.float32(0.4)  # the end is reached exactly
  down = schedules.linear_ramp(0.5, 0.1, transition_steps=4)
  np.testing.assert_allclose(values(down, range(6)), [0.5, 0.4, 0.3, 0.2, 0.1, 0.1], rtol=1e-6)
  chex.assert_type(down(0), jnp.float32)


def test_linear_ramp_of_no_steps_jumps_to_the_end():
  # optax.linear_schedule with 0 steps would hold `start` forever.
  schedule = schedules.linear_ramp(0.0, 0.3, transition_steps=0, transition_begin=5)
  np.testing.assert_allclose(values(schedule, [0, 4, 5, 100]), [0.0, 0.0, 0.3, 0.3])


@pytest.mark.parametrize(
    "make, error, name",
    [
        (lambda: schedules.constant(1.5), ValueError, "rate"),
        (lambda: schedules.constant(jnp.float32(0.1)), TypeError, "rate"),
        (lambda: schedules.early_dropout(-0.1, 10), ValueError, "rate"),
        (lambda: schedules.early_dropout(0.1, -1), ValueError, "until_step"),
        (lambda: schedules.early_dropout(0.1, 10.0), TypeError, "until_step"),
        (lambda: schedules.linear_ramp(0.0, float("nan"), 10), ValueError, "end"),
        (lambda: schedules.linear_ramp(2.0, 0.1, 10), ValueError, "start"),
        (lambda: schedules.linear_ramp(0.0, 0.1, -1), ValueError, "transition_steps"),
        (lambda: schedules.linear_ramp(0.0, 0.1, 10, 2.5), TypeError, "transition_begin"),
        # Steps are int32: a bound past 2**31 - 1 could never be compared.
        (lambda: schedules.early_dropout(0.1, until_step=2**40), ValueError, "until_step"),
        (lambda: schedules.linear_ramp(0.0, 0.1, 2**31), ValueError, "transition_steps"),
        (lambda: schedules.linear_ramp(0.0, 0.1, 2**30, 2**30), ValueError, "transition_begin"),
    ],
)
def test_bad_arguments(make, error, name):
  with pytest.raises(error, match=name):
    make()


@pytest.mark.parametrize(
    "schedule",
    [
        schedules.early_dropout(0.5, until_step=3),
        schedules.linear_ramp(0.0, 0.5, transition_steps=4),
    ],
    ids=["early_dropout", "linear_ramp"],
)
def test_jitted_step_with_a_scheduled_rate_does_not_retrace(schedule):
  traces = 0
  x = jnp.ones(4096)

  @jax.jit
  def step(key, step, x):
    nonlocal traces
    traces += 1
    return jaxdrop.dropout(jax.random.fold_in(key, step), x, schedule(step))

  key = jax.random.key(0)
  for i in range(6):
    y = step(key, jnp.int32(i), x)
    rate = float(schedule(i))
    expected = jaxdrop.dropout(jax.random.fold_in(key, i), x, rate)
    np.testing.assert_array_equal(y == 0, expected == 0)
    np.testing.assert_allclose(y, expected, rtol=1e-6)
    if rate == 0:
      np.testing.assert_array_equal(y, x)
  assert traces == 1
