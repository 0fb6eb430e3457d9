"""Everything lowers for CPU, GPU and TPU: no CPU-only operation slipped in."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxdrop

PLATFORMS = ("cpu", "cuda", "tpu")
X = jnp.ones((8, 16), jnp.float32)
KEY = jax.random.key(0)


def nnx_dropout(key, x):
  return jaxdrop.nnx.Dropout(0.3)(x, rngs=key)


FUNCTIONS = {
    "dropout": lambda key, x: jaxdrop.dropout(key, x, 0.3),
    "dropout_traced_rate": lambda key, x: jaxdrop.dropout(key, x, jnp.float32(0.3)),
    "dropout_grad": jax.grad(lambda key, x: jnp.sum(jaxdrop.dropout(key, x, 0.3)), argnums=1),
    "dropout_bits16": lambda key, x: jaxdrop.dropout(key, x, 0.3, bits=16),
    "dropout_bits16_grad": jax.grad(lambda key, x: jnp.sum(jaxdrop.dropout(key, x, 0.3, bits=16)), argnums=1),
    "keep_mask": lambda key, x: jaxdrop.keep_mask(key, x.shape, 0.3),
    "linen": lambda key, x: jaxdrop.linen.Dropout(0.3).apply({}, x, deterministic=False, rngs={"dropout": key}),
    "nnx": nnx_dropout,
}


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_exports_for_every_platform(name):
  exported = jax.export.export(jax.jit(FUNCTIONS[name]), platforms=PLATFORMS)(KEY, X)
  assert exported.platforms == PLATFORMS
  # The CPU lowering of the exported artifact runs and matches the function.
  np.testing.assert_array_equal(exported.call(KEY, X), FUNCTIONS[name](KEY, X))
