"""Checks on an accelerator what the CPU test suite checks on CPU, in seconds.

The masks must be bit-identical to ``jax.random.bits`` on every backend; this
runs the identity, the fast-mode mapping and a gradient on the default device.
The threshold is the library's one definition (``quantize_rate``); the
fast-mode lane mapping is the test suite's oracle (``tests/conftest.py``).
Run: ``python benchmarks/gpu_check.py`` (prints one line per check).
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_ROOT), str(_ROOT / "tests")]
import jaxdrop  # noqa: E402
from conftest import reference_keep16  # noqa: E402
from jaxdrop._masks import quantize_rate  # noqa: E402


def main() -> None:
  print("devices:", jax.devices())
  key = jax.random.key(42)
  t, _ = quantize_rate(0.3, 32)
  # (1000, 64): rows of whole packed fast-mode words (_masks.word_shape), a layout of its own.
  for shape in [(7,), (1000, 33), (1000, 64), (2**20,), (3, 5, 7)]:
    expected = jax.random.bits(key, shape, jnp.uint32) >= np.uint32(t)
    np.testing.assert_array_equal(jaxdrop.keep_mask(key, shape, 0.3), expected)
    np.testing.assert_array_equal(
        jaxdrop.keep_mask(key, shape, 0.3, bits=16), reference_keep16(key, shape, 0.3)
    )
    print("bits identical to jax.random.bits (32 and 16-bit modes):", shape)
  x = jnp.arange(1.0, 1025.0)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(jaxdrop.dropout(key, x, 0.5))))(x)
  np.testing.assert_array_equal(grad != 0, jaxdrop.keep_mask(key, x.shape, 0.5))
  print("gradient mask matches the forward mask")


if __name__ == "__main__":
  main()
