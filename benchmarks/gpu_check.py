"""Checks on an accelerator what the CPU test suite checks on CPU, in seconds.

The masks must be bit-identical to ``jax.random.bits`` on every backend; this
runs the identity, the fast-mode mapping and a gradient on the default device.
Run: ``python benchmarks/gpu_check.py`` (prints one line per check).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import jaxdrop  # noqa: E402


def main() -> None:
  print("devices:", jax.devices())
  key = jax.random.key(42)
  for shape in [(7,), (1000, 33), (2**20,), (3, 5, 7)]:
    t = round(0.3 * 2**32)
    expected = jax.random.bits(key, shape, jnp.uint32) >= np.uint32(t)
    np.testing.assert_array_equal(jaxdrop.keep_mask(key, shape, 0.3), expected)
    n = math.prod(shape)
    with jax.enable_x64(True):
      words = np.asarray(jax.random.bits(key, (-(-n // 4),), jnp.uint64))
    index = np.arange(n)
    lanes = (words[index // 4] >> (48 - 16 * (index % 4)).astype(np.uint64)) & np.uint64(0xFFFF)
    np.testing.assert_array_equal(
        jaxdrop.keep_mask(key, shape, 0.3, bits=16),
        (lanes >= round(0.3 * 2**16)).reshape(shape),
    )
    print("bits identical to jax.random.bits (32 and 16-bit modes):", shape)
  x = jnp.arange(1.0, 1025.0)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(jaxdrop.dropout(key, x, 0.5))))(x)
  np.testing.assert_array_equal(grad != 0, jaxdrop.keep_mask(key, x.shape, 0.5))
  print("gradient mask matches the forward mask")


if __name__ == "__main__":
  main()
