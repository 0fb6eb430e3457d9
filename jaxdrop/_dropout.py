"""Dropout as a pure function: the custom derivative and the public dropout API.

``dropout(key, x, rate)`` is ``where(keep, x * (1 / p_keep), 0)``, with the
mask ``keep`` and the exact keep probability ``p_keep`` from
:mod:`jaxdrop._masks` (``keep == jaxdrop.keep_mask(key, mask_shape, rate)``),
so ``E[dropout(x)] == x``.

The derivative is a ``custom_jvp`` whose tangent recomputes the mask under
``jax.checkpoint``: reverse mode keeps only the key, threshold and scale for the
backward pass, never a mask or a bits array. Every output is tagged with
``jax.ad_checkpoint.checkpoint_name(y, CHECKPOINT_NAME)``, so that a
``jax.checkpoint`` policy can tell dropout outputs apart (see :func:`dropout`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxdrop import _masks
from jaxdrop import _threefry
from jaxdrop._validate import check_bits
from jaxdrop._validate import check_deterministic
from jaxdrop._validate import check_input
from jaxdrop._validate import normalize_axes
from jaxdrop._validate import split_key
from jaxdrop._validate import static_rate

# The name every dropout output carries, for jax.checkpoint policies such as
# jax.checkpoint_policies.save_any_names_but_these(CHECKPOINT_NAME) (see dropout).
CHECKPOINT_NAME = "jaxdrop.dropout"


# ----------------------------------------------------------------------------
# The masking kernel and its derivative.


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _masked_scale(spec, key_data, x, resolved):
  keep = _masks.keep(spec, key_data, resolved)
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
  if not _masks.fused_hash(spec.impl, spec.shape):
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
  resolved = _masks.resolve_rate(rate, x.dtype, spec.bits)
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


def needs_key(rate: Any, deterministic: bool) -> bool:
  """Whether dropout draws random bits: not when off, nor at static rates 0 and 1."""
  return not deterministic and static_rate(rate) not in (0.0, 1.0)


def mask_shape_for(shape: tuple[int, ...], broadcast_dims: Sequence[int]) -> tuple[int, ...]:
  axes = normalize_axes(broadcast_dims, len(shape))
  return tuple(1 if axis in axes else size for axis, size in enumerate(shape))


# ----------------------------------------------------------------------------
# Public functions.


def dropout(
    key: jax.typing.ArrayLike | None, x: jax.typing.ArrayLike, rate: float | jax.typing.ArrayLike,
    deterministic: bool = False, *, broadcast_dims: Sequence[int] = (), bits: int = 32,
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
    key: jax.typing.ArrayLike | None, x: jax.typing.ArrayLike, rate: float | jax.typing.ArrayLike,
    deterministic: bool = False, *, broadcast_dims: Sequence[int] = (), bits: int = 32,
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
  spec = _masks.mask_spec(impl, mask_shape, bits)
  if fixed is not None:
    rate = None  # Passed as a static argument instead.
  y = _dropout_kernel(key_data, x, rate, spec=spec, fixed_rate=fixed, relu=relu)
  return checkpoint_name(y, CHECKPOINT_NAME)
