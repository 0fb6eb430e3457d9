"""Dropout variants as pure functions, built on :func:`jaxdrop.dropout`.

Each variant changes *what* is dropped or *what replaces* a dropped unit; the
mask itself always comes from the core (:func:`jaxdrop.dropout` or
:func:`jaxdrop.keep_mask`), so every variant keeps its exact keep probability,
its fused mask and its rate conventions: **rate is the probability to drop**, a
Python float is checked and fixed at trace time, and a scalar JAX array may be
traced (a schedule's value) without recompiling.

* :func:`spatial_dropout` drops whole channels (Tompson et al. 2015).
* :func:`alpha_dropout` keeps SELU activations at mean 0 and variance 1
  (Klambauer et al. 2017).
* :func:`gaussian_dropout` multiplies by N(1, rate / (1 - rate)) noise
  (Srivastava et al. 2014, section 10).
* :func:`drop_path` drops whole residual branches per example (stochastic
  depth; Huang et al. 2016), with :func:`drop_path_rates` for the per-block
  rates.
* :func:`dropconnect` drops weights instead of activations (Wan et al. 2013),
  and :func:`dropconnect_dense` is a dense layer with a dropped kernel.

Every output that is not the input itself carries the checkpoint name
:data:`jaxdrop.CHECKPOINT_NAME`, as :func:`jaxdrop.dropout`'s does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jaxdrop._dropout import CHECKPOINT_NAME
from jaxdrop._dropout import dropout
from jaxdrop._masks import compute_dtype
from jaxdrop._masks import keep_mask
from jaxdrop._masks import resolve_rate
from jaxdrop._validate import check_deterministic
from jaxdrop._validate import check_input
from jaxdrop._validate import check_int
from jaxdrop._validate import normalize_axes
from jaxdrop._validate import split_key
from jaxdrop._validate import static_rate

# SELU's negative saturation value, -scale * alpha (Klambauer et al. 2017, with
# the constants of jax.nn.selu): what a SELU unit outputs for x -> -inf.
ALPHA_PRIME = -1.0507009873554805 * 1.6732632423543772  # -1.7580993408473766


def _axis(axis: Any, ndim: int, name: str) -> int:
  """One validated, non-negative axis of an ``ndim``-dimensional input."""
  return normalize_axes(check_int(axis, name), ndim, name)[0]


def _all_but(ndim: int, *axes: int) -> tuple[int, ...]:
  return tuple(axis for axis in range(ndim) if axis not in axes)


def spatial_dropout(
    key: jax.typing.ArrayLike | None,
    x: jax.typing.ArrayLike,
    rate: float | jax.typing.ArrayLike,
    deterministic: bool = False,
    *,
    channel_axis: int = -1,
    batch_axis: int | None = 0,
) -> jax.Array:
  """Drops whole channels: one decision per (example, channel).

  Neighbouring pixels (or time steps) of a feature map are strongly
  correlated, so element-wise dropout barely regularizes convolutions;
  dropping entire channels does (Tompson et al. 2015; torch's
  ``Dropout1d/2d/3d``, Keras' ``SpatialDropout``). Each channel of each example
  is dropped with probability ``rate`` (**the probability to drop**) and kept
  channels are scaled by ``1 / p_keep``; the decision is shared over every
  other axis. This is :func:`jaxdrop.dropout` with ``broadcast_dims`` set to
  all axes but ``batch_axis`` and ``channel_axis``.

  Args:
    key: a PRNG key; may be None when ``deterministic`` is True.
    x: a floating input such as ``(N, H, W, C)`` (the default axes) or
      ``(N, C, H, W)`` with ``channel_axis=1``.
    rate: probability to drop each channel, as for :func:`jaxdrop.dropout`.
    deterministic: if True, return ``x`` unchanged.
    channel_axis: the channel axis.
    batch_axis: the example axis, or None for an unbatched input (one
      decision per channel).

  Returns:
    An array with the shape and dtype of ``x``.

  Raises:
    ValueError: a static ``rate`` outside [0, 1]; an axis out of range, or
      ``batch_axis == channel_axis``; ``key`` is None while active.
    TypeError: ``x`` is not floating; an axis is not an int; a bad key.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxdrop
    >>> y = jaxdrop.spatial_dropout(jax.random.key(0), jnp.ones((2, 4, 4, 3)), 0.5)
    >>> bool(jnp.all(y == y[:, :1, :1, :]))  # constant over height and width
    True
  """
  x = check_input(x)
  kept = (_axis(channel_axis, x.ndim, "channel_axis"),)
  if batch_axis is not None:
    batch = _axis(batch_axis, x.ndim, "batch_axis")
    if batch == kept[0]:
      raise ValueError(
          "batch_axis and channel_axis must differ, got "
          f"batch_axis={batch_axis!r}, channel_axis={channel_axis!r} for an "
          f"input of {x.ndim} dimensions"
      )
    kept += (batch,)
  return dropout(key, x, rate, deterministic, broadcast_dims=_all_but(x.ndim, *kept))


def alpha_dropout(
    key: jax.typing.ArrayLike | None,
    x: jax.typing.ArrayLike,
    rate: float | jax.typing.ArrayLike,
    deterministic: bool = False,
) -> jax.Array:
  """Alpha dropout for self-normalizing (SELU) networks.

  Zeroing a SELU activation shifts its mean and variance, so Klambauer et al.
  (2017) set dropped units to SELU's saturation value
  ``alpha' = -scale * alpha = -1.7580993408473766`` instead, then apply the
  affine map that restores mean 0 and variance 1 for standardized inputs::

    y = a * where(keep, x, alpha') + b,
    a = (q + alpha'**2 * q * (1 - q)) ** -0.5,  b = -a * alpha' * (1 - q)

  where ``q`` is the exact keep probability of :func:`jaxdrop.keep_mask`
  (``(2**32 - t) / 2**32``, not just ``1 - rate``); the mask is the one
  :func:`jaxdrop.dropout` uses for the same key. Computed in float32 (or
  wider) and cast once to ``x.dtype``.

  At ``rate == 1`` every unit is dropped and the output is 0 (as in torch):
  the limit of ``a * alpha' + b`` as ``q -> 0``, which keeps the mean but
  cannot keep the variance. A traced rate of 1 gives the same zeros (with
  finite gradients); a traced rate outside [0, 1] or NaN gives NaN.

  Args:
    key: a PRNG key; may be None when ``deterministic`` is True.
    x: a floating input, typically the output of ``jax.nn.selu``.
    rate: probability to drop each unit, as for :func:`jaxdrop.dropout`.
    deterministic: if True, return ``x`` unchanged.

  Returns:
    An array with the shape and dtype of ``x``.

  Raises:
    ValueError: a static ``rate`` outside [0, 1]; ``key`` is None while
      active.
    TypeError: ``x`` is not floating; ``key`` is not a PRNG key.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxdrop
    >>> x = jax.random.normal(jax.random.key(1), (100_000,))
    >>> y = jaxdrop.alpha_dropout(jax.random.key(0), x, 0.2)
    >>> bool(abs(y.mean()) < 0.02), round(float(y.std()), 1)
    (True, 1.0)
  """
  x = check_input(x)
  fixed = static_rate(rate)
  if check_deterministic(deterministic) or fixed == 0.0:
    return x
  if fixed == 1.0:
    return jnp.zeros_like(x)
  keep = keep_mask(key, x.shape, rate)
  return checkpoint_name(_alpha_kernel(keep, x, *_rate_operand(rate, fixed)), CHECKPOINT_NAME)


def _rate_operand(rate: Any, fixed: float | None) -> tuple[Any, float | None]:
  """``(array rate or None, static rate or None)``: the kernels' rate arguments."""
  return (None, fixed) if fixed is not None else (rate, None)


# The kernels below are jitted, as jaxdrop.dropout's is, so that an eager call
# runs the same compiled arithmetic as a call inside jit: bitwise equal results.
@partial(jax.jit, static_argnames=("fixed_rate",))
def _alpha_kernel(keep, x, rate, fixed_rate):
  resolved = resolve_rate(rate if fixed_rate is None else fixed_rate, x.dtype)
  # q = p_keep = 1 / scale. A traced rate of 1 has scale 0: use q = 1 there
  # (a = 1, b = 0) so nothing is infinite, then output 0 below.
  q = jnp.where(resolved.keep_any, 1 / resolved.scale, 1)
  a = jax.lax.rsqrt(q + ALPHA_PRIME**2 * q * (1 - q))
  b = -a * ALPHA_PRIME * (1 - q)
  y = jnp.where(keep, a * x.astype(q.dtype) + b, a * ALPHA_PRIME + b)
  # fill is 0 for a valid rate and NaN for an invalid traced one.
  y = jnp.where(resolved.keep_any, y, 0) + resolved.fill
  return y.astype(x.dtype)


def check_gaussian_rate(rate: Any, name: str = "rate") -> float | None:
  """:func:`jaxdrop.dropout`'s rate check, also refusing a static rate of 1."""
  fixed = static_rate(rate, name)
  if fixed == 1.0:
    raise ValueError(
        f"gaussian dropout needs {name} < 1: its noise variance "
        f"{name} / (1 - {name}) is infinite at {name}={rate!r}"
    )
  return fixed


def gaussian_dropout(
    key: jax.typing.ArrayLike | None,
    x: jax.typing.ArrayLike,
    rate: float | jax.typing.ArrayLike,
    deterministic: bool = False,
) -> jax.Array:
  """Multiplies ``x`` by Gaussian noise of mean 1 and variance rate / (1 - rate).

  Srivastava et al. (2014, section 10) replace the Bernoulli mask of dropout
  by ``N(1, sigma**2)`` noise with the same variance,
  ``sigma**2 = rate / (1 - rate)`` (Keras' ``GaussianDropout``)::

    y = x * (1 + sigma * eps),  eps ~ N(0, 1) from jax.random.normal

  so ``E[y] = x`` and ``Var[y] = x**2 * rate / (1 - rate)``, as for
  :func:`jaxdrop.dropout` with the same rate. Computed in float32 (or wider)
  and cast once to ``x.dtype``.

  Args:
    key: a PRNG key; may be None when ``deterministic`` is True.
    x: a floating input.
    rate: the dropout rate whose variance the noise matches, in [0, 1). A
      static rate of 1 is an error (infinite variance). A traced rate is not
      checked at trace time: outside [0, 1), or NaN, the output is NaN.
    deterministic: if True, return ``x`` unchanged.

  Returns:
    An array with the shape and dtype of ``x``.

  Raises:
    ValueError: a static ``rate`` outside [0, 1); ``key`` is None while
      active.
    TypeError: ``x`` is not floating; ``key`` is not a PRNG key.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxdrop
    >>> y = jaxdrop.gaussian_dropout(jax.random.key(0), jnp.ones(100_000), 0.5)
    >>> round(float(y.mean()), 1), round(float(y.var()), 1)
    (1.0, 1.0)
  """
  x = check_input(x)
  fixed = check_gaussian_rate(rate)
  if check_deterministic(deterministic) or fixed == 0.0:
    return x
  key_data, impl = split_key(key)
  y = _gaussian_kernel(key_data, x, *_rate_operand(rate, fixed), impl=impl)
  return checkpoint_name(y, CHECKPOINT_NAME)


@partial(jax.jit, static_argnames=("fixed_rate", "impl"))
def _gaussian_kernel(key_data, x, rate, fixed_rate, impl):
  dtype = compute_dtype(x.dtype)
  if fixed_rate is not None:
    sigma = jnp.asarray(math.sqrt(fixed_rate / (1 - fixed_rate)), dtype)
  else:
    rate = jax.lax.stop_gradient(jnp.asarray(rate)).astype(dtype)
    valid = (rate >= 0) & (rate < 1)  # False for NaN.
    sigma = jnp.where(valid, jnp.sqrt(rate / (1 - rate)), jnp.nan)
  noise = jax.random.normal(jax.random.wrap_key_data(key_data, impl=impl), x.shape, dtype)
  return (x.astype(dtype) * (1 + sigma * noise)).astype(x.dtype)


def drop_path(
    key: jax.typing.ArrayLike | None,
    x: jax.typing.ArrayLike,
    rate: float | jax.typing.ArrayLike,
    deterministic: bool = False,
    *,
    batch_axis: int = 0,
) -> jax.Array:
  """Stochastic depth: drops a residual branch for whole examples.

  Apply it to the branch of a residual block, ``x + drop_path(key, f(x),
  rate)``: each example's branch output is dropped with probability ``rate``
  (**the probability to drop**) and kept ones are scaled by ``1 / p_keep``, so
  the block is the identity for that example (Huang et al. 2016; timm's
  ``DropPath``). This is :func:`jaxdrop.dropout` with ``broadcast_dims`` set
  to every axis but ``batch_axis``. Use :func:`drop_path_rates` for the usual
  rates that grow with depth.

  Args:
    key: a PRNG key; may be None when ``deterministic`` is True.
    x: the branch output, a floating array with a batch axis.
    rate: probability to drop each example's branch, as for
      :func:`jaxdrop.dropout`.
    deterministic: if True, return ``x`` unchanged.
    batch_axis: the example axis.

  Returns:
    An array with the shape and dtype of ``x``.

  Raises:
    ValueError: a static ``rate`` outside [0, 1]; ``batch_axis`` out of
      range; ``key`` is None while active.
    TypeError: ``x`` is not floating; ``batch_axis`` is not an int; a bad key.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxdrop
    >>> y = jaxdrop.drop_path(jax.random.key(0), jnp.ones((4, 3)), 0.5)
    >>> bool(jnp.all(y == y[:, :1]))  # one decision per example
    True
  """
  x = check_input(x)
  batch = _axis(batch_axis, x.ndim, "batch_axis")
  return dropout(key, x, rate, deterministic, broadcast_dims=_all_but(x.ndim, batch))


def drop_path_rates(num_blocks: int, max_rate: float) -> list[float]:
  """Per-block drop-path rates rising linearly from 0 to ``max_rate``.

  The stochastic-depth schedule of ViT, DeiT and ConvNeXt (timm's
  ``torch.linspace(0, drop_path_rate, depth)``): the first block is never
  dropped and the last is dropped with probability ``max_rate``.

  Args:
    num_blocks: the number of residual blocks (0 gives an empty list).
    max_rate: the last block's rate, a Python float in [0, 1].

  Returns:
    ``num_blocks`` Python floats, ``numpy.linspace(0, max_rate, num_blocks)``.

  Raises:
    ValueError: ``num_blocks`` is negative, or ``max_rate`` outside [0, 1].
    TypeError: ``num_blocks`` is not an int, or ``max_rate`` not a number.

  Examples:
    >>> import jaxdrop
    >>> jaxdrop.drop_path_rates(5, 0.2)
    [0.0, 0.05, 0.1, 0.15000000000000002, 0.2]
  """
  num_blocks = check_int(num_blocks, "num_blocks", minimum=0)
  fixed = static_rate(max_rate, "max_rate")
  if fixed is None:
    raise TypeError(f"max_rate must be a Python float in [0, 1], got max_rate={max_rate!r}")
  return [float(r) for r in np.linspace(0.0, fixed, num_blocks)]


def dropconnect(
    key: jax.typing.ArrayLike | None,
    kernel: jax.typing.ArrayLike,
    rate: float | jax.typing.ArrayLike,
    deterministic: bool = False,
) -> jax.Array:
  """DropConnect: drops weights of ``kernel`` instead of activations.

  Wan et al. (2013) regularize a layer by zeroing each *weight* with
  probability ``rate`` (**the probability to drop**), so each output unit sees
  a random subset of its inputs. This is :func:`jaxdrop.dropout` applied to the
  kernel, with its inverted scaling: kept weights are scaled by
  ``1 / p_keep`` so the expected kernel is unchanged and evaluation uses the kernel
  as is (as in AWD-LSTM's weight drop), instead of the paper's Gaussian
  moment-matching inference. One mask per call is shared by the whole batch;
  for a mask per example, ``jax.vmap`` over per-example keys. Biases are not
  dropped.

  Args:
    key: a PRNG key; may be None when ``deterministic`` is True.
    kernel: a floating weight array, e.g. ``(in_features, out_features)``.
    rate: probability to drop each weight, as for :func:`jaxdrop.dropout`.
    deterministic: if True, return ``kernel`` unchanged.

  Returns:
    The masked, rescaled kernel, with its shape and dtype.

  Raises:
    ValueError: a static ``rate`` outside [0, 1]; ``key`` is None while
      active.
    TypeError: ``kernel`` is not floating; ``key`` is not a PRNG key.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxdrop
    >>> w = jaxdrop.dropconnect(jax.random.key(0), jnp.ones((3, 2)), 0.5)
    >>> bool(jnp.all((w == 0) | (w == 2)))
    True
  """
  kernel = check_input(kernel, "kernel")
  return dropout(key, kernel, rate, deterministic)


def dropconnect_dense(
    key: jax.typing.ArrayLike | None,
    x: jax.typing.ArrayLike,
    kernel: jax.typing.ArrayLike,
    bias: jax.typing.ArrayLike | None,
    rate: float | jax.typing.ArrayLike,
    deterministic: bool = False,
    *,
    dtype: Any = None,
    precision: jax.lax.PrecisionLike = None,
) -> jax.Array:
  """A dense layer whose kernel is dropped by :func:`dropconnect`.

  ``y = x @ dropconnect(key, kernel, rate) + bias``, contracting the last axis
  of ``x`` with the first of ``kernel``, as ``flax.linen.Dense`` and
  ``flax.nnx.Linear`` compute it: ``x``, the kernel and the bias are first
  cast to ``dtype`` (default: their common result type). One mask per call
  is shared by the whole batch; the bias is not dropped.

  Args:
    key: a PRNG key; may be None when ``deterministic`` is True.
    x: the input, ``(..., in_features)``.
    kernel: the weights, ``(in_features, out_features)``.
    bias: ``(out_features,)``, or None for no bias.
    rate: probability to drop each weight, as for :func:`jaxdrop.dropout`.
    deterministic: if True, use the kernel unmasked.
    dtype: the computation dtype, or None.
    precision: the precision of the matrix product.

  Returns:
    ``(..., out_features)``.

  Raises:
    ValueError: a static ``rate`` outside [0, 1]; ``key`` is None while
      active; ``kernel`` or ``bias`` of the wrong rank.
    TypeError: ``kernel`` is not floating; ``key`` is not a PRNG key.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxdrop
    >>> y = jaxdrop.dropconnect_dense(None, jnp.ones((2, 3)), jnp.ones((3, 4)),
    ...                               jnp.zeros(4), 0.5, deterministic=True)
    >>> y
    Array([[3., 3., 3., 3.],
           [3., 3., 3., 3.]], dtype=float32)
  """
  kernel = dropconnect(key, kernel, rate, deterministic)
  if kernel.ndim != 2:
    raise ValueError(f"kernel must be (in_features, out_features), got kernel.shape={kernel.shape}")
  operands = [jnp.asarray(x), kernel] + ([] if bias is None else [jnp.asarray(bias)])
  if bias is not None and operands[2].shape != kernel.shape[1:]:
    raise ValueError(
        f"bias must be (out_features,) = {kernel.shape[1:]}, got bias.shape={operands[2].shape}"
    )
  dtype = jnp.result_type(*operands) if dtype is None else dtype
  x, kernel, *bias_ = (operand.astype(dtype) for operand in operands)
  y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)
  if bias_:
    y = y + jnp.reshape(bias_[0], (1,) * (y.ndim - 1) + (-1,))
  return y


# The static rate check of each pure function whose rule differs from
# jaxdrop.dropout's; the linen and nnx modules read it from here.
_RATE_CHECKS: dict[Callable[..., jax.Array], Callable[[Any], float | None]] = {
    gaussian_dropout: check_gaussian_rate,
}


def rate_check(function: Callable[..., jax.Array]) -> Callable[[Any], float | None]:
  """The check a module applies to its ``rate`` at construction."""
  return _RATE_CHECKS.get(function, static_rate)
