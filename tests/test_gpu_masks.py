"""On a GPU, the elementwise masks are the ones the CPU suite checks, bit for bit.

``pytest -m gpu tests/`` runs these on a device (``benchmarks/run_gpu.sh``);
elsewhere they are skipped, and ``test_dropout.py`` and ``test_fast_mode.py``
check the same identities on CPU. The shapes include rows of whole packed
fast-mode words, (1000, 64), which the fast mode lays out differently.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles import reference_keep16, threshold

import jaxdrop

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")]

KEY = jax.random.key(42)
SHAPES = [(7,), (1000, 33), (1000, 64), (2**20,), (3, 5, 7)]


@pytest.mark.parametrize("shape", SHAPES)
def test_keep_mask_is_the_threshold_of_jax_random_bits(shape):
  expected = jax.random.bits(KEY, shape, jnp.uint32) >= np.uint32(threshold(0.3))
  np.testing.assert_array_equal(jaxdrop.keep_mask(KEY, shape, 0.3), expected)


@pytest.mark.parametrize("shape", SHAPES)
def test_fast_mode_mask_is_the_documented_mapping(shape):
  np.testing.assert_array_equal(jaxdrop.keep_mask(KEY, shape, 0.3, bits=16),
                                reference_keep16(KEY, shape, 0.3))


@pytest.mark.parametrize("bits", [32, 16])
def test_gradient_mask_is_the_forward_mask(bits):
  x = jnp.arange(1.0, 1025.0)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(jaxdrop.dropout(KEY, x, 0.5, bits=bits))))(x)
  np.testing.assert_array_equal(grad != 0, jaxdrop.keep_mask(KEY, x.shape, 0.5, bits=bits))
