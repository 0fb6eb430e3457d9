"""The attention calls the tests run on every implementation: one :class:`Case` each.

A case is the shapes ``[B, T, N, H]`` / ``[B, S, K, H]``, the options (causal,
bias, mask, rate, one shared mask) and the tile sizes each blockwise
implementation runs it with. ``test_attention_suite.py`` runs every case on
``"xla"``, on the Pallas kernels in the interpreter and, under the ``gpu``
marker, on a GPU, against ``"reference"``; other tests take a case's arrays.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxdrop._attention import base
from jaxdrop._attention import pallas_triton as pt
from jaxdrop._attention import xla

KEY = jax.random.key(7)
KEY_DATA = jax.random.key_data(KEY)

# The interpreter's tiles: 16 x 16 everywhere, and larger, unequal ones (32 rows
# per forward program, mixed in the backward).
PALLAS_BLOCKS = pt.BlockSizes(q=16, k=16, q_dkv=16, k_dkv=16, q_dq=16, k_dq=16)
PALLAS_BLOCKS_MIXED = pt.BlockSizes(q=32, k=16, q_dkv=16, k_dkv=32, q_dq=32, k_dq=16)
# The interpreter turns each kernel into a large XLA program; compiling it
# without LLVM's optimizations halves its time.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@dataclasses.dataclass(frozen=True)
class Case:
  """One attention call.

  Attributes:
    name: the test id.
    batch, rows, cols, heads, kv_heads, head_dim: B, T, S, N, K, H.
    causal: ``is_causal``.
    bias: None, or the shape (broadcastable to ``[B, N, T, S]``) of a normal bias.
    mask: None; a shape broadcastable to ``[B, N, T, S]`` for a random mask
      (70 % allowed, key 0 always); ``"key_padding"`` (batch element 1 attends
      only its first S - 20 keys); or ``"dead_row"`` (the last 5 keys masked
      everywhere and query row 3 masked entirely: it attends nothing).
    rate: the static dropout rate (0 is no dropout).
    shared: one dropout mask for every batch element and head.
    scale: the score scale; None is ``1 / sqrt(H)``.
    xla_blocks: the tiles of ``"xla"``; None is its default for the shape.
    pallas_blocks: the tiles of the Pallas kernels in the interpreter (on a
      GPU they run with their defaults, as a user gets them).
  """

  name: str
  batch: int = 2
  rows: int = 13
  cols: int = 40
  heads: int = 4
  kv_heads: int = 2
  head_dim: int = 16
  causal: bool = False
  bias: tuple[int, ...] | None = None
  mask: tuple[int, ...] | str | None = None
  rate: float = 0.3
  shared: bool = False
  scale: float | None = None
  xla_blocks: xla.BlockSizes | None = None
  pallas_blocks: pt.BlockSizes = PALLAS_BLOCKS

  def arrays(self, dtype=jnp.float32):
    """``(q, k, v, bias, mask, d_out)``: the inputs, in ``dtype``, and a float32
    output cotangent; the same values for every dtype."""
    rng = np.random.default_rng(0)
    normal = lambda *shape: rng.standard_normal(shape, np.float32)
    q = normal(self.batch, self.rows, self.heads, self.head_dim)
    k = normal(self.batch, self.cols, self.kv_heads, self.head_dim)
    v = normal(self.batch, self.cols, self.kv_heads, self.head_dim)
    d_out = normal(self.batch, self.rows, self.heads, self.head_dim)
    bias = None if self.bias is None else jnp.asarray(normal(*self.bias), dtype)
    q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
    return q, k, v, bias, self._mask(rng), jnp.asarray(d_out)

  def _mask(self, rng) -> jax.Array | None:
    position = np.arange(self.cols)
    if self.mask is None:
      return None
    if self.mask == "key_padding":
      lengths = np.array([self.cols, self.cols - 20])[:self.batch]
      return jnp.asarray((position < lengths[:, None])[:, None, None, :])
    if self.mask == "dead_row":
      mask = np.broadcast_to(position < self.cols - 5, (self.batch, 1, self.rows, self.cols))
      mask = mask.copy()
      mask[:, :, 3] = False
      return jnp.asarray(mask)
    mask = rng.random(self.mask) > 0.3
    mask[..., 0] = True  # Every row attends somewhere.
    return jnp.asarray(mask)

  def config(self, dtype=jnp.float32) -> base.Config:
    """The static configuration; float32 products at full precision (a GPU's
    default TF32 would round them to 10 bits)."""
    return base.Config(
        scale=self.head_dim**-0.5 if self.scale is None else self.scale,
        is_causal=self.causal,
        dropout_heads=(1, 1) if self.shared else (self.batch, self.heads),
        fixed_rate=self.rate,
        precision=jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None,
    )

  def bias_and_mask_4d(self, bias, mask):
    """``bias`` and ``mask`` as the implementations take them: 4-D or None."""
    expand = lambda x: None if x is None else x.reshape((1,) * (4 - x.ndim) + x.shape)
    return expand(bias), expand(mask)


CASES = {case.name: case for case in [
    Case("plain", xla_blocks=xla.BlockSizes(q=5, k=32)),
    Case("causal", causal=True, xla_blocks=xla.BlockSizes(q=5, k=32)),
    Case("padding_mask", mask=(2, 1, 1, 40)),
    Case("full_mask_and_bias", bias=(2, 4, 13, 40), mask=(2, 4, 13, 40),
         xla_blocks=xla.BlockSizes(q=16, k=32)),
    Case("broadcast_bias_causal", causal=True, bias=(1, 4, 1, 40),
         xla_blocks=xla.BlockSizes(q=16, k=32)),
    Case("gqa_t_longer", rows=70, heads=6, causal=True, xla_blocks=xla.BlockSizes(q=16, k=32)),
    Case("mha", heads=3, kv_heads=3, bias=(13, 40)),
    Case("one_key", cols=1, bias=(1, 4, 13, 1), xla_blocks=xla.BlockSizes(q=5, k=32)),
    Case("one_query_three_keys", rows=1, cols=3, causal=True, mask=(2, 1, 1, 3)),
    # GQA, T != S (neither a tile multiple), a per-head bias, a padded key tail and a
    # query row that attends nothing.
    Case("gqa_bias_dead_row", batch=1, rows=40, cols=24, rate=0.2, bias=(1, 4, 40, 24),
         mask="dead_row", scale=0.3),
    # Causal, key padding, a bias broadcast over heads and rows, one shared mask,
    # unequal Pallas tiles.
    Case("causal_shared_row_bias", rows=48, cols=48, heads=2, kv_heads=2, head_dim=32,
         causal=True, bias=(2, 1, 1, 48), mask="key_padding", shared=True, scale=0.3,
         pallas_blocks=PALLAS_BLOCKS_MIXED),
    # Causal with T > S, no dropout, head dim 64.
    Case("causal_no_dropout_h64", batch=1, rows=40, cols=24, heads=2, kv_heads=1,
         head_dim=64, causal=True, rate=0.0, scale=0.3),
    # Head dim 24, zero-padded to 32 by the kernels and sliced back.
    Case("h24_padded", batch=1, rows=24, cols=40, heads=2, kv_heads=1, head_dim=24,
         rate=0.2, bias=(1, 2, 24, 40), scale=0.3),
]}


def assert_close(actual, expected, tol: float):
  """|actual - expected| <= tol * (1 + max|expected|), elementwise, and finite."""
  actual = np.asarray(actual, np.float32)
  expected = np.asarray(expected, np.float32)
  assert actual.shape == expected.shape
  assert np.all(np.isfinite(actual))
  bound = tol * (1 + np.max(np.abs(expected), initial=0))
  np.testing.assert_allclose(actual, expected, rtol=0, atol=bound)
