"""Tests of the 16-bit fast mode (``bits=16``): four decisions per hash."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxdrop
from oracles import assert_binomial_fraction, p_keep
from oracles import reference_keep16 as reference_keep

# Sharding and export of the fast mode: rows of test_sharding.py and
# test_export.py; the modules: the Dropout_bits16 row of conftest.MODULES.


# (3, 64) and (2, 3, 96) hold whole words per row: their words are packed in rows.
@pytest.mark.parametrize(
    "shape", [(1,), (7,), (64,), (3, 33), (128, 5), (3, 64), (2, 3, 96), (3, 0), (0,), ()], ids=str
)
@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_mask_is_the_documented_mapping_of_uint64_bits(shape, rate):
  key = jax.random.key(3)
  np.testing.assert_array_equal(
      jaxdrop.keep_mask(key, shape, rate, bits=16), reference_keep(key, shape, rate)
  )


def test_traced_rate_gives_the_same_mask_for_exact_rates():
  key = jax.random.key(4)
  f = jax.jit(lambda k, r: jaxdrop.keep_mask(k, (96,), r, bits=16))
  for rate in (0.25, 0.5, 0.75):
    np.testing.assert_array_equal(f(key, jnp.float32(rate)), reference_keep(key, (96,), rate))
  assert not np.any(f(key, jnp.float32(1.0)))
  assert np.all(f(key, jnp.float32(0.0)))


def test_dropout_uses_the_mask_and_the_exact_quantized_scale():
  key = jax.random.key(5)
  x = jnp.arange(1.0, 321.0).reshape(10, 32)
  rate = 0.3
  scale = np.float32(1 / p_keep(rate, 16))
  expected = np.where(reference_keep(key, x.shape, rate), np.asarray(x) * scale, 0)
  np.testing.assert_array_equal(jaxdrop.dropout(key, x, rate, bits=16), expected)


def test_broadcast_dims_use_the_mask_shape():
  key = jax.random.key(6)
  x = jnp.ones((8, 5, 3))
  y = jaxdrop.dropout(key, x, 0.5, broadcast_dims=(1,), bits=16)
  keep = reference_keep(key, (8, 1, 3), 0.5)
  np.testing.assert_array_equal(y != 0, np.broadcast_to(keep, x.shape))


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_keep_fraction_within_binomial_bound(rate):
  n = 200_000
  kept = int(jnp.sum(jaxdrop.keep_mask(jax.random.key(8), (n,), rate, bits=16)))
  assert_binomial_fraction(kept, n, p_keep(rate, 16))


@pytest.mark.parametrize("shape", [(64,), (4, 64)], ids=str)
def test_gradient_recomputes_the_mask(shape):
  key = jax.random.key(9)
  x = jnp.arange(1.0, 1.0 + math.prod(shape)).reshape(shape)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(jaxdrop.dropout(key, x, 0.5, bits=16))))(x)
  np.testing.assert_array_equal(grad, jnp.where(reference_keep(key, shape, 0.5), 2.0, 0.0))


def test_bf16_stays_bf16():
  y = jaxdrop.dropout(jax.random.key(0), jnp.ones(100, jnp.bfloat16), 0.5, bits=16)
  assert y.dtype == jnp.bfloat16


@pytest.mark.parametrize("bits, error", [(8, ValueError), (64, ValueError), (16.0, TypeError), (True, TypeError)])
def test_bad_bits(bits, error):
  with pytest.raises(error, match="bits"):
    jaxdrop.dropout(jax.random.key(0), jnp.ones(3), 0.5, bits=bits)
  with pytest.raises(error, match="bits"):
    jaxdrop.linen.Dropout(0.5, bits=bits)
  with pytest.raises(error, match="bits"):
    jaxdrop.nnx.Dropout(0.5, bits=bits, rngs=nnx.Rngs(dropout=0))


def test_fast_mode_needs_a_threefry_key():
  with pytest.raises(ValueError, match="'rbg'"):
    jaxdrop.dropout(jax.random.key(0, impl="rbg"), jnp.ones(3), 0.5, bits=16)
