"""How a key and a rate become keep decisions: every dropout mask of jaxdrop, defined once.

An element is kept when a ``bits``-bit random value ``u`` is at least the
integer threshold ``t`` of the rate (:func:`quantize_rate`), so it is kept with
probability exactly ``p_keep = (2**bits - t) / 2**bits``, and dropout scales
survivors by exactly ``1 / p_keep``. Three layouts say where each ``u`` comes
from; each has its XLA form and, where a Pallas kernel computes it, its
in-kernel form, side by side below:

- 32 bits, ``jaxdrop.dropout``'s default: ``u`` is
  ``jax.random.bits(key, shape, jnp.uint32)``, fused for threefry keys
  (:func:`random_bits`). No kernel computes it.
- 16 bits, the fast mode (``bits=16``): one 64-bit Threefry output decides four
  consecutive elements (:func:`packed_keep16`; in a kernel :func:`keep16_tile`).
- 8 bits, attention: one 64-bit output of a head's key decides eight
  consecutive weights of a row (:func:`keep8_block`; in a kernel
  :func:`keep8_tile`).

Which units a key, shape and rate drop is the library's compatibility promise:
changing any of these is a breaking change (CHANGELOG.md), and
tests/test_masks.py pins the bits. :mod:`jaxdrop._threefry` is the bare hash
underneath; :mod:`jaxdrop._dropout` and :mod:`jaxdrop._attention` apply these
masks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdrop import _threefry
from jaxdrop._validate import check_bits
from jaxdrop._validate import check_shape
from jaxdrop._validate import split_key
from jaxdrop._validate import static_rate
from jaxdrop._validate import typed_key

THREEFRY = "threefry2x32"
WORD = 32  # decisions packed per uint32 word between two XLA fusions (16 and 8 bits).
_U32 = jnp.uint32


# ----------------------------------------------------------------------------
# Rate to threshold, for every width.


class Threshold(NamedTuple):
  """A resolved rate: what a mask and its scaling need, all scalars."""

  threshold: jax.Array  # uint32: keep when bits >= threshold.
  keep_any: jax.Array  # bool: False when rate == 1 (t would be 2**bits).
  scale: jax.Array  # 1 / p_keep in the compute dtype (0 when rate == 1).
  fill: jax.Array  # value of dropped elements: 0, or NaN for an invalid rate.
  valid: jax.Array  # bool: False for a traced rate outside [0, 1] or NaN.


def compute_dtype(dtype: Any) -> np.dtype:
  """float32, or wider: bf16/f16 inputs are scaled in float32, then cast once."""
  dtype = np.dtype(dtype)
  return dtype if dtype.itemsize >= 4 else np.dtype(np.float32)


def quantize_rate(rate: float, bits: int) -> tuple[int, float]:
  """The integer threshold and exact keep probability of a static ``rate``.

  The one host-side definition of how a rate becomes a mask decision: a
  ``bits``-bit uniform value ``u`` is kept when ``u >= t`` with
  ``t = min(round(rate * 2**bits), 2**bits - 1)`` for ``rate < 1``, so
  ``p_keep = (2**bits - t) / 2**bits`` exactly. Rounding puts ``p_keep`` within
  ``2**-(bits+1)`` of ``1 - rate``, and a rate that close to 1 keeps one value
  in ``2**bits`` rather than rounding to "drop all". ``rate == 1`` gives
  ``t = 2**bits`` and ``p_keep = 0``: nothing is kept.

  Args:
    rate: probability to drop, a Python or NumPy scalar in [0, 1].
    bits: width of each decision's random value (32, 16 or 8).

  Returns:
    ``(t, p_keep)``; survivors are scaled by exactly ``1 / p_keep``.
  """
  fixed = static_rate(rate)
  if fixed is None:
    raise TypeError(f"rate must be a static number for quantize_rate, got {rate!r}")
  levels = 2**bits
  if fixed == 1.0:
    return levels, 0.0
  threshold = min(round(fixed * levels), levels - 1)
  return threshold, (levels - threshold) / levels


def keep_probability(rate: float, bits: int = 32) -> float:
  """The exact probability that dropout keeps an element at a static ``rate``.

  Dropout keeps an element with probability ``p_keep = (2**bits - t) / 2**bits``,
  ``t = min(round(rate * 2**bits), 2**bits - 1)`` for ``rate < 1`` (0 at rate
  1), and scales survivors by exactly ``1 / p_keep``. ``p_keep`` is within
  ``2**-(bits + 1)`` of ``1 - rate``.

  Args:
    rate: probability to drop, a Python or NumPy scalar in [0, 1].
    bits: the mode, 32 (default) or 16 (fast mode), as for :func:`dropout`.

  Returns:
    ``p_keep`` as a Python float.

  Raises:
    ValueError: ``rate`` outside [0, 1] or NaN; ``bits`` not 32 or 16.
    TypeError: ``rate`` is not a static number; ``bits`` not an int.

  Examples:
    >>> import jaxdrop
    >>> jaxdrop.keep_probability(0.5), jaxdrop.keep_probability(0.1, bits=16)
    (0.5, 0.899993896484375)
  """
  return quantize_rate(rate, check_bits(bits))[1]


def resolve_rate(rate: Any, dtype: Any, bits: int = 32) -> Threshold:
  """Threshold, scale and fill for a rate in [0, 1) (static) or any array.

  ``bits`` is the width of the random values compared with the threshold
  (32, 16 or 8), so ``t`` is in [0, 2**bits).
  """
  dtype = compute_dtype(dtype)
  levels = 2**bits
  fixed = static_rate(rate)
  if fixed is not None:
    # Callers return zeros for a static rate of 1 before reaching here; the
    # clamp keeps the threshold in uint32 and the scale finite regardless.
    threshold, p_keep = quantize_rate(min(fixed, 1 - 2**-bits), bits)
    return Threshold(
        threshold=jnp.asarray(threshold, jnp.uint32),
        keep_any=jnp.asarray(True),
        scale=jnp.asarray(1 / p_keep, dtype),
        fill=jnp.zeros((), dtype),
        valid=jnp.asarray(True),
    )
  rate = jax.lax.stop_gradient(jnp.asarray(rate))
  rate = rate.astype(jnp.float64 if rate.dtype == jnp.float64 else jnp.float32)
  valid = (rate >= 0) & (rate <= 1)  # False for NaN.
  keep_any = rate < 1
  # For rate < 1 in float32, rate * 2**32 <= 2**32 - 256: the cast is safe.
  levels = np.asarray(levels, rate.dtype)
  threshold = jnp.minimum(jnp.round(rate * levels), levels - 1)
  threshold = jnp.where(valid & keep_any, threshold, 0)
  p_keep = (levels - threshold) / levels
  scale = jnp.where(keep_any, 1 / p_keep, 0)
  return Threshold(
      threshold=threshold.astype(jnp.uint32),
      keep_any=keep_any,
      scale=jnp.where(valid, scale, jnp.nan).astype(dtype),
      fill=jnp.where(valid, 0, jnp.nan).astype(dtype),
      valid=valid,
  )


def kernel_threshold(resolved: Threshold, bits: int) -> jax.Array:
  """The uint32 threshold a kernel compares with, ``keep_any`` folded in.

  A rate of 1 keeps nothing: its threshold is ``2**bits``, which no
  ``bits``-bit value reaches (16 or 8 bits; 32-bit values would need 2**32).
  """
  return jnp.where(resolved.keep_any, resolved.threshold, np.uint32(2**bits)).astype(_U32)


# ----------------------------------------------------------------------------
# 32 bits: jax.random.bits(key, shape, jnp.uint32) >= t.


def fused_hash(impl: str, shape: tuple[int, ...]) -> bool:
  """Whether :func:`random_bits` hashes in ``jax.numpy`` (else ``jax.random.bits``).

  The fused hash follows JAX's partitionable threefry. With
  ``jax_threefry_partitionable`` switched off (not the default) JAX's bits
  differ, so they come from ``jax.random.bits`` itself.
  """
  return (
      impl == THREEFRY
      and jax.config.jax_threefry_partitionable
      and math.prod(shape) < _threefry.MAX_FUSED_SIZE
  )


def random_bits(key_data: jax.Array, impl: str, shape: tuple[int, ...]) -> jax.Array:
  """``jax.random.bits(key, shape, jnp.uint32)``, fused where possible (:func:`fused_hash`).

  ``key_data`` may also be the uint32[3] key schedule where the hash is fused.
  """
  if fused_hash(impl, shape):
    return _threefry.bits32(key_data, shape)
  key = jax.random.wrap_key_data(key_data, impl=impl)
  return jax.random.bits(key, shape, jnp.uint32)


# ----------------------------------------------------------------------------
# 16 bits: four decisions per hash.
#
# One Threefry call gives 64 bits: ``jax.random.bits(key, (m,), jnp.uint64)``
# is ``hi << 32 | lo`` for counter i. The 16-bit mode spends them on four
# mask elements, most significant lane first:
#
#   lane16[L] = (u64[L // 4] >> (48 - 16 * (L % 4))) & 0xFFFF
#
# XLA computes a fused elementwise expression once per output element, so
# four elements sharing one hash would each recompute it. Instead one fusion
# decides 32 elements per uint32 word (8 hashes, 4 lanes each) and the select
# fusion reads one word per 32 outputs. A kernel computes each hash once and
# lays its lanes out directly (keep16_tile).

LANES_16 = 4


def word_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape of a mask's packed words (row-major, the same words either way).

  Rows of ``shape[-1] // 32`` words where a row holds whole words, so that a
  sharded consumer packs only its own rows and columns; else one row of
  ``ceil(n / 32)`` words.
  """
  if shape and shape[-1] % WORD == 0:
    return shape[:-1] + (shape[-1] // WORD,)
  return (-(-math.prod(shape) // WORD),)


def packed_keep16(
    key_data: jax.Array, shape: tuple[int, ...], threshold: jax.Array, keep_any: jax.Array
) -> jax.Array:
  """uint32[word_shape(shape)]: bit ``L % 32`` of word ``L // 32`` is ``lane16[L] >= t``."""
  hashes_per_word = WORD // LANES_16
  hashes = word_shape(shape) + (hashes_per_word,)
  # Hash g of word w has counter 8w + g and sets bits 4g .. 4g + 3. The
  # counters come from one reshaped iota, as in linear_index: XLA does not
  # hoist them into a GPU kernel and buffer of their own.
  counter = _threefry.linear_index(hashes)
  group = jax.lax.broadcasted_iota(jnp.uint32, hashes, len(hashes) - 1)
  hi, lo = _threefry.threefry2x32(key_data[0], key_data[1], jnp.zeros((), jnp.uint32), counter)
  low16 = np.uint32(0xFFFF)
  lanes = (hi >> np.uint32(16), hi & low16, lo >> np.uint32(16), lo & low16)
  word = jnp.zeros(hashes, jnp.uint32)
  for lane, value in enumerate(lanes):
    keep = ((value >= threshold) & keep_any).astype(jnp.uint32)
    word = word | (keep << (group * np.uint32(LANES_16) + np.uint32(lane)))
  return jax.lax.reduce(word, np.uint32(0), jax.lax.bitwise_or, (len(hashes) - 1,))


def unpack(packed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """bool[shape] whose row-major element ``L`` is bit ``L % 32`` of word ``L // 32``."""
  n = math.prod(shape)
  if n % WORD == 0:
    # A reshape rather than a gather: the consumer reads one word per 32 outputs.
    offset = jax.lax.broadcasted_iota(jnp.uint32, packed.shape + (WORD,), packed.ndim)
    return (((packed[..., None] >> offset) & np.uint32(1)) != 0).reshape(shape)
  index = _threefry.linear_index(shape)
  word = packed[index >> np.uint32(5)]
  return ((word >> (index & np.uint32(31))) & np.uint32(1)) != 0


def keep16_tile(k0, k1, threshold, first_hash, size: int) -> jax.Array:
  """bool[size]: elements ``4 * first_hash + 0 .. size - 1`` of the mask, in a kernel.

  Each of the ``size / 4`` hashes is computed once; its lanes ``hi >> 16,
  hi & 0xFFFF, lo >> 16, lo & 0xFFFF`` become four adjacent elements through
  two two-way joins and a reshape, as the attention kernels lay out their
  bytes. ``threshold`` comes from :func:`kernel_threshold`.

  Args:
    k0, k1: the key's two uint32 words.
    threshold: the uint32 threshold, ``2**16`` for a rate of 1.
    first_hash: the uint32 counter of the tile's first hash.
    size: elements in the tile, a multiple of 4.
  """
  counter = jax.lax.broadcasted_iota(_U32, (size // LANES_16,), 0) + first_hash
  hi, lo = _threefry.threefry2x32(k0, k1, jnp.zeros_like(counter), counter)
  words = jnp.stack([hi, lo], axis=-1)
  lanes = jnp.stack([words >> np.uint32(16), words & np.uint32(0xFFFF)], axis=-1)
  return lanes.reshape(size) >= threshold


# ----------------------------------------------------------------------------
# The elementwise masks (32 and 16 bits) of jaxdrop.dropout and jaxdrop.keep_mask.


class MaskSpec(NamedTuple):
  """What fixes a mask's layout at trace time (hashable, a static argument)."""

  impl: str  # the key's PRNG implementation.
  shape: tuple[int, ...]  # the mask shape.
  bits: int  # 32 or 16: the width of each element's random value.


def mask_spec(impl: str, shape: tuple[int, ...], bits: int) -> MaskSpec:
  """The static mask layout; checks that the fast mode supports the key and size."""
  if bits == 16:
    if impl != THREEFRY or not jax.config.jax_threefry_partitionable:
      raise ValueError(
          f"bits=16 needs a threefry2x32 key with jax_threefry_partitionable on "
          f"(the defaults), got a {impl!r} key; use bits=32"
      )
    if math.prod(shape) >= _threefry.MAX_FUSED_SIZE:
      raise ValueError(f"bits=16 supports masks below 2**32 elements, got shape={shape}")
  return MaskSpec(impl, shape, bits)


def keep(spec: MaskSpec, key_data: jax.Array, resolved: Threshold) -> jax.Array:
  """bool[spec.shape]: the elementwise mask (``resolved`` from :func:`resolve_rate`)."""
  if spec.bits == 16:
    packed = packed_keep16(key_data, spec.shape, resolved.threshold, resolved.keep_any)
    return unpack(packed, spec.shape)
  bits = random_bits(key_data, spec.impl, spec.shape)
  return (bits >= resolved.threshold) & resolved.keep_any


@partial(jax.jit, static_argnames=("spec", "fixed_rate"))
def _keep_mask_kernel(key_data, rate, *, spec, fixed_rate):
  rate = rate if fixed_rate is None else fixed_rate
  resolved = resolve_rate(rate, jnp.float32, spec.bits)
  return keep(spec, key_data, resolved) & resolved.valid


def keep_mask(
    key: jax.typing.ArrayLike,
    shape: Sequence[int],
    rate: float | jax.typing.ArrayLike,
    *,
    bits: int = 32,
) -> jax.Array:
  """The boolean mask (True = kept) that :func:`dropout` uses for ``shape``.

  ``dropout(key, x, rate)`` equals ``where(keep_mask(key, x.shape, rate),
  x / p_keep, 0)``; with ``broadcast_dims``, pass the mask shape (size 1 on
  those axes). Each element is kept with probability exactly
  ``(2**32 - t) / 2**32``, ``t = round(rate * 2**32)``.

  Args:
    key: a PRNG key, as for :func:`dropout` (None allowed for a static rate
      of 0 or 1).
    shape: the mask shape.
    rate: probability to drop, as for :func:`dropout`. A traced rate outside
      [0, 1] or NaN gives an all-False mask (``dropout`` gives NaN).
    bits: 32 (default) or 16 (fast mode), as for :func:`dropout`.

  Returns:
    A bool array of ``shape``.

  Examples:
    >>> import jax, jaxdrop
    >>> jaxdrop.keep_mask(jax.random.key(0), (4,), 0.0)
    Array([ True,  True,  True,  True], dtype=bool)
  """
  shape = check_shape(shape)
  fixed = static_rate(rate)
  check_bits(bits)
  if fixed == 0.0:
    return jnp.ones(shape, bool)
  if fixed == 1.0:
    return jnp.zeros(shape, bool)
  key_data, impl = split_key(key)
  spec = mask_spec(impl, shape, bits)
  if fixed is not None:
    rate = None
  return _keep_mask_kernel(key_data, rate, spec=spec, fixed_rate=fixed)


# ----------------------------------------------------------------------------
# 8 bits: the attention mask.
#
# Weight (b, n, t, s) of a [B, N, T, S] mask is kept when an 8-bit value is at
# least t8 = round(rate * 256) (at most 255 for a rate below 1):
#
#   head_key = jax.random.fold_in(key, b * N + n)
#   u = jax.random.bits(head_key, (T, ceil(S / 8)), jnp.uint64)
#   byte = (u[t, s // 8] >> (56 - 8 * (s % 8))) & 0xFF
#   keep = byte >= t8
#
# One 64-bit hash decides eight consecutive weights of a row, most significant
# byte first. Every attention implementation (materialized, blockwise, fused
# kernel) computes exactly these bits for any block size, device count or
# sharding; heads and batch elements are independent through fold_in.
#
# Why 8 bits: the hash, not the matmuls, bounds a fused kernel. A full hash per
# weight costs more integer work than the attention matmuls spend per weight;
# eight decisions per hash make it a small fraction. The price is that the keep
# probability is quantized to multiples of 1/256: p_keep = (256 - t8) / 256
# (0.8984375 for rate 0.1), and survivors are scaled by exactly 1 / p_keep, so
# the expected output is still exactly the output without dropout.

ATTENTION_BITS = 8
LANES_8 = 64 // ATTENTION_BITS  # decisions per 64-bit hash.
_MAX_COUNTER = 2**32  # counters t * ceil(S / 8) + g must fit one uint32 word.


def check_attention_size(rows: int, cols: int) -> None:
  """Raises if a head's ``rows x cols`` mask needs 64-bit counters."""
  if rows * math.ceil(cols / LANES_8) >= _MAX_COUNTER:
    raise ValueError(
        f"attention dropout supports T * ceil(S / {LANES_8}) < 2**32 per head, got "
        f"T={rows}, S={cols}"
    )


def threefry_key_data(key, name: str = "dropout_key") -> jax.Array:
  """The uint32[2] data of a single threefry key; errors name the argument ``name``."""
  typed = typed_key(key, name)
  impl = str(jax.random.key_impl(typed))
  if impl != THREEFRY:
    raise ValueError(
        f"{name}: attention dropout needs a threefry2x32 key (jax.random.key's "
        f"default), got a {impl!r} key"
    )
  return jax.random.key_data(typed)


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


def keep8_block(
    keys: jax.Array,
    row_start: jax.Array | int,
    rows: int,
    col_start: jax.Array | int,
    cols: int,
    groups_per_row: int,
    threshold: jax.Array,
    keep_any: jax.Array,
) -> jax.Array:
  """bool[..., rows, cols]: the mask on a block of every head in ``keys``, in XLA.

  Args:
    keys: uint32[..., 2] head keys from :func:`head_keys` (any leading shape).
    row_start: the first query position ``t`` of the block.
    rows: the number of query positions.
    col_start: the first key position ``s``; a multiple of ``WORD``.
    cols: the number of key positions; a multiple of ``WORD``.
    groups_per_row: ``ceil(S / LANES_8)`` of the whole mask (not of the block).
    threshold: the uint32 threshold ``t8``.
    keep_any: False when the rate is 1.
  """
  packed = _packed_block8(keys, row_start, rows, col_start, cols, groups_per_row, threshold)
  offset = jax.lax.broadcasted_iota(jnp.uint32, packed.shape + (WORD,), packed.ndim)
  kept = ((packed[..., None] >> offset) & np.uint32(1)) != 0
  return kept.reshape(packed.shape[:-1] + (cols,)) & keep_any


def _packed_block8(keys, row_start, rows, col_start, cols, groups_per_row, threshold):
  """uint32[..., rows, cols // 32]: bit ``j % 32`` of word ``j // 32`` keeps column ``j``.

  Each element of the ``[rows, cols // 32, 4]`` hash array makes its eight
  decisions from its own 64 bits, and a reduction ORs four hashes into a word.
  The reduction ends the fusion, so each hash is computed once; an
  elementwise expansion to one value per weight would be fused into its
  consumer, which would recompute the hash for each of the eight weights.
  """
  shape = (rows, cols // WORD, WORD // LANES_8)
  t = jax.lax.broadcasted_iota(jnp.uint32, shape, 0) + jnp.asarray(row_start, jnp.uint32)
  hash_in_word = jax.lax.broadcasted_iota(jnp.uint32, shape, 2)
  g = (
      jax.lax.broadcasted_iota(jnp.uint32, shape, 1) * np.uint32(WORD // LANES_8)
      + hash_in_word
      + jnp.asarray(col_start, jnp.uint32) // np.uint32(LANES_8)
  )
  counter = t * np.uint32(groups_per_row) + g
  k0 = keys[..., 0][..., None, None, None]
  k1 = keys[..., 1][..., None, None, None]
  hi, lo = _threefry.threefry2x32(k0, k1, jnp.zeros((), jnp.uint32), counter)
  bits = jnp.zeros(hi.shape, jnp.uint32)
  for lane in range(LANES_8):  # Most significant byte first.
    word = hi if lane < 4 else lo
    byte = (word >> np.uint32(24 - 8 * (lane % 4))) & np.uint32(0xFF)
    bits = bits | ((byte >= threshold).astype(jnp.uint32) << np.uint32(lane))
  bits = bits << (hash_in_word * np.uint32(LANES_8))
  return jax.lax.reduce(bits, np.uint32(0), jax.lax.bitwise_or, (bits.ndim - 1,))


def keep8_tile(k0, k1, threshold, t0, s0, rows: int, cols: int, groups_per_row: int):
  """bool[rows, cols]: the mask of one head at queries ``t0 +`` and keys ``s0 +``, in a kernel.

  A ``rows x cols`` tile costs ``rows * cols / 8`` hashes. The ``(rows, cols /
  8)`` hash tile becomes the ``(rows, cols)`` byte tile by three two-way joins
  (``tt.join``, as Pallas unpacks int4): words into halves, halves into bytes,
  then a reshape, so byte ``s % 8`` lands at column ``s``. (Two other ways to
  the same bits, broadcasting each word to eight lanes and shifting, or hashing
  every element with its group's counter, made XLA's Triton pipeline in jax
  0.10 crash or run out of host memory compiling the dk/dv kernel at 64 x 64
  tiles.)

  Args:
    k0, k1: the head key's two uint32 words (:func:`head_keys`).
    threshold: the uint32 threshold from :func:`kernel_threshold`, 256 for a
      rate of 1.
    t0: the int32 first query position of the tile.
    s0: the int32 first key position, a multiple of 8: a row of the tile is
      ``cols / 8`` whole hash groups.
    rows, cols: the tile's size.
    groups_per_row: ``ceil(S / LANES_8)`` of the whole mask.
  """
  groups = cols // LANES_8
  t = jax.lax.broadcasted_iota(jnp.int32, (rows, groups), 0) + t0
  g = jax.lax.broadcasted_iota(jnp.int32, (rows, groups), 1) + (s0 >> 3)
  counter = t.astype(_U32) * np.uint32(groups_per_row) + g.astype(_U32)
  hi, lo = _threefry.threefry2x32(k0, k1, jnp.zeros_like(counter), counter)
  # Column g * 8 + 4 * word + 2 * half + byte_in_half: byte s % 8, MSB first.
  words = jnp.stack([hi, lo], axis=-1)
  halves = jnp.stack([words >> np.uint32(16), words], axis=-1)
  quarters = jnp.stack([halves >> np.uint32(8), halves], axis=-1)
  byte = (quarters & np.uint32(0xFF)).reshape(rows, cols)
  return byte >= threshold


def keep8_heads(key_data: jax.Array, resolved: Threshold, shape: tuple[int, int, int, int]):
  """bool[shape]: the whole ``(B, N, T, S)`` mask at once (``resolved`` at 8 bits)."""
  batch, heads, rows, cols = shape
  padded = math.ceil(cols / WORD) * WORD
  kept = keep8_block(
      head_keys(key_data, batch, heads), 0, rows, 0, padded, math.ceil(cols / LANES_8),
      resolved.threshold, resolved.keep_any,
  )
  return kept[..., :cols]


@partial(jax.jit, static_argnames=("shape", "fixed_rate"))
def _attention_mask_kernel(key_data, rate, *, shape, fixed_rate):
  resolved = resolve_rate(rate if fixed_rate is None else fixed_rate, jnp.float32, ATTENTION_BITS)
  return keep8_heads(key_data, resolved, shape) & resolved.valid


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
  shape = check_shape(shape, "shape")
  if len(shape) != 4:
    raise ValueError(f"shape must be (B, N, T, S), got shape={shape}")
  fixed = static_rate(dropout_rate, "dropout_rate")
  if fixed == 0.0:
    return jnp.ones(shape, bool)
  if fixed == 1.0:
    return jnp.zeros(shape, bool)
  key_data = threefry_key_data(dropout_key)
  check_attention_size(shape[2], shape[3])
  rate = None if fixed is not None else dropout_rate  # A static rate rounds on the host.
  return _attention_mask_kernel(key_data, rate, shape=shape, fixed_rate=fixed)
