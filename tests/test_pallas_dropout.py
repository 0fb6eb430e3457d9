"""The Pallas fast-mode kernel, in the Pallas interpreter, against jaxdrop.dropout(bits=16).

The kernel is a benchmark prototype (``benchmarks/pallas_dropout.py``), not part of the package.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cuda_lowering

import jaxdrop

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import pallas_dropout as pd  # noqa: E402  (benchmarks/ is a folder of scripts)

KEY = jax.random.key(21)
BLOCK = 256  # small programs, so that the tests cover many of them and a tail


def _x(shape, dtype):
  return jax.random.normal(jax.random.key(3), shape, jnp.float32).astype(dtype)


def _value_and_grad(fn, x, rate):
  g = jax.random.normal(jax.random.key(4), x.shape, jnp.float32).astype(x.dtype)

  def run(x, rate):
    y, vjp = jax.vjp(lambda x: fn(KEY, x, rate), x)
    return y, vjp(g)[0]

  if isinstance(rate, float):
    return jax.jit(lambda x: run(x, rate))(x)
  return jax.jit(run)(x, rate)


def _kernel(key, x, rate):
  return pd.dropout16(key, x, rate, block=BLOCK, interpret=True)


def _xla(key, x, rate):
  return jaxdrop.dropout(key, x, rate, bits=16)


@pytest.mark.parametrize(
    "shape, dtype, rate",
    [
        ((8, 256), jnp.float32, 0.1),  # whole blocks
        ((7, 93), jnp.float32, 0.5),  # a tail: 651 elements, not a multiple of 4
        ((3, 5, 64), jnp.bfloat16, 0.3),
        ((1000,), jnp.float16, jnp.float32(0.25)),  # a traced rate
    ],
)
def test_equals_the_xla_fast_mode_bit_for_bit(shape, dtype, rate):
  x = _x(shape, dtype)
  got = _value_and_grad(_kernel, x, rate)
  want = _value_and_grad(_xla, x, rate)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  kept = float(np.mean(np.asarray(got[0]) != 0))
  assert 0.3 < kept < 0.95  # both outcomes occur


@pytest.mark.parametrize("rate", [jnp.float32(1.0), jnp.float32(-0.5)])
def test_traced_edge_rates_match(rate):
  x = _x((4, 64), jnp.float32)
  got = _value_and_grad(_kernel, x, rate)
  want = _value_and_grad(_xla, x, rate)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_static_rates_deterministic_and_errors():
  x = _x((4, 64), jnp.float32)
  assert pd.dropout16(None, x, 0.0) is x
  assert pd.dropout16(None, x, 0.5, deterministic=True) is x
  np.testing.assert_array_equal(np.asarray(pd.dropout16(None, x, 1.0)), 0)
  with pytest.raises(ValueError, match="block=100"):
    pd.dropout16(KEY, x, 0.5, block=100)
  with pytest.raises(TypeError, match="block=256.0"):
    pd.dropout16(KEY, x, 0.5, block=256.0)
  with pytest.raises(ValueError, match="rate=2"):
    pd.dropout16(KEY, x, 2.0)
  with pytest.raises(ValueError, match="threefry"):
    pd.dropout16(jax.random.key(0, impl="rbg"), x, 0.5, interpret=True)


def test_kernel_lowers_to_triton_for_cuda():
  x = jax.ShapeDtypeStruct((8192, 4096), jnp.bfloat16)
  key_data = jax.ShapeDtypeStruct((2,), jnp.uint32)

  def grad(key_data, x):
    key = jax.random.wrap_key_data(key_data)
    return jax.grad(lambda x: jnp.sum(pd.dropout16(key, x, 0.1).astype(jnp.float32)))(x)

  with cuda_lowering():
    lowered = jax.jit(grad).trace(key_data, x).lower(lowering_platforms=("cuda",))
  text = lowered.as_text()
  # Forward and backward call the same kernel (jax 0.12 lowers it once for both).
  assert text.count("__gpu$xla.gpu.triton") in (1, 2) and "jaxdrop_dropout16" in text
