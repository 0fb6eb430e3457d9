"""Dropout as a pure function: the whole algorithm of jaxdrop lives here.

Each mask element gets 32 random bits ``b`` and is kept when ``b >= t``, where
the integer threshold ``t`` comes from ``rate``. The keep probability is then
exactly ``p_keep = (2**32 - t) / 2**32`` and survivors are scaled by exactly
``1 / p_keep``, so ``E[dropout(x)] == x``.

For threefry keys the bits are JAX's own partitionable-threefry bits,
recomputed from the key by the fused hash in :mod:`jaxdrop._threefry`; other key
implementations use ``jax.random.bits``. Either way the mask equals
``jax.random.bits(key, mask_shape, jnp.uint32) >= t``.

The derivative is a ``custom_jvp`` whose tangent recomputes the mask under
``jax.checkpoint``: reverse mode keeps only the key, threshold and scale for the
backward pass, never a mask or a bits array. Every output is tagged with
``jax.ad_checkpoint.checkpoint_name(y, CHECKPOINT_NAME)``, so that a
``jax.checkpoint`` policy can tell dropout outputs apart (see :func:`dropout`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jaxdrop import _threefry
from jaxdrop._validate import check_bits
from jaxdrop._validate import check_deterministic
from jaxdrop._validate import check_input
from jaxdrop._validate import check_shape
from jaxdrop._validate import normalize_axes
from jaxdrop._validate import split_key
from jaxdrop._validate import static_rate

_THREEFRY = "threefry2x32"

# The name every dropout output carries, for jax.checkpoint policies such as
# jax.checkpoint_policies.save_any_names_but_these(CHECKPOINT_NAME) (see dropout).
CHECKPOINT_NAME = "jaxdrop.dropout"


class _Threshold(NamedTuple):
  """A resolved rate: what the masking kernel needs, all scalars."""

  threshold: jax.Array  # uint32: keep when bits >= threshold.
  keep_any: jax.Array  # bool: False when rate == 1 (t would be 2**32).
  scale: jax.Array  # 1 / p_keep in the compute dtype (0 when rate == 1).
  fill: jax.Array  # value of dropped elements: 0, or NaN for an invalid rate.
  valid: jax.Array  # bool: False for a traced rate outside [0, 1] or NaN.


# ----------------------------------------------------------------------------
# Rate to threshold.


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


def resolve_rate(rate: Any, dtype: Any, bits: int = 32) -> _Threshold:
  """Threshold, scale and fill for a rate in [0, 1) (static) or any array.

  ``bits`` is the width of the random values compared with the threshold:
  32 (the default mode) or 16 (the fast mode), so ``t`` is in [0, 2**bits).
  """
  dtype = compute_dtype(dtype)
  levels = 2**bits
  fixed = static_rate(rate)
  if fixed is not None:
    # Callers return zeros for a static rate of 1 before reaching here; the
    # clamp keeps the threshold in uint32 and the scale finite regardless.
    threshold, p_keep = quantize_rate(min(fixed, 1 - 2**-bits), bits)
    return _Threshold(
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
  return _Threshold(
      threshold=threshold.astype(jnp.uint32),
      keep_any=keep_any,
      scale=jnp.where(valid, scale, jnp.nan).astype(dtype),
      fill=jnp.where(valid, 0, jnp.nan).astype(dtype),
      valid=valid,
  )


# ----------------------------------------------------------------------------
# The masking kernel.


def _fused_hash(impl: str, shape: tuple[int, ...]) -> bool:
  """Whether :func:`random_bits` hashes in ``jax.numpy`` (else ``jax.random.bits``).

  The fused hash follows JAX's partitionable threefry. With
  ``jax_threefry_partitionable`` switched off (not the default) JAX's bits
  differ, so they come from ``jax.random.bits`` itself.
  """
  return (
      impl == _THREEFRY
      and jax.config.jax_threefry_partitionable
      and math.prod(shape) < _threefry.MAX_FUSED_SIZE
  )


def random_bits(key_data: jax.Array, impl: str, shape: tuple[int, ...]) -> jax.Array:
  """``jax.random.bits(key, shape, jnp.uint32)``, fused where possible (:func:`_fused_hash`).

  ``key_data`` may also be the uint32[3] key schedule where the hash is fused.
  """
  if _fused_hash(impl, shape):
    return _threefry.bits32(key_data, shape)
  key = jax.random.wrap_key_data(key_data, impl=impl)
  return jax.random.bits(key, shape, jnp.uint32)


class _MaskSpec(NamedTuple):
  """What fixes a mask's layout at trace time (hashable, a static argument)."""

  impl: str  # the key's PRNG implementation.
  shape: tuple[int, ...]  # the mask shape.
  bits: int  # 32 or 16: the width of each element's random value.


def _keep(spec: _MaskSpec, key_data, resolved: _Threshold) -> jax.Array:
  if spec.bits == 16:
    packed = _threefry.packed_keep16(key_data, spec.shape, resolved.threshold, resolved.keep_any)
    return _threefry.unpack(packed, spec.shape)
  bits = random_bits(key_data, spec.impl, spec.shape)
  return (bits >= resolved.threshold) & resolved.keep_any


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _masked_scale(spec, key_data, x, resolved):
  keep = _keep(spec, key_data, resolved)
  y = x.astype(resolved.scale.dtype) * resolved.scale
  return jnp.where(keep, y, resolved.fill).astype(x.dtype)


def _masked_scale_behind_key_barrier(spec, key_data, x, resolved):
  """``_masked_scale`` with a barrier on the key alone, for the tangent's recomputation.

  Under ``jax.checkpoint(prevent_cse=False)``. The checkpoint's default barrier
  holds every input, so XLA could not fuse the incoming cotangent's producer (a
  bias-add, a split-K reduction) into the masking (extra GPU kernels); with no
  barrier at all, XLA merges the backward's hash with the forward's and keeps
  the mask alive between the passes. The fused threefry hash reads its key
  schedule as scalars, so the three words pass one by one: words that some
  kernel already computed then need no kernel to be joined, and the third
  (``k0 ^ k1 ^ parity``) is computed with the key rather than in a GPU kernel
  of its own per dropout. ``jax.random.bits`` reads the key's array.
  """
  if not _fused_hash(spec.impl, spec.shape):
    return _masked_scale.fun(spec, jax.lax.optimization_barrier(key_data), x, resolved)
  schedule = jax.lax.optimization_barrier(_threefry.key_schedule(key_data[0], key_data[1]))
  return _masked_scale.fun(spec, jnp.stack(schedule), x, resolved)


@_masked_scale.defjvp
def _masked_scale_jvp(spec, primals, tangents):
  key_data, x, resolved = primals
  x_dot = tangents[1]
  y = _masked_scale(spec, key_data, x, resolved)
  # The tangent is linear in x_dot; under checkpoint its transpose recomputes
  # the mask from the key instead of keeping it alive for the backward pass.
  tangent_resolved = resolved._replace(fill=resolved.fill * 0)
  if spec.bits == 16:
    # The fast mode's packed words are a kernel of their own: behind a barrier
    # on the key alone they would depend on nothing else, and XLA computes them
    # in the forward pass and keeps them. The default barrier ties them to the
    # cotangent.
    recompute = jax.checkpoint(_masked_scale.fun, static_argnums=(0,))
  else:
    recompute = jax.checkpoint(
        _masked_scale_behind_key_barrier, static_argnums=(0,), prevent_cse=False
    )
  y_dot = recompute(spec, key_data, x_dot, tangent_resolved)
  return y, y_dot


# The kernels are jitted so that eager calls dispatch one compiled program
# instead of a hundred small integer ops; inside an outer jit they inline.
@partial(jax.jit, static_argnames=("spec", "fixed_rate", "relu"))
def _dropout_kernel(key_data, x, rate, *, spec, fixed_rate, relu=False):
  rate = rate if fixed_rate is None else fixed_rate
  resolved = resolve_rate(rate, x.dtype, spec.bits)
  return (_relu_masked_scale if relu else _masked_scale)(spec, key_data, x, resolved)


# relu then dropout, differentiated from its output alone: where the output is
# positive, the input was positive and kept; elsewhere the gradient is 0. The
# output is the only residual (the next layer keeps it anyway), so neither the
# mask nor the pre-activation stays alive for the backward pass.
@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _relu_masked_scale(spec, key_data, x, resolved):
  return _masked_scale.fun(spec, key_data, jax.nn.relu(x), resolved)


def _relu_masked_scale_fwd(spec, key_data, x, resolved):
  y = _relu_masked_scale(spec, key_data, x, resolved)
  return y, (y, resolved)


def _relu_masked_scale_bwd(spec, residuals, y_bar):
  del spec
  y, resolved = residuals
  # fill * 0 is 0, or NaN for an invalid traced rate (as dropout's gradient).
  scaled = y_bar.astype(resolved.scale.dtype) * resolved.scale
  x_bar = jnp.where(y > 0, scaled, resolved.fill * 0).astype(y_bar.dtype)
  return None, x_bar, None


_relu_masked_scale.defvjp(_relu_masked_scale_fwd, _relu_masked_scale_bwd)


@partial(jax.jit, static_argnames=("spec", "fixed_rate"))
def _mask_kernel(key_data, rate, *, spec, fixed_rate):
  rate = rate if fixed_rate is None else fixed_rate
  resolved = resolve_rate(rate, jnp.float32, spec.bits)
  return _keep(spec, key_data, resolved) & resolved.valid


def _mask_spec(impl: str, shape: tuple[int, ...], bits: int) -> _MaskSpec:
  """The static mask layout; checks that the fast mode supports the key and size."""
  if bits == 16:
    if impl != _THREEFRY or not jax.config.jax_threefry_partitionable:
      raise ValueError(
          f"bits=16 needs a threefry2x32 key with jax_threefry_partitionable on "
          f"(the defaults), got a {impl!r} key; use bits=32"
      )
    if math.prod(shape) >= _threefry.MAX_FUSED_SIZE:
      raise ValueError(f"bits=16 supports masks below 2**32 elements, got shape={shape}")
  return _MaskSpec(impl, shape, bits)


def needs_key(rate: Any, deterministic: bool) -> bool:
  """Whether dropout draws random bits: not when off, nor at static rates 0 and 1."""
  return not deterministic and static_rate(rate) not in (0.0, 1.0)


def mask_shape_for(shape: tuple[int, ...], broadcast_dims: Sequence[int]) -> tuple[int, ...]:
  axes = normalize_axes(broadcast_dims, len(shape))
  return tuple(1 if axis in axes else size for axis, size in enumerate(shape))


# ----------------------------------------------------------------------------
# Public functions.


def dropout(
    key: jax.typing.ArrayLike | None,
    x: jax.typing.ArrayLike,
    rate: float | jax.typing.ArrayLike,
    deterministic: bool = False,
    *,
    broadcast_dims: Sequence[int] = (),
    bits: int = 32,
) -> jax.Array:
  """Randomly zeroes elements of ``x`` and rescales the rest.

  Each element is dropped (set to 0) with probability ``rate`` -- **rate is
  the probability to drop, not to keep** -- and every kept element becomes
  ``x / p_keep``, so the expected output equals ``x``::

    y = where(bits >= t, x * (1 / p_keep), 0),  p_keep = (2**32 - t) / 2**32

  with ``bits = jax.random.bits(key, mask_shape, jnp.uint32)`` and the integer
  threshold ``t = round(rate * 2**32)``. ``p_keep`` is the exact keep
  probability (within 2**-32 of ``1 - rate`` for a Python float rate), so the
  mean is exact, not just close. The scale is applied in float32 (or the
  input's wider dtype) and the result cast once to ``x.dtype``.

  Args:
    key: a PRNG key (``jax.random.key`` or a legacy ``jax.random.PRNGKey``).
      Threefry keys, the default, use a fused hash that gives the same bits
      as ``jax.random.bits``; other implementations call it directly. May be
      None when no randomness is needed: ``deterministic`` is True or the
      rate is a static 0 or 1.
    x: the input, of a floating dtype.
    rate: probability to drop each element. A Python float in [0, 1] is fixed
      at trace time; a scalar JAX array may be traced (e.g. a schedule's
      value), and a traced rate outside [0, 1] or NaN makes the output NaN
      rather than being clipped.
    deterministic: if True, return ``x`` unchanged (evaluation mode).
    broadcast_dims: axes along which the mask is shared (the mask has size 1
      there), e.g. ``(1,)`` for one mask per example over a sequence axis.
    bits: 32 (default) for the masks above; 16 for the fast mode, which
      spends each 64-bit threefry output on four elements: element ``L`` of
      the mask compares the 16-bit lane
      ``(u[L // 4] >> (48 - 16 * (L % 4))) & 0xFFFF`` of
      ``u = jax.random.bits(key, (ceil(n / 4),), jnp.uint64)`` with
      ``t = round(rate * 2**16)``. The keep probability is then quantized to
      multiples of 2**-16 and the scale is its exact inverse, so the mean is
      still exact. Fast mode needs a threefry key; when it pays off is in
      docs/performance.md.

  Returns:
    An array with the shape and dtype of ``x``. Unless it is ``x`` itself
    (deterministic, or a static rate of 0) it is tagged with
    ``checkpoint_name(y, jaxdrop.CHECKPOINT_NAME)``. Without ``jax.checkpoint``
    the backward pass of the layer that consumes ``y`` keeps ``y``; under
    ``jax.checkpoint`` with a policy that saves only named values, such as
    ``jax.checkpoint_policies.save_any_names_but_these(jaxdrop.CHECKPOINT_NAME)``
    (with the model's own ``checkpoint_name`` tags), or ``dots_saveable``, it
    is recomputed from ``x`` and the key and only the key is kept; whether
    that lowers peak memory depends on the compiler's schedule (the
    recomputed ``y`` needs a buffer too; docs/semantics.md has measurements,
    and :func:`relu_dropout` for the relu case).
    ``save_anything_except_these_names(jaxdrop.CHECKPOINT_NAME)`` does not do
    this: JAX applies that policy inside the derivative too, which then saves
    the mask instead of ``y``.

  Raises:
    ValueError: a static ``rate`` outside [0, 1] or NaN; ``key`` is None
      while dropout is active, or a batch of keys; ``broadcast_dims`` out of
      range or repeated; ``bits`` not 32 or 16, or 16 with a non-threefry key.
    TypeError: ``x`` is not a floating array; ``key`` is not a PRNG key;
      ``broadcast_dims`` is not an int or a sequence of ints.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxdrop
    >>> y = jaxdrop.dropout(jax.random.key(0), jnp.ones(8), rate=0.5)
    >>> bool(jnp.all((y == 0) | (y == 2)))
    True
    >>> jaxdrop.dropout(None, jnp.ones(3), 0.5, deterministic=True)
    Array([1., 1., 1.], dtype=float32)
  """
  return _apply(key, x, rate, deterministic, broadcast_dims, bits, relu=False)


def relu_dropout(
    key: jax.typing.ArrayLike | None,
    x: jax.typing.ArrayLike,
    rate: float | jax.typing.ArrayLike,
    deterministic: bool = False,
    *,
    broadcast_dims: Sequence[int] = (),
    bits: int = 32,
) -> jax.Array:
  """``dropout(key, jax.nn.relu(x), rate, ...)``, whose backward pass keeps only the output.

  The output is bit for bit that of the composition, and so is the gradient
  (for a traced rate outside [0, 1] both are NaN, the gradient everywhere
  rather than only where ``x > 0``).
  The difference is what the backward pass keeps: an output element is
  positive exactly where ``x`` was positive and kept (the scale is at least
  1), so the gradient is ``where(y > 0, g / p_keep, 0)`` and ``y`` is its only
  residual. The next layer keeps ``y`` for its own backward pass anyway, so a
  ``Dense -> relu_dropout -> Dense`` stack trains in the memory of ``Dense ->
  relu -> Dense``: no mask, no pre-activation and no recomputed dropout
  output are stored (BENCHMARKS.md measures it), and the backward pass does
  not hash.

  Args:
    key, rate, deterministic, broadcast_dims, bits: as for :func:`dropout`.
    x: the pre-activation, of a floating dtype.

  Returns:
    ``jax.nn.relu(x)`` when ``deterministic`` or a static rate of 0, else the
    dropped and rescaled activation, tagged like :func:`dropout`'s output.

  Raises:
    ValueError: as for :func:`dropout`.
    TypeError: as for :func:`dropout`.

  Note:
    The derivative is a ``custom_vjp``: reverse mode (``grad``, ``vjp``) only.
    For forward mode (``jvp``, Hessians) compose
    ``dropout(key, jax.nn.relu(x), rate)``, which gives the same values.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxdrop
    >>> x = jnp.array([-1.0, 2.0, 3.0, -4.0])
    >>> key = jax.random.key(0)
    >>> y = jaxdrop.relu_dropout(key, x, 0.5)
    >>> bool(jnp.all(y == jaxdrop.dropout(key, jax.nn.relu(x), 0.5)))
    True
  """
  return _apply(key, x, rate, deterministic, broadcast_dims, bits, relu=True)


def _apply(key, x, rate, deterministic, broadcast_dims, bits: int, relu: bool) -> jax.Array:
  """The body of :func:`dropout` (``relu=False``) and :func:`relu_dropout`."""
  x = check_input(x)
  fixed = static_rate(rate)
  mask_shape = mask_shape_for(x.shape, broadcast_dims)
  check_bits(bits)
  if check_deterministic(deterministic) or fixed == 0.0:
    return jax.nn.relu(x) if relu else x
  if fixed == 1.0:
    return jnp.zeros_like(x)
  key_data, impl = split_key(key)
  spec = _mask_spec(impl, mask_shape, bits)
  if fixed is not None:
    rate = None  # Passed as a static argument instead.
  y = _dropout_kernel(key_data, x, rate, spec=spec, fixed_rate=fixed, relu=relu)
  return checkpoint_name(y, CHECKPOINT_NAME)


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
  spec = _mask_spec(impl, shape, bits)
  if fixed is not None:
    rate = None
  return _mask_kernel(key_data, rate, spec=spec, fixed_rate=fixed)
