"""The tests' oracles, written from the documented semantics, and a jaxpr walker.

They never call the library's arithmetic (``quantize_rate``, ``resolve_rate``,
the mask layouts), so a wrong library formula cannot agree with them by
construction: each recomputes a documented formula with ``jax.random`` and
numpy alone.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

# Statistical tests allow this many standard deviations: a correct
# implementation fails one given check about once in 16,000 runs, and the keys
# are fixed, so a pass is reproducible.
K_SIGMA = 4.0


def threshold(rate: float, bits: int = 32) -> int:
  """The documented integer threshold ``min(round(rate * 2**bits), 2**bits - 1)``."""
  return min(round(rate * 2**bits), 2**bits - 1)


def p_keep(rate: float, bits: int = 32) -> float:
  """The documented exact keep probability ``(2**bits - t) / 2**bits``."""
  return (2**bits - threshold(rate, bits)) / 2**bits


def reference_keep16(key, shape, rate):
  """The documented fast-mode mapping: 16-bit lanes of jax.random.bits(..., uint64)."""
  n = math.prod(shape)
  with jax.enable_x64(True):
    words = np.asarray(jax.random.bits(key, (-(-n // 4),), jnp.uint64))
  index = np.arange(n)
  shift = (48 - 16 * (index % 4)).astype(np.uint64)
  lanes = (words[index // 4] >> shift) & np.uint64(0xFFFF)
  return (lanes >= threshold(rate, 16)).reshape(shape)


def assert_binomial_fraction(kept: int, n: int, p: float, k: float = K_SIGMA):
  """|kept/n - p| <= k·sqrt(p(1-p)/n): a binomial count's k-sigma bound."""
  sigma = np.sqrt(p * (1 - p) / n)
  assert abs(kept / n - p) <= k * sigma, (kept, n, p, k * sigma)


def attention_keep_mask(key, shape, rate):
  """The README's 8-bit attention mask, computed with jax.random itself (independent of jaxdrop)."""
  batch, heads, rows, cols = shape
  cut = threshold(rate, 8)
  position = np.arange(cols)
  keep = np.zeros(shape, bool)
  with jax.enable_x64(True):
    for b in range(batch):
      for n in range(heads):
        head_key = jax.random.fold_in(key, b * heads + n)
        words = jax.random.bits(head_key, (rows, -(-cols // 8)), jnp.uint64)
        shift = (56 - 8 * (position % 8)).astype(np.uint64)
        byte = (np.asarray(words)[:, position // 8] >> shift) & np.uint64(0xFF)
        keep[b, n] = byte >= cut
  return keep


def equations(jaxpr):
  """Every equation of ``jaxpr`` and of its sub-jaxprs, depth first."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else [param]:
        sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr holds its Jaxpr
        if hasattr(sub, "eqns"):
          yield from equations(sub)
