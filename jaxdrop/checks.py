"""chex-based checks that a dropout output is consistent with its input.

Use them in tests, or in a training loop on values brought back from the
device (e.g. keep fractions collected with flax's ``sow``). Each raises
``AssertionError`` with the numbers that failed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxdrop import _masks
from jaxdrop import _validate

__all__ = [
    "assert_dropout_output",
    "assert_keep_fraction",
    "keep_fraction",
    "keep_fraction_bound",
]


def keep_fraction(x: jax.typing.ArrayLike, y: jax.typing.ArrayLike) -> jax.Array:
  """Fraction of the nonzero elements of ``x`` that survive in ``y``.

  Works under ``jit`` (e.g. to ``sow`` from inside a model). Elements where
  ``x == 0`` are ambiguous (0 either way) and are not counted; the result is
  NaN if every element of ``x`` is 0.

  Examples:
    >>> import jax.numpy as jnp, jaxdrop
    >>> jaxdrop.checks.keep_fraction(jnp.ones(4), jnp.array([0., 2., 2., 0.]))
    Array(0.5, dtype=float32)
  """
  x, y = jnp.asarray(x), jnp.asarray(y)
  counted = x != 0
  kept = jnp.sum(counted & (y != 0), dtype=jnp.float32)
  return kept / jnp.sum(counted, dtype=jnp.float32)


def _static_rate(rate: float) -> float:
  fixed = _validate.static_rate(rate)
  if fixed is None:
    raise TypeError(f"rate must be a Python float for a host-side check, got rate={rate!r}")
  return fixed


def keep_fraction_bound(rate: float, n: int, k: float = 4.0, *, bits: int = 32) -> float:
  """``k`` standard deviations of the kept fraction of ``n`` dropout decisions.

  The number kept is Binomial(n, p_keep), with ``p_keep =
  jaxdrop.keep_probability(rate, bits)``, so its fraction has standard
  deviation ``sqrt(p_keep * (1 - p_keep) / n)``.

  Examples:
    >>> import jaxdrop
    >>> jaxdrop.checks.keep_fraction_bound(0.5, 10_000)
    0.02
  """
  n = _validate.check_int(n, "n", minimum=1)
  if not k > 0:
    raise ValueError(f"k must be positive, got k={k!r}")
  p_keep = _masks.keep_probability(_static_rate(rate), bits)
  return k * math.sqrt(p_keep * (1 - p_keep) / n)


def assert_keep_fraction(
    fraction: float | jax.typing.ArrayLike,
    rate: float,
    n: int,
    *,
    k: float = 4.0,
    bits: int = 32,
) -> None:
  """Asserts a realized keep fraction is within ``k``·σ of the keep probability.

  Args:
    fraction: the kept fraction of ``n`` independent keep/drop decisions.
    rate: the drop probability they were made with.
    n: the number of decisions.
    k: the number of binomial standard deviations allowed (4 by default:
      a false alarm about once in 16,000 checks).
    bits: the mode the decisions were made in, 32 or 16; the expected
      fraction is ``jaxdrop.keep_probability(rate, bits)``.

  Raises:
    AssertionError: the fraction is outside the bound (or NaN).
  """
  bound = keep_fraction_bound(rate, n, k, bits=bits)
  fraction = float(fraction)
  expected = _masks.keep_probability(_static_rate(rate), bits)
  if not abs(fraction - expected) <= bound:
    raise AssertionError(
        f"keep fraction {fraction:.6f} over n={n} decisions is not within "
        f"{k}·σ = {bound:.6f} of p_keep = {expected:.6f} "
        f"(off by {abs(fraction - expected) / max(bound / k, 1e-300):.2f}σ)"
    )


def assert_dropout_output(
    x: jax.typing.ArrayLike,
    y: jax.typing.ArrayLike,
    rate: float,
    *,
    broadcast_dims: Sequence[int] = (),
    k: float = 4.0,
    bits: int = 32,
) -> None:
  """Asserts ``y`` could be ``jaxdrop.dropout(key, x, rate, ...)`` for some key.

  Checks that ``y`` has the shape and dtype of ``x``; every element is 0 or
  ``x`` scaled by ``1 / p_keep`` (to the dtype's rounding), where ``p_keep =
  jaxdrop.keep_probability(rate, bits)``; elements sharing a mask along
  ``broadcast_dims`` agree; and the kept fraction is within ``k``·σ of
  ``p_keep``.

  Args:
    x: the input of the dropout call.
    y: its output.
    rate: the static rate it was called with.
    broadcast_dims: the axes it shared the mask along.
    k: binomial standard deviations allowed for the kept fraction.
    bits: the mode it ran in, 32 (default) or 16 (fast mode).

  Raises:
    AssertionError: with the first offending numbers.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxdrop
    >>> x = jnp.arange(1.0, 1001.0)
    >>> y = jaxdrop.dropout(jax.random.key(0), x, 0.25)
    >>> jaxdrop.checks.assert_dropout_output(x, y, 0.25)
  """
  x, y = jnp.asarray(x), jnp.asarray(y)
  chex.assert_equal_shape((x, y))
  chex.assert_trees_all_equal_dtypes(x, y)
  fixed = _static_rate(rate)
  axes = _validate.normalize_axes(broadcast_dims, x.ndim)
  xs = np.asarray(x, np.float64)
  ys = np.asarray(y, np.float64)
  p_keep = _masks.keep_probability(fixed, bits)
  scale = 1 / p_keep if p_keep else 0.0
  scaled = xs * scale
  tolerance = 2 * float(jnp.finfo(x.dtype).eps) * np.abs(scaled)
  is_zero = ys == 0
  is_scaled = np.abs(ys - scaled) <= tolerance
  bad = ~(is_zero | is_scaled)
  if bad.any():
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    raise AssertionError(
        f"{int(bad.sum())} element(s) are neither 0 nor x / p_keep "
        f"(scale {scale!r}); first at {index}: x={float(xs[index])!r}, "
        f"y={float(ys[index])!r}, expected 0 or {float(scaled[index])!r}"
    )
  counted = xs != 0
  kept = counted & ~is_zero
  if axes:
    # A decision is one mask element: reduce over the shared axes. Every
    # counted element of one decision must agree.
    any_kept = kept.any(axis=axes)
    any_dropped = (counted & is_zero).any(axis=axes)
    if (any_kept & any_dropped).any():
      raise AssertionError(
          f"elements that share a mask along broadcast_dims={tuple(broadcast_dims)} "
          "are kept in some places and dropped in others"
      )
    counted = counted.any(axis=axes)
    kept = any_kept
  n = int(counted.sum())
  if n == 0:
    return
  if fixed in (0.0, 1.0):
    expected = 1.0 - fixed
    if kept.sum() != expected * n:
      raise AssertionError(
          f"rate={fixed} must keep a fraction {expected} exactly, kept "
          f"{int(kept.sum())} of {n}"
      )
    return
  assert_keep_fraction(kept.sum() / n, fixed, n, k=k, bits=bits)
