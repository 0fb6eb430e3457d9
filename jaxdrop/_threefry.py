"""Threefry-2x32 written as plain ``jax.numpy`` integer ops, so XLA can fuse it.

JAX lowers ``jax.random.bits`` on CPU to a rolled loop over whole arrays, so the
hash cannot fuse with the comparison and select that use its output. The same
function written as twenty unrolled add/rotate/xor steps over per-element
counters is an ordinary elementwise expression: XLA fuses hash, threshold and
select into one pass over memory.

The construction follows JAX's partitionable threefry (the default since
jax 0.5): the element at row-major linear index ``i`` hashes the counter pair
``(i >> 32, i & 0xFFFFFFFF)`` and its 32 random bits are the XOR of the two
output words. :func:`bits32` therefore equals
``jax.random.bits(key, shape, jnp.uint32)`` bit for bit; the tests check it.

Reference: Salmon, Moraes, Dror and Shaw (2011), "Parallel random numbers: as
easy as 1, 2, 3".
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

# Rotation constants of Threefry-2x32 (Salmon et al. 2011, table 4) and the
# key-schedule parity constant.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)

# Largest mask we hash ourselves: counters then fit the low word and the high
# word is zero. Bigger masks use ``jax.random.bits``, which handles 64-bit
# counters (and is still bit-identical, only slower).
MAX_FUSED_SIZE = 2**32


def _rotl(x: jax.Array, r: int) -> jax.Array:
  return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def key_schedule(k0: jax.Array, k1: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The three words Threefry-2x32 injects between rounds: ``k0, k1, k0 ^ k1 ^ parity``."""
  return k0, k1, k0 ^ k1 ^ _PARITY


def threefry2x32(
    k0: jax.Array, k1: jax.Array, x0: jax.Array, x1: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Threefry-2x32 with 20 rounds on uint32 arrays (keys broadcast)."""
  return _rounds(key_schedule(k0, k1), x0, x1)


def _rounds(
    ks: tuple[jax.Array, ...], x0: jax.Array, x1: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """The 20 rounds on counters ``(x0, x1)`` given the :func:`key_schedule` ``ks``."""
  x0 = x0 + ks[0]
  x1 = x1 + ks[1]
  for block in range(5):
    for r in _ROTATIONS[block % 2]:
      x0 = x0 + x1
      x1 = _rotl(x1, r)
      x1 = x1 ^ x0
    x0 = x0 + ks[(block + 1) % 3]
    x1 = x1 + ks[(block + 2) % 3] + np.uint32(block + 1)
  return x0, x1


def linear_index(shape: tuple[int, ...]) -> jax.Array:
  """uint32 row-major index of every element of ``shape`` (size < 2**32).

  One ``iota`` over the flat size, reshaped: the reshape is a free bitcast and
  each fusion computes the index of its own elements. Per-axis iotas summed
  with strides let XLA's GPU compiler hoist the row term ``iota * stride``
  into a ``u32[rows]`` kernel of its own, read by every hash of that shape.
  Sharded, each device's fusion computes the indices of its own elements only
  (XLA's partitioner offsets the iota); no collective is needed.
  """
  return jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)


@partial(jax.jit, static_argnums=1)
def bits32(key_data: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """uint32 bits equal to ``jax.random.bits(key, shape, jnp.uint32)``.

  Args:
    key_data: the uint32[2] data of a threefry key, or the uint32[3] of its
      :func:`key_schedule` (which dropout's backward pass takes from behind a
      barrier, computed with the key).
    shape: the output shape; its size must be below ``MAX_FUSED_SIZE``.
  """
  if math.prod(shape) >= MAX_FUSED_SIZE:
    raise ValueError(f"shape={shape} has 2**32 or more elements")
  if key_data.shape not in ((2,), (3,)):
    raise ValueError(
        f"key_data must be a threefry key's uint32[2] or its uint32[3] schedule, "
        f"got shape {key_data.shape}"
    )
  words = tuple(key_data[i] for i in range(key_data.shape[0]))
  ks = words if len(words) == 3 else key_schedule(*words)
  hi = jnp.zeros((), jnp.uint32)
  y0, y1 = _rounds(ks, hi, linear_index(shape))
  return y0 ^ y1


# ----------------------------------------------------------------------------
# The 16-bit mode: four decisions per hash.
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
# fusion reads one word per 32 outputs.

LANES_16 = 4
_WORD = 32


def word_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape of a mask's packed words (row-major, the same words either way).

  Rows of ``shape[-1] // 32`` words where a row holds whole words, so that a
  sharded consumer packs only its own rows and columns; else one row of
  ``ceil(n / 32)`` words.
  """
  if shape and shape[-1] % _WORD == 0:
    return shape[:-1] + (shape[-1] // _WORD,)
  return (-(-math.prod(shape) // _WORD),)


def packed_keep16(
    key_data: jax.Array, shape: tuple[int, ...], threshold: jax.Array, keep_any: jax.Array
) -> jax.Array:
  """uint32[word_shape(shape)]: bit ``L % 32`` of word ``L // 32`` is ``lane16[L] >= t``."""
  hashes_per_word = _WORD // LANES_16
  hashes = word_shape(shape) + (hashes_per_word,)
  # Hash g of word w has counter 8w + g and sets bits 4g .. 4g + 3. The
  # counters come from one reshaped iota, as in linear_index: XLA does not
  # hoist them into a GPU kernel and buffer of their own.
  counter = linear_index(hashes)
  group = jax.lax.broadcasted_iota(jnp.uint32, hashes, len(hashes) - 1)
  hi, lo = threefry2x32(key_data[0], key_data[1], jnp.zeros((), jnp.uint32), counter)
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
  if n % _WORD == 0:
    # A reshape rather than a gather: the consumer reads one word per 32 outputs.
    offset = jax.lax.broadcasted_iota(jnp.uint32, packed.shape + (_WORD,), packed.ndim)
    return (((packed[..., None] >> offset) & np.uint32(1)) != 0).reshape(shape)
  index = linear_index(shape)
  word = packed[index >> np.uint32(5)]
  return ((word >> (index & np.uint32(31))) & np.uint32(1)) != 0
