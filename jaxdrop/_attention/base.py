"""What every attention implementation shares: its static configuration, the
canonical form of ``bias`` and ``mask``, and the materialized reference.

Layout, as ``jax.nn.dot_product_attention``: query ``[B, T, N, H]``, key and
value ``[B, S, K, H]`` with ``K`` dividing ``N`` (query head ``n`` reads key
head ``n // (N // K)``), ``bias`` and ``mask`` of four dimensions that
broadcast to ``[B, N, T, S]``.

Semantics: ``P = softmax_s(scale * q . k + bias)`` over the allowed positions
(``mask`` and, with ``is_causal``, ``s <= t``); ``out = sum_s P * keep * c * v``
with ``keep`` from :mod:`jaxdrop._masks` (8 bits) and ``c`` the exact inverse
of its keep probability. A query row with no allowed position outputs 0.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxdrop import _masks


class Config(NamedTuple):
  """The static part of one attention call (hashable)."""

  scale: float
  is_causal: bool
  # Shape (Bm, Nm) of the heads that own a dropout mask: (B, N), or (1, 1)
  # when one mask is shared by every batch element and head.
  dropout_heads: tuple[int, int]
  # The rate when it is a static number, None when it is an array argument.
  fixed_rate: float | None
  precision: Any = None

  @property
  def dropout(self) -> bool:
    """Whether the call drops weights (a traced rate always may)."""
    return self.fixed_rate != 0.0

  def resolve(self, rate: jax.Array | None):
    """Threshold and scale of the mask: the static rate, else the array ``rate``."""
    rate = rate if self.fixed_rate is None else self.fixed_rate
    return _masks.resolve_rate(rate, jnp.float32, _masks.ATTENTION_BITS)


def allowed_positions(
    rows: jax.Array, cols: jax.Array, num_cols: int, is_causal: bool, mask: jax.Array | None
) -> jax.Array:
  """bool[..., len(rows), len(cols)]: the positions a query may attend.

  Args:
    rows: int32[r] query positions ``t``.
    cols: int32[c] key positions ``s``; those ``>= num_cols`` are padding.
    num_cols: ``S``.
    is_causal: restrict to ``s <= t``.
    mask: a bool block broadcastable to ``[..., r, c]``, or None.
  """
  allowed = jnp.broadcast_to(cols[None, :] < num_cols, (rows.shape[0], cols.shape[0]))
  if is_causal:
    allowed = allowed & (cols[None, :] <= rows[:, None])
  if mask is not None:
    allowed = allowed & mask
  return allowed


def full_like(x: jax.Array, value: float, dtype: Any) -> jax.Array:
  """``jnp.full_like(x, value, dtype)`` with the sharding of ``x``.

  Under explicit sharding, jax >= 0.11 gives a created array the context
  mesh's sharding, and with no mesh set (``jax.set_mesh``) none: a loop
  carry made that way then clashes with the sharded values added to it. So
  the creation runs under the mesh of ``x`` itself.
  """
  mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
  if mesh is None or not mesh.axis_names:
    return jnp.full_like(x, value, dtype)
  with jax.sharding.use_abstract_mesh(mesh):
    return jnp.full_like(x, value, dtype)


def pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
  """Zero-pads ``axis`` of ``x`` (query, key, value: every axis is real) to ``size``."""
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)


def pad_unless_broadcast(x: jax.Array, axis: int, size: int) -> jax.Array:
  """:func:`pad_axis` for ``bias`` and ``mask``, whose size-1 axes broadcast and stay so."""
  return x if x.shape[axis] == 1 else pad_axis(x, axis, size)


def _explicit_spec(x: jax.Array) -> tuple | None:
  """``x``'s partition spec, one entry per axis, when it is sharded over explicit mesh axes."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec = tuple(getattr(sharding, "spec", ()) or ())
  if not any(entry is not None for entry in spec):
    return None
  return spec + (None,) * (x.ndim - len(spec))


def _names(entry) -> tuple:
  return () if entry is None else entry if isinstance(entry, tuple) else (entry,)


def _reshaped_spec(old: tuple[int, ...], spec: tuple, new: tuple[int, ...]):
  """The spec of ``old`` reshaped to ``new``, or None if a split or merge cannot keep it.

  A reshape is a sequence of groups, each an old run of axes whose product is a new run's.
  An axis split in several keeps its mesh axes on the first part of size > 1; axes merged
  into one stack their mesh axes (major first), which is exact while every axis before the
  last sharded one is sharded or of size 1.
  """
  out, i, j = [], 0, 0
  while i < len(old) or j < len(new):
    i0, j0 = i, j
    a, b = (old[i] if i < len(old) else 1), (new[j] if j < len(new) else 1)
    i, j = i + 1, j + 1
    while a != b:
      if a < b:
        a, i = a * old[i], i + 1
      else:
        b, j = b * new[j], j + 1
    entries = spec[i0:i]
    sharded = [k for k, entry in enumerate(entries) if entry is not None]
    if not sharded:
      out += [None] * (j - j0)
      continue
    if j - j0 > 1 and i - i0 > 1:
      return None
    if any(entries[k] is None and old[i0 + k] != 1 for k in range(sharded[-1])):
      return None
    names = tuple(n for entry in entries for n in _names(entry))
    part = [None] * (j - j0)
    first = next((k for k in range(j - j0) if new[j0 + k] != 1), 0)
    part[first] = names[0] if len(names) == 1 else names
    out += part
  return tuple(out[: len(new)])


def reshape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """``x.reshape(shape)``, keeping a sharding over explicit mesh axes through the reshape.

  With explicit axes (``jax.make_mesh``'s default) JAX asks for the output's sharding of
  any reshape that splits or merges a sharded axis, such as grouping N query heads sharded
  over K key heads as ``[K, G]``. The sharded axes here are batch and heads, and they stay
  whole on each device, so no data moves.
  """
  spec = _explicit_spec(x)
  shape = tuple(shape)
  if -1 in shape:
    known = math.prod(d for d in shape if d != -1)
    shape = tuple(x.size // known if d == -1 else d for d in shape)
  if spec is None or 0 in x.shape:
    return x.reshape(shape)
  out = _reshaped_spec(x.shape, spec, shape)
  if out is None:
    return x.reshape(shape)  # JAX says which sharding it cannot infer.
  mesh = jax.typeof(x).sharding.mesh  # Named, so that no mesh context is needed.
  return jax.lax.reshape(x, shape, out_sharding=jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(*out)))


def grouped(x: jax.Array, heads: int, kv_heads: int) -> jax.Array:
  """``[b, n, ...]`` with ``n`` in {1, N} as ``[b, K, G, ...]`` (or ``[b, 1, 1, ...]``)."""
  if x.shape[1] == 1:
    return x[:, :, None]
  return reshape(x, (x.shape[0], kv_heads, heads // kv_heads, *x.shape[2:]))


def reference(q, k, v, bias, mask, key_data, rate, config: Config) -> jax.Array:
  """The materialized attention: every ``[B, N, T, S]`` array exists at once.

  The oracle of the tests; differentiated by JAX's own autodiff.
  """
  batch, rows, heads, _ = q.shape
  cols, kv_heads = k.shape[1], k.shape[2]
  f32 = jnp.float32
  def repeat_heads(x):  # [B, S, K, H] -> [B, S, N, H], each key head G times
    x = jnp.broadcast_to(x[:, :, :, None], (*x.shape[:3], heads // kv_heads, x.shape[3]))
    return reshape(x, (*x.shape[:2], heads, x.shape[4]))

  kr, vr = repeat_heads(k), repeat_heads(v)
  logits = jnp.einsum(
      "btnh,bsnh->bnts", q.astype(f32), kr.astype(f32), precision=config.precision
  ) * config.scale
  if bias is not None:
    logits = logits + bias.astype(f32)
  allowed = allowed_positions(jnp.arange(rows), jnp.arange(cols), cols, config.is_causal, mask)
  logits = jnp.where(allowed, logits, -jnp.inf)
  top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  weights = jnp.exp(logits - jnp.where(jnp.isfinite(top), top, 0))
  total = jnp.sum(weights, axis=-1, keepdims=True)
  probs = weights / jnp.where(total == 0, 1, total)  # A NaN total (bias) stays NaN.
  if config.dropout:
    resolved = config.resolve(rate)
    heads_b, heads_n = config.dropout_heads
    keep = _masks.keep8_heads(key_data, resolved, (heads_b, heads_n, rows, cols))
    # fill is 0, or NaN for a traced rate outside [0, 1] (the output is then NaN).
    probs = jnp.where(keep, probs * resolved.scale, resolved.fill)
  out = jnp.einsum("bnts,bsnh->btnh", probs, vr.astype(f32), precision=config.precision)
  return out.astype(q.dtype)

