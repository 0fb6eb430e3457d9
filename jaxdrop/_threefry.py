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
How the hash's bits become dropout decisions is :mod:`jaxdrop._masks`.

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
