"""The dropout masks, pinned bit for bit (jaxdrop/_masks.py).

Which elements a given key, shape and rate drops is jaxdrop's compatibility
promise (CHANGELOG.md, "the masks"): the same mask in every release of a major
version. Each case below hashes (SHA-256) the masks of a few fixed keys, shapes
and rates, in every layout the library has: 32-bit elementwise, the 16-bit
fast mode (``bits=16``) and the 8-bit attention mask, for every key
implementation each supports, with static and traced rates, and the dropout
outputs built on them in several dtypes. The hashes were computed before the
mask code was moved into one module, and must never change: **a change of a
hash here is a breaking change** of the mask (see CHANGELOG.md), not a test to
update. The oracle tests (tests/test_dropout.py, tests/test_fast_mode.py,
tests/test_attention.py) check the same masks against the documented formulas;
these pin them where a formula and the code could drift together. The last tests
check that each layout's in-kernel form computes what its XLA form does.
"""

from __future__ import annotations

import hashlib
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdrop
from jaxdrop import _masks

_THREEFRY = "threefry2x32"


def _digest(*arrays: jax.Array) -> str:
  """SHA-256 of the arrays' shapes, dtypes and bytes, in order."""
  sha = hashlib.sha256()
  for array in arrays:
    array = np.asarray(array)
    sha.update(f"{array.shape}{array.dtype}".encode())
    sha.update(array.tobytes())
  return sha.hexdigest()


def _keys(impl: str) -> list[jax.Array]:
  """Two fixed keys of ``impl``; ``"legacy"`` is a raw ``jax.random.PRNGKey``."""
  if impl == "legacy":
    return [jax.random.PRNGKey(seed) for seed in (7, 2**31 - 1)]
  return [jax.random.key(seed, impl=impl) for seed in (7, 2**31 - 1)]


_SHAPES_32 = [(1000,), (2, 3, 33)]
_SHAPES_16 = [(1000,), (8, 64), (3, 33)]  # whole packed words per row, and not
_RATES = [1e-6, 0.1, 0.5, 1 - 1e-6]


def _keep_masks(impl: str, shapes, bits: int, traced: bool) -> list[jax.Array]:
  masks = []
  for key in _keys(impl):
    for shape in shapes:
      for rate in _RATES:
        if traced:
          fn = jax.jit(lambda k, r, s=shape: jaxdrop.keep_mask(k, s, r, bits=bits))
          masks.append(fn(key, jnp.float32(rate)))
        else:
          masks.append(jaxdrop.keep_mask(key, shape, rate, bits=bits))
  return masks


_ATTENTION_SHAPES = [(2, 3, 17, 40), (1, 1, 64, 257)]


def _attention_masks(impl: str, traced: bool) -> list[jax.Array]:
  masks = []
  for key in _keys(impl):
    for shape in _ATTENTION_SHAPES:
      for rate in _RATES:
        if traced:
          fn = jax.jit(lambda k, r, s=shape: jaxdrop.attention_keep_mask(k, s, r))
          masks.append(fn(key, jnp.float32(rate)))
        else:
          masks.append(jaxdrop.attention_keep_mask(key, shape, rate))
  return masks


def _xla_attention_masks() -> list[jax.Array]:
  """The mask as ``implementation="xla"`` applies it: with value = identity, out != 0."""
  masks = []
  for key in _keys(_THREEFRY):
    for batch, heads, rows, cols in [(2, 3, 17, 40), (1, 1, 300, 600)]:  # 1 and 2 key blocks
      q = jnp.zeros((batch, rows, heads, cols))  # uniform weights
      k = jnp.zeros((batch, cols, heads, cols))
      v = jnp.broadcast_to(jnp.eye(cols), (batch, heads, cols, cols)).transpose(0, 2, 1, 3)
      out = jaxdrop.dot_product_attention(
          q, k, v, dropout_rate=0.3, dropout_key=key, implementation="xla"
      )
      masks.append(np.asarray(out).transpose(0, 2, 1, 3) != 0)  # [B, N, T, S]
  return masks


_DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


def _dropout_outputs(impl: str, bits: int) -> list[jax.Array]:
  """dropout and relu_dropout outputs: the masks with their exact scales, per dtype."""
  outputs = []
  # numpy's legacy generator, whose stream NumPy freezes (NEP 19): jax.random.normal's
  # values changed between jax 0.8 and 0.10, and the input must not move the hash.
  x = jnp.asarray(np.random.RandomState(123).standard_normal((16, 48)).astype(np.float32))
  for key in _keys(impl):
    for dtype in _DTYPES:
      for rate in (0.1, 0.75):
        outputs.append(jaxdrop.dropout(key, x.astype(dtype), rate, bits=bits))
        outputs.append(jaxdrop.relu_dropout(key, x.astype(dtype), rate, bits=bits))
        outputs.append(jaxdrop.dropout(key, x.astype(dtype), rate, broadcast_dims=(0,), bits=bits))
      traced = jax.jit(lambda k, y, r: jaxdrop.dropout(k, y, r, bits=bits))
      outputs.append(traced(key, x.astype(dtype), jnp.float32(0.3)))
  return outputs


CASES = {
    "keep_mask-32-threefry": partial(_keep_masks, _THREEFRY, _SHAPES_32, 32, traced=False),
    "keep_mask-32-threefry-traced": partial(_keep_masks, _THREEFRY, _SHAPES_32, 32, traced=True),
    "keep_mask-32-legacy": partial(_keep_masks, "legacy", _SHAPES_32, 32, traced=False),
    "keep_mask-32-rbg": partial(_keep_masks, "rbg", _SHAPES_32, 32, traced=False),
    "keep_mask-32-unsafe_rbg-traced":
        partial(_keep_masks, "unsafe_rbg", _SHAPES_32, 32, traced=True),
    "keep_mask-16-threefry": partial(_keep_masks, _THREEFRY, _SHAPES_16, 16, traced=False),
    "keep_mask-16-threefry-traced": partial(_keep_masks, _THREEFRY, _SHAPES_16, 16, traced=True),
    "keep_mask-16-legacy": partial(_keep_masks, "legacy", _SHAPES_16, 16, traced=False),
    "attention-8-threefry": partial(_attention_masks, _THREEFRY, traced=False),
    "attention-8-threefry-traced": partial(_attention_masks, _THREEFRY, traced=True),
    "attention-8-legacy": partial(_attention_masks, "legacy", traced=False),
    "attention-8-xla-implementation": _xla_attention_masks,
    "dropout-32-threefry": partial(_dropout_outputs, _THREEFRY, 32),
    "dropout-32-rbg": partial(_dropout_outputs, "rbg", 32),
    "dropout-16-threefry": partial(_dropout_outputs, _THREEFRY, 16),
}

# Computed before the mask code moved to jaxdrop/_masks.py (8a7d5d8). Never edit one: see the
# docstring. The three dropout-* hashes were recomputed once, when their input stopped being
# jax.random.normal (whose values jax 0.8 and 0.10 differ in); the new ones are the same at
# 8a7d5d8 and today, on jax 0.8.1 and 0.10.2, and the masks under them never changed.
EXPECTED = {
    # A static rate, a traced one and a legacy key give the same masks.
    "attention-8-legacy":
        "b80486b4838721a8c6fd951744213594322d1fc190de9dfeab2346133238da4b",
    "attention-8-threefry":
        "b80486b4838721a8c6fd951744213594322d1fc190de9dfeab2346133238da4b",
    "attention-8-threefry-traced":
        "b80486b4838721a8c6fd951744213594322d1fc190de9dfeab2346133238da4b",
    "attention-8-xla-implementation":
        "694a1efde0e91498bca310dd299fd6f441e2f3c3281d2a98867c134f31dabfbb",
    "dropout-16-threefry":
        "bfc590c49cd3216dcf0e8163cacb8da9f44f531148c27055821af076bc92c78d",
    "dropout-32-rbg":
        "405216b34e66bea8453fdbaf7f1ef278c59f0fd0ffce05eefe74bdc611bf3394",
    "dropout-32-threefry":
        "4261ba3969650ef8e02f5b9efc98e32251bcc1accd370db57f0da0dcdac8bccb",
    "keep_mask-16-legacy":
        "b24c79a90c5e4988a52ba24b9c3fda39bcb46f2e0a645f7c268dba90b13fab89",
    "keep_mask-16-threefry":
        "b24c79a90c5e4988a52ba24b9c3fda39bcb46f2e0a645f7c268dba90b13fab89",
    "keep_mask-16-threefry-traced":
        "b24c79a90c5e4988a52ba24b9c3fda39bcb46f2e0a645f7c268dba90b13fab89",
    "keep_mask-32-legacy":
        "0cd5d4f17d30d1ecb955f99d059ec208769fd184b244811a3b1bdf6f32ad0ee1",
    "keep_mask-32-threefry":
        "0cd5d4f17d30d1ecb955f99d059ec208769fd184b244811a3b1bdf6f32ad0ee1",
    "keep_mask-32-threefry-traced":
        "0cd5d4f17d30d1ecb955f99d059ec208769fd184b244811a3b1bdf6f32ad0ee1",
    # rbg and unsafe_rbg keys of one seed hold the same data: the same bits.
    "keep_mask-32-rbg":
        "5343034012a2a5ca78b49c74bc222bd5c29b89dab822940a5f72a6799746d5b6",
    "keep_mask-32-unsafe_rbg-traced":
        "5343034012a2a5ca78b49c74bc222bd5c29b89dab822940a5f72a6799746d5b6",
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_masks_are_pinned(name):
  assert _digest(*CASES[name]()) == EXPECTED[name]


def test_every_case_is_pinned():
  assert sorted(EXPECTED) == sorted(CASES)


# ----------------------------------------------------------------------------
# Each layout's in-kernel form (run here as plain jax.numpy) equals its XLA form.


@pytest.mark.parametrize("rate", [0.3, 1.0])
def test_16_bit_kernel_tile_is_the_fast_mode_mask(rate):
  key = jax.random.key(11)
  n, size = 1024, 256
  resolved = _masks.resolve_rate(jnp.float32(rate), jnp.float32, 16)
  threshold = _masks.kernel_threshold(resolved, 16)
  key_data = jax.random.key_data(key)
  tiles = [
      _masks.keep16_tile(key_data[0], key_data[1], threshold, jnp.uint32(start // 4), size)
      for start in range(0, n, size)
  ]
  expected = jaxdrop.keep_mask(key, (n,), rate, bits=16)
  np.testing.assert_array_equal(jnp.concatenate(tiles), expected)


@pytest.mark.parametrize("rate", [0.3, 1.0])
def test_8_bit_kernel_tile_is_the_attention_mask(rate):
  key = jax.random.key(11)
  shape = (2, 3, 40, 72)  # S not a multiple of the 16-column tiles: the last tile overhangs.
  resolved = _masks.resolve_rate(jnp.float32(rate), jnp.float32, _masks.ATTENTION_BITS)
  threshold = _masks.kernel_threshold(resolved, _masks.ATTENTION_BITS)
  keys = _masks.head_keys(jax.random.key_data(key), *shape[:2])
  expected = np.asarray(jaxdrop.attention_keep_mask(key, shape, rate))
  groups_per_row = -(-shape[3] // _masks.LANES_8)
  rows, cols = 8, 16
  for b, n in [(0, 0), (1, 2)]:
    tiles = [
        [
            _masks.keep8_tile(
                keys[b, n, 0], keys[b, n, 1], threshold, jnp.int32(t0), jnp.int32(s0),
                rows, cols, groups_per_row,
            )
            for s0 in range(0, shape[3], cols)
        ]
        for t0 in range(0, shape[2], rows)
    ]
    mask = np.block([[np.asarray(tile) for tile in row] for row in tiles])
    np.testing.assert_array_equal(mask[:, : shape[3]], expected[b, n])
