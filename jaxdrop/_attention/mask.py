"""The attention dropout mask, one definition shared by every implementation.

An attention weight ``(b, n, t, s)`` of a ``[B, N, T, S]`` mask is kept when an
8-bit random value is at least the threshold ``t8 = round(rate * 256)`` (at
most 255 for a rate below 1). The values come from Threefry-2x32 in the form
of ``jax.random``:

  head_key = jax.random.fold_in(key, b * N + n)
  u = jax.random.bits(head_key, (T, ceil(S / 8)), jnp.uint64)
  byte = (u[t, s // 8] >> (56 - 8 * (s % 8))) & 0xFF
  keep = byte >= t8

One 64-bit hash decides eight consecutive weights of a row, most significant
byte first. Every implementation (materialized, blockwise, fused kernel)
computes exactly these bits for any block size, device count or sharding;
heads and batch elements are independent through ``fold_in``.

Why 8 bits: the hash, not the matmuls, bounds a fused kernel. A full hash per
weight costs more integer work than the attention matmuls spend per weight;
eight decisions per hash make it a small fraction. The price is that the keep
probability is quantized to multiples of 1/256: ``p_keep = (256 - t8) / 256``
(0.8984375 for rate 0.1), and survivors are scaled by exactly ``1 / p_keep``,
so the expected output is still exactly the output without dropout.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxdrop import _dropout
from jaxdrop import _validate
from jaxdrop import _threefry

BITS = 8  # bits per decision.
LANES = 64 // BITS  # decisions per 64-bit hash.
WORD = 32  # decisions packed per uint32 word between fusions; tiles are whole words.
_MAX_COUNTER = 2**32  # counters t * ceil(S / 8) + g must fit one uint32 word.


def check_size(rows: int, cols: int) -> None:
  """Raises if a head's ``rows x cols`` mask needs 64-bit counters."""
  if rows * math.ceil(cols / LANES) >= _MAX_COUNTER:
    raise ValueError(
        f"attention dropout supports T * ceil(S / {LANES}) < 2**32 per head, got "
        f"T={rows}, S={cols}"
    )


def head_keys(key_data: jax.Array, batch: int, heads: int) -> jax.Array:
  """uint32[batch, heads, 2]: ``fold_in(key, b * heads + n)`` for every head.

  Built from iotas, so a computation sharded over batch or heads derives only
  its own keys.
  """
  index = (
      jax.lax.broadcasted_iota(jnp.uint32, (batch, heads), 0) * np.uint32(heads)
      + jax.lax.broadcasted_iota(jnp.uint32, (batch, heads), 1)
  )
  k0, k1 = _threefry.threefry2x32(key_data[0], key_data[1], jnp.zeros((), jnp.uint32), index)
  return jnp.stack([k0, k1], axis=-1)


def keep_block(
    keys: jax.Array,
    row_start: jax.Array | int,
    rows: int,
    col_start: jax.Array | int,
    cols: int,
    groups_per_row: int,
    threshold: jax.Array,
    keep_any: jax.Array,
) -> jax.Array:
  """bool[..., rows, cols]: the mask on a block of every head in ``keys``.

  Args:
    keys: uint32[..., 2] head keys from :func:`head_keys` (any leading shape).
    row_start: the first query position ``t`` of the block.
    rows: the number of query positions.
    col_start: the first key position ``s``; a multiple of ``WORD``.
    cols: the number of key positions; a multiple of ``WORD``.
    groups_per_row: ``ceil(S / LANES)`` of the whole mask (not of the block).
    threshold: the uint32 threshold ``t8``.
    keep_any: False when the rate is 1.
  """
  packed = _packed_block(keys, row_start, rows, col_start, cols, groups_per_row, threshold)
  offset = jax.lax.broadcasted_iota(jnp.uint32, packed.shape + (WORD,), packed.ndim)
  keep = ((packed[..., None] >> offset) & np.uint32(1)) != 0
  return keep.reshape(packed.shape[:-1] + (cols,)) & keep_any


def _packed_block(keys, row_start, rows, col_start, cols, groups_per_row, threshold):
  """uint32[..., rows, cols // 32]: bit ``j % 32`` of word ``j // 32`` keeps column ``j``.

  Each element of the ``[rows, cols // 32, 4]`` hash array makes its eight
  decisions from its own 64 bits, and a reduction ORs four hashes into a word.
  The reduction ends the fusion, so each hash is computed once; an
  elementwise expansion to one value per weight would be fused into its
  consumer, which would recompute the hash for each of the eight weights.
  """
  shape = (rows, cols // WORD, WORD // LANES)
  t = jax.lax.broadcasted_iota(jnp.uint32, shape, 0) + jnp.asarray(row_start, jnp.uint32)
  hash_in_word = jax.lax.broadcasted_iota(jnp.uint32, shape, 2)
  g = (
      jax.lax.broadcasted_iota(jnp.uint32, shape, 1) * np.uint32(WORD // LANES)
      + hash_in_word
      + jnp.asarray(col_start, jnp.uint32) // np.uint32(LANES)
  )
  counter = t * np.uint32(groups_per_row) + g
  k0 = keys[..., 0][..., None, None, None]
  k1 = keys[..., 1][..., None, None, None]
  hi, lo = _threefry.threefry2x32(k0, k1, jnp.zeros((), jnp.uint32), counter)
  bits = jnp.zeros(hi.shape, jnp.uint32)
  for lane in range(LANES):  # Most significant byte first.
    word = hi if lane < 4 else lo
    byte = (word >> np.uint32(24 - 8 * (lane % 4))) & np.uint32(0xFF)
    bits = bits | ((byte >= threshold).astype(jnp.uint32) << np.uint32(lane))
  bits = bits << (hash_in_word * np.uint32(LANES))
  return jax.lax.reduce(bits, np.uint32(0), jax.lax.bitwise_or, (bits.ndim - 1,))


def resolve_rate(rate, dtype=jnp.float32) -> _dropout._Threshold:
  """The threshold, keep flag and exact inverse scale of ``rate`` for 8-bit decisions."""
  return _dropout.resolve_rate(rate, dtype, BITS)


def keep_probability(rate: float) -> float:
  """The exact keep probability of a static ``rate`` under the 8-bit mask."""
  return _dropout.quantize_rate(rate, BITS)[1]


def attention_keep_mask(
    dropout_key: jax.typing.ArrayLike,
    shape: tuple[int, int, int, int],
    dropout_rate: float | jax.typing.ArrayLike,
) -> jax.Array:
  """The attention dropout mask (True = kept) of :func:`jaxdrop.dot_product_attention`.

  For ``shape = (B, N, T, S)``, weight ``(b, n, t, s)`` is kept when::

    byte = (u[t, s // 8] >> (56 - 8 * (s % 8))) & 0xFF >= round(rate * 256)
    u = jax.random.bits(jax.random.fold_in(key, b * N + n), (T, ceil(S / 8)), jnp.uint64)

  (the threshold is capped at 255 for a rate below 1; rate 1 keeps nothing; the
  ``jax.random`` form assumes the default ``jax_threefry_partitionable=True``).
  The keep probability is exactly ``(256 - t8) / 256``, and
  ``dot_product_attention`` scales kept weights by its inverse. Every
  implementation uses this mask, whatever its block size or sharding. A shape
  with ``B = N = 1`` gives the single mask that flax's
  ``broadcast_dropout=True`` shares across batch and heads.

  Args:
    dropout_key: a threefry PRNG key (``jax.random.key``, the default
      implementation, or a legacy ``PRNGKey``).
    shape: ``(B, N, T, S)``.
    dropout_rate: probability to drop a weight; a float in [0, 1] or a scalar
      array (a traced rate outside [0, 1] gives an all-False mask).

  Returns:
    bool[B, N, T, S].

  Examples:
    >>> import jax, jaxdrop
    >>> keep = jaxdrop.attention_keep_mask(jax.random.key(0), (1, 2, 4, 16), 0.5)
    >>> keep.shape, keep.dtype
    ((1, 2, 4, 16), dtype('bool'))
  """
  shape = _validate.check_shape(shape, "shape")
  if len(shape) != 4:
    raise ValueError(f"shape must be (B, N, T, S), got shape={shape}")
  fixed = _validate.static_rate(dropout_rate, "dropout_rate")
  if fixed == 0.0:
    return jnp.ones(shape, bool)
  if fixed == 1.0:
    return jnp.zeros(shape, bool)
  key_data = threefry_key_data(dropout_key)
  check_size(shape[2], shape[3])
  rate = None if fixed is not None else dropout_rate  # A static rate rounds on the host.
  return _mask(key_data, rate, shape=shape, fixed_rate=fixed)


def threefry_key_data(key, name: str = "dropout_key") -> jax.Array:
  """The uint32[2] data of a single threefry key; errors name the argument ``name``."""
  typed = _validate.typed_key(key, name)
  impl = str(jax.random.key_impl(typed))
  if impl != _dropout._THREEFRY:
    raise ValueError(
        f"{name}: attention dropout needs a threefry2x32 key (jax.random.key's "
        f"default), got a {impl!r} key"
    )
  return jax.random.key_data(typed)


def full_mask(key_data: jax.Array, resolved, shape: tuple[int, int, int, int]) -> jax.Array:
  """bool[shape]: the whole mask at once (``resolved`` from :func:`resolve_rate`)."""
  batch, heads, rows, cols = shape
  padded = math.ceil(cols / WORD) * WORD
  keep = keep_block(
      head_keys(key_data, batch, heads), 0, rows, 0, padded, math.ceil(cols / LANES),
      resolved.threshold, resolved.keep_any,
  )
  return keep[..., :cols]


@partial(jax.jit, static_argnames=("shape", "fixed_rate"))
def _mask(key_data, rate, *, shape, fixed_rate):
  resolved = resolve_rate(rate if fixed_rate is None else fixed_rate)
  return full_mask(key_data, resolved, shape) & resolved.valid
