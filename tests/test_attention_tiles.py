"""The blockwise path's tiles: chosen per call so that any length pads little."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdrop
from jaxdrop._attention import xla

DEFAULT = xla.BlockSizes()


def _padded(length: int, tile: int) -> int:
  return -(-length // tile) * tile


def test_tiles_are_as_few_as_the_defaults_and_pad_less_than_an_alignment_each():
  for length in range(1, 4200):
    blocks = xla.BlockSizes.for_shape(length, length)
    for tile, largest, multiple in ((blocks.q, DEFAULT.q, 8), (blocks.k, DEFAULT.k, 32)):
      tiles = -(-length // largest)
      assert tile <= largest, (length, blocks)
      assert -(-length // tile) == tiles, (length, blocks)
      assert _padded(length, tile) - length < tiles * multiple, (length, blocks)
    assert blocks.k % 32 == 0, (length, blocks)
    assert blocks.q % 8 == 0 or blocks.q == length, (length, blocks)  # One tile: the length.


def test_a_length_just_past_a_tile_pads_a_few_rows_not_a_tile():
  """ViT's 1024 patches + 1 class token: the tiled area grows 5 %, not 87 % (1280 x 1536)."""
  tiled = {t: xla.BlockSizes.for_shape(t, t) for t in (1024, 1025)}
  area = {t: _padded(t, b.q) * _padded(t, b.k) for t, b in tiled.items()}
  assert area[1024] == 1024 * 1024
  assert area[1025] / area[1024] < 1.05


@pytest.mark.parametrize("length", [257, 300, 1025])
@pytest.mark.parametrize("is_causal", [False, True])
def test_ragged_lengths_equal_the_reference_with_the_same_mask(length, is_causal):
  """Default tiles at lengths that are no multiple of them: the output of the materialized
  reference, whose mask is the documented one (a different mask would change the output)."""
  rng = np.random.default_rng(length)
  q, k, v = (jnp.asarray(rng.normal(size=(1, length, 2, 8)), jnp.float32) for _ in range(3))
  kwargs = dict(dropout_rate=0.2, dropout_key=jax.random.key(3), is_causal=is_causal)
  out = {
      impl: jaxdrop.dot_product_attention(q, k, v, implementation=impl, **kwargs)
      for impl in ("xla", "reference")
  }
  np.testing.assert_allclose(out["xla"], out["reference"], atol=2e-5, rtol=2e-5)
