"""Tests of jaxdrop.checks: they pass on real dropout and catch wrong outputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdrop
from jaxdrop import checks
from oracles import p_keep

X = jnp.arange(1.0, 2001.0)
KEY = jax.random.key(0)


@pytest.mark.parametrize("bits", [32, 16])
@pytest.mark.parametrize("rate", [0.0, 0.1, 0.3, 0.5, 0.9, 1.0])
def test_real_dropout_passes(rate, bits):
  checks.assert_dropout_output(X, jaxdrop.dropout(KEY, X, rate, bits=bits), rate, bits=bits)


def test_fast_mode_output_needs_bits_16():
  # The fast mode's scale is 1 / p_keep of the 16-bit threshold: a check in
  # the default mode sees kept elements off by more than rounding.
  x = jax.random.normal(jax.random.key(1), (4096,))
  y = jaxdrop.dropout(KEY, x, 0.3, bits=16)
  checks.assert_dropout_output(x, y, 0.3, bits=16)
  with pytest.raises(AssertionError, match="neither 0 nor x / p_keep"):
    checks.assert_dropout_output(x, y, 0.3)


def test_broadcast_output_passes_and_unshared_mask_fails():
  x = jnp.ones((40, 30))
  checks.assert_dropout_output(
      x, jaxdrop.dropout(KEY, x, 0.5, broadcast_dims=(1,)), 0.5, broadcast_dims=(1,)
  )
  with pytest.raises(AssertionError, match="share a mask"):
    checks.assert_dropout_output(x, jaxdrop.dropout(KEY, x, 0.5), 0.5, broadcast_dims=(1,))


def test_wrong_scale_fails_with_numbers():
  y = jnp.where(jaxdrop.keep_mask(KEY, X.shape, 0.5), X / 0.6, 0.0)
  with pytest.raises(AssertionError, match=r"neither 0 nor x / p_keep.*x=1\.0"):
    checks.assert_dropout_output(X, y, 0.5)


def test_wrong_keep_fraction_fails_with_sigma():
  y = jaxdrop.dropout(KEY, X, 0.5)
  with pytest.raises(AssertionError, match=r"keep fraction .*σ"):
    checks.assert_dropout_output(X, y.at[:1000].set(0.0), 0.5)


def test_shape_and_dtype_are_checked():
  with pytest.raises(AssertionError):
    checks.assert_dropout_output(X, X[:10], 0.5)
  with pytest.raises(AssertionError):
    checks.assert_dropout_output(X, X.astype(jnp.bfloat16), 0.5)


def test_keep_fraction_ignores_zero_inputs_and_works_under_jit():
  x = jnp.array([0.0, 1.0, 1.0, 1.0, 1.0])
  y = jnp.array([0.0, 2.0, 0.0, 2.0, 2.0])
  assert float(jax.jit(checks.keep_fraction)(x, y)) == 0.75


def test_assert_keep_fraction_bound_is_k_sigma():
  bound = checks.keep_fraction_bound(0.5, 10_000, k=4.0)
  assert bound == pytest.approx(4 * np.sqrt(0.25 / 10_000))
  p = p_keep(0.1, 16)  # The fast mode's quantized keep probability.
  assert checks.keep_fraction_bound(0.1, 100, bits=16) == pytest.approx(4 * np.sqrt(p * (1 - p) / 100))
  checks.assert_keep_fraction(0.5 + 0.99 * bound, 0.5, 10_000)
  with pytest.raises(AssertionError, match="n=10000"):
    checks.assert_keep_fraction(0.5 + 1.01 * bound, 0.5, 10_000)
  with pytest.raises(AssertionError):
    checks.assert_keep_fraction(float("nan"), 0.5, 10_000)


def test_bad_arguments():
  with pytest.raises(ValueError, match="n=0"):
    checks.keep_fraction_bound(0.5, 0)
  with pytest.raises(TypeError, match="n=10.0"):
    checks.keep_fraction_bound(0.5, 10.0)
  with pytest.raises(ValueError, match="k=0"):
    checks.keep_fraction_bound(0.5, 10, k=0)
  with pytest.raises(ValueError, match="rate="):
    checks.keep_fraction_bound(1.5, 10)
  with pytest.raises(TypeError, match="rate="):
    checks.assert_keep_fraction(0.5, jnp.float32(0.5), 10)
  with pytest.raises(ValueError, match="bits=8"):
    checks.assert_dropout_output(X, X, 0.5, bits=8)
