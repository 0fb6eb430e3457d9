"""The fast mode (``bits=16``) as one Pallas kernel for GPUs (Triton): a prototype.

XLA computes a fusion once per output element, so the four elements that share
a Threefry hash in the fast mode either recompute it four times or go through
a packed word buffer (:func:`jaxdrop._masks.packed_keep16`, a second
fusion). A kernel computes each hash once and spends its four 16-bit lanes
directly: a program owns ``block`` consecutive elements (row-major), whose
decisions are the fast mode's in-kernel form, :func:`jaxdrop._masks.keep16_tile`.

The result is bit for bit :func:`jaxdrop.dropout` with ``bits=16`` (the tests
check it in the Pallas interpreter), and its gradient applies the same kernel
to the cotangent (a ``custom_vjp``: reverse mode only). It is not part of the
library: nothing chooses it, since on an H100 it lost to the XLA path in train
steps, where its input can no longer fuse with the layer before it
(docs/performance.md). ``bench.py`` times it on a GPU (its ``pallas kernel
bits=16`` rows).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxdrop import _dropout, _masks, _validate

_U32 = jnp.uint32
_COMPILER_PARAMS = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
BLOCK = 4096  # elements per program (a power of two, a multiple of 4)


def _kernel(key_ref, threshold_ref, scale_ref, fill_ref, x_ref, out_ref, *, block: int):
  first_hash = (pl.program_id(0) * (block // _masks.LANES_16)).astype(_U32)
  keep = _masks.keep16_tile(key_ref[0], key_ref[1], threshold_ref[()], first_hash, block)
  scale = scale_ref[()]
  x = x_ref[...]
  y = jnp.where(keep, x.astype(scale.dtype) * scale, fill_ref[()])
  out_ref[...] = y.astype(out_ref.dtype)


def _apply(key_data, x, resolved: _masks.Threshold, block: int, interpret: bool):
  """``where(lane16 >= t, x * scale, fill)`` over ``x`` flattened (padded to ``block``)."""
  n = x.size
  padded = -(-n // block) * block
  flat = x.reshape(n)
  if padded != n:
    flat = jnp.pad(flat, (0, padded - n))
  threshold = _masks.kernel_threshold(resolved, 16)
  scalar = pl.BlockSpec((), lambda i: ())
  out = pl.pallas_call(
      functools.partial(_kernel, block=block),
      grid=(padded // block,),
      in_specs=[pl.BlockSpec((2,), lambda i: (0,)), scalar, scalar, scalar,
                pl.BlockSpec((block,), lambda i: (i,))],
      out_specs=pl.BlockSpec((block,), lambda i: (i,)),
      out_shape=jax.ShapeDtypeStruct((padded,), x.dtype),
      compiler_params=_COMPILER_PARAMS(num_warps=4, num_stages=1),
      interpret=interpret,
      name="jaxdrop_dropout16",
  )(key_data, threshold, resolved.scale, resolved.fill, flat)
  return out[:n].reshape(x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _dropout16(key_data, x, resolved, block, interpret):
  return _apply(key_data, x, resolved, block, interpret)


def _dropout16_fwd(key_data, x, resolved, block, interpret):
  return _apply(key_data, x, resolved, block, interpret), (key_data, resolved)


def _dropout16_bwd(block, interpret, residuals, y_bar):
  key_data, resolved = residuals
  # The same mask and scale; 0 where dropped (NaN for an invalid traced rate).
  x_bar = _apply(key_data, y_bar, resolved._replace(fill=resolved.fill * 0), block, interpret)
  return None, x_bar, None


_dropout16.defvjp(_dropout16_fwd, _dropout16_bwd)


def dropout16(
    key: jax.typing.ArrayLike | None,
    x: jax.typing.ArrayLike,
    rate: float | jax.typing.ArrayLike,
    deterministic: bool = False,
    *,
    block: int = BLOCK,
    interpret: bool = False,
) -> jax.Array:
  """``jaxdrop.dropout(key, x, rate, deterministic, bits=16)`` computed by one Pallas kernel.

  Args:
    key, x, rate, deterministic: as for :func:`jaxdrop.dropout` (a threefry key).
    block: elements per kernel program, a power of two of at least 16.
    interpret: run the kernel in the Pallas interpreter (any backend; slow).

  Returns:
    The same array as ``jaxdrop.dropout(..., bits=16)``.

  Raises:
    ValueError, TypeError: as :func:`jaxdrop.dropout`; a ``block`` that is not
      an int, or not a power of two >= 16.
  """
  x = _validate.check_input(x)
  block = _validate.check_int(block, "block", minimum=16)
  if block & (block - 1):
    raise ValueError(f"block must be a power of two >= 16, got block={block!r}")
  fixed = _validate.static_rate(rate)
  if _validate.check_deterministic(deterministic) or fixed == 0.0:
    return x
  if fixed == 1.0:
    return jnp.zeros_like(x)
  key_data, impl = _validate.split_key(key)
  _masks.mask_spec(impl, x.shape, 16)  # Checks the key and size as the XLA path does.
  if math.prod(x.shape) == 0:
    return x
  resolved = _masks.resolve_rate(rate, x.dtype, 16)
  y = _dropout16(key_data, x, resolved, block, bool(interpret))
  return jax.ad_checkpoint.checkpoint_name(y, _dropout.CHECKPOINT_NAME)


class Dropout(nn.Module):
  """``dropout16`` in a linen Dropout's place (``bench.py``'s train steps)."""

  rate: float
  deterministic: bool = False
  interpret: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    key = None if self.deterministic else self.make_rng("dropout")
    return dropout16(key, x, self.rate, self.deterministic, interpret=self.interpret)
