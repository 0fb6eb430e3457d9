"""Ring attention: attention with dropout over a sequence sharded across devices.

Inside ``shard_map``, each of the ``P`` devices along ``axis_name`` holds a shard of the
queries and a shard of the keys and values. The key/value shards travel around the ring
(``jax.lax.ppermute``, device ``i`` to ``i + 1``); at each of the ``P`` steps a device runs
the blockwise attention of :mod:`xla` of its queries against the shard it holds, at that
shard's global offsets, and merges the result into its running output and row
log-sum-exp. The backward pass (a ``custom_vjp``) keeps only the output and the
log-sum-exp, and runs the same ring: ``dk`` and ``dv`` travel with their shard and are home
after one more hop (Liu et al., Ring Attention, 2023).

A device's sequence shard is ``chunks`` contiguous chunks: one (``"contiguous"``), or two
(``"zigzag"``: chunks ``i`` and ``2P - 1 - i`` of ``2P``, which gives every device the same
causal work). A step attends every query chunk to every key chunk of the shard it holds.
Every position is global, so the dropout mask is the one-device mask, and causal runs skip
the chunk pairs and the tiles above the diagonal.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdrop import _masks
from jaxdrop import _validate
from jaxdrop._attention import api
from jaxdrop._attention import base
from jaxdrop._attention import xla

LAYOUTS = ("contiguous", "zigzag")
_F32 = jnp.float32


class _Ring(NamedTuple):
  """The static part of one ring call (hashable)."""

  axis_name: object
  devices: int  # P
  chunks: int  # chunks per device: 1 contiguous, 2 zigzag
  pair: xla.Layout  # one query chunk against one key chunk
  config: base.Config
  batch_axis: object
  head_axis: object

  @property
  def chunk_rows(self) -> int:
    return self.pair.rows

  @property
  def chunk_cols(self) -> int:
    return self.pair.cols


def _pair_layout(q_shape, k_shape, devices: int, chunks: int) -> xla.Layout:
  """The blockwise layout of one query chunk against one key chunk (local shapes)."""
  rows, cols = q_shape[1] // chunks, k_shape[1] // chunks
  return xla.Layout(
      rows, cols, q_shape[2], k_shape[2], xla.BlockSizes.for_shape(rows, cols),
      mask_cols=k_shape[1] * devices, aligned=cols % _masks.WORD == 0,
  )


def _global_chunk(ring: _Ring, device, chunk):
  """The index among all ``P * chunks`` sequence chunks of a device's ``chunk``."""
  if ring.chunks == 1:
    return device
  return jnp.where(chunk == 0, device, 2 * ring.devices - 1 - device)


def _position(ring: _Ring, device, source, q_chunk, k_chunk, batch=0, head=0):
  """The global offsets of a query chunk of ``device`` against a key chunk of ``source``.

  Returns the :class:`xla.Position` and whether any of its weights lies on or below the
  diagonal (always True without ``is_causal``).
  """
  row = _global_chunk(ring, device, q_chunk) * ring.chunk_rows
  col = _global_chunk(ring, source, k_chunk) * ring.chunk_cols
  visible = (not ring.config.is_causal) or col <= row + ring.chunk_rows - 1
  return xla.Position(row, col, batch, head), visible


def _offsets(ring: _Ring, batch: int, heads: int):
  """This device's index on the ring, and its global batch and head offsets."""
  def offset(axis, size):
    return 0 if axis is None else jax.lax.axis_index(axis) * size

  return jax.lax.axis_index(ring.axis_name), offset(ring.batch_axis, batch), offset(
      ring.head_axis, heads)


def _each_visible_pair(ring: _Ring, device, source, batch, head, attend, state):
  """``state`` through ``attend(position, t0, s0, state)`` for each pair of a query chunk here
  and a key chunk of the ``source`` device's shard that has weights on or below the diagonal;
  ``t0`` and ``s0`` are the chunks' starts in the local shards."""

  def pair(index, state):
    q_chunk, k_chunk = index // ring.chunks, index % ring.chunks
    position, visible = _position(ring, device, source, q_chunk, k_chunk, batch, head)
    run = lambda state: attend(position, q_chunk * ring.chunk_rows, k_chunk * ring.chunk_cols,
                               state)
    if visible is True:
      return run(state)
    return jax.lax.cond(visible, run, lambda state: state, state)

  return jax.lax.fori_loop(0, ring.chunks * ring.chunks, pair, state)


def _slice(x: jax.Array | None, axis: int, start, size: int) -> jax.Array | None:
  """``x[..., start:start + size, ...]`` on ``axis``; an axis of size 1 broadcasts and stays."""
  if x is None or x.shape[axis] == 1:
    return x
  return jax.lax.dynamic_slice_in_dim(x, start, size, axis)


def _window(ring: _Ring, x: jax.Array | None, t0, col) -> jax.Array | None:
  """The rows of a query chunk and the columns of a key chunk of ``bias`` or ``mask``."""
  return _slice(_slice(x, 2, t0, ring.chunk_rows), 3, col, ring.chunk_cols)


def _add_slice(buffer: jax.Array, update: jax.Array, starts: dict[int, object]) -> jax.Array:
  """``buffer[...] += update`` at ``starts`` ({axis: start}); broadcast axes start at 0."""
  index = [0] * buffer.ndim
  for axis, start in starts.items():
    if buffer.shape[axis] != 1:
      index[axis] = start
  current = jax.lax.dynamic_slice(buffer, index, update.shape)
  return jax.lax.dynamic_update_slice(buffer, current + update, index)


def _row_lse(ring: _Ring, lse: jax.Array) -> jax.Array:
  """``[B, K, G, Tp]`` from :func:`xla.forward` as ``[B, T, N]``, ``-inf`` where empty."""
  batch = lse.shape[0]
  lse = lse[..., : ring.chunk_rows].reshape(batch, ring.pair.heads, ring.chunk_rows)
  return jnp.where(lse == jnp.inf, -jnp.inf, lse).transpose(0, 2, 1)


def _grouped_lse(ring: _Ring, lse: jax.Array) -> jax.Array:
  """The inverse of :func:`_row_lse`, padded with ``+inf`` (weight 0), for :func:`xla.backward`."""
  batch, rows, _ = lse.shape
  groups = ring.pair.heads // ring.pair.kv_heads
  lse = jnp.where(lse == -jnp.inf, jnp.inf, lse).transpose(0, 2, 1)
  lse = lse.reshape(batch, ring.pair.kv_heads, groups, rows)
  padded = ring.pair.num_q_blocks * ring.pair.blocks.q
  return jnp.pad(lse, [(0, 0)] * 3 + [(0, padded - rows)], constant_values=jnp.inf)


def _merge(out, lse, step_out, step_lse):
  """Two partial softmax results over disjoint keys as one: ``(out, lse)`` of their union."""
  total = jnp.logaddexp(lse, step_lse)
  safe = jnp.where(total == -jnp.inf, 0, total)  # Neither saw a key: out stays 0.
  out = out * jnp.exp(lse - safe)[..., None] + step_out * jnp.exp(step_lse - safe)[..., None]
  return out, total


def _ring_steps(ring: _Ring, step, carry, shards, grads=()):
  """Runs ``step(source, shards, grads, carry) -> (carry, grads)`` on the ``P`` shards.

  ``source`` is the device whose shard passes by. Each step first sends its shard on, so
  that the transfer overlaps the work; after ``P`` steps every shard is home again (the
  last hop is not needed, but keeps a single copy of the step in the program). ``grads``
  (the backward's dk and dv) travel with their shard, one hop behind, since its step adds
  to them: the last hop brings them home.

  Returns ``carry`` and ``grads`` after the last step.
  """
  perm = [(i, (i + 1) % ring.devices) for i in range(ring.devices)]
  device = jax.lax.axis_index(ring.axis_name)

  def send_and_attend(j, state):
    shards, grads, carry = state
    incoming = jax.lax.ppermute(shards, ring.axis_name, perm)
    carry, grads = step((device - j) % ring.devices, shards, grads, carry)
    if grads:
      grads = jax.lax.ppermute(grads, ring.axis_name, perm)
    return incoming, grads, carry

  _, grads, carry = jax.lax.fori_loop(0, ring.devices, send_and_attend, (shards, grads, carry))
  return carry, grads


def _forward(ring: _Ring, q, k, v, bias, mask, key_data, rate):
  """Returns ``f32 out [B, T/P, N, H]`` and the row log-sum-exp ``f32[B, T/P, N]``."""
  rows, cols = ring.chunk_rows, ring.chunk_cols
  device, batch, head = _offsets(ring, q.shape[0], q.shape[2])

  def step(source, shards, grads, carry):
    k, v = shards

    def attend(position, t0, s0, carry):
      out, lse = carry
      pair_out, pair_lse = xla.forward(
          ring.pair, ring.config,
          _slice(q, 1, t0, rows), _slice(k, 1, s0, cols), _slice(v, 1, s0, cols),
          _window(ring, bias, t0, position.col), _window(ring, mask, t0, position.col),
          key_data, rate, position,
      )
      merged = _merge(
          _slice(out, 1, t0, rows), _slice(lse, 1, t0, rows), pair_out, _row_lse(ring, pair_lse)
      )
      return tuple(
          jax.lax.dynamic_update_slice_in_dim(whole, part, t0, 1)
          for whole, part in zip((out, lse), merged)
      )

    return _each_visible_pair(ring, device, source, batch, head, attend, carry), grads

  # Made "like" q, the carries vary over the mesh axes as q does (shard_map's check_vma).
  init = (jnp.zeros_like(q, _F32), jnp.full_like(q[..., 0], -jnp.inf, _F32))
  return _ring_steps(ring, step, init, (k, v))[0]


def _backward(ring: _Ring, residuals, d_out):
  """Returns f32 ``dq, dk, dv, d_bias`` (None without a bias) in the inputs' shapes."""
  q, k, v, bias, mask, key_data, rate, out, lse = residuals
  rows, cols = ring.chunk_rows, ring.chunk_cols
  device, batch, head = _offsets(ring, q.shape[0], q.shape[2])

  def step(source, shards, grads, carry):
    k, v = shards

    def attend(position, t0, s0, state):
      (dq, d_bias), (dk, dv) = state
      residuals = (
          _slice(q, 1, t0, rows), _slice(k, 1, s0, cols), _slice(v, 1, s0, cols),
          _window(ring, bias, t0, position.col), _window(ring, mask, t0, position.col),
          key_data, rate,
          _slice(out, 1, t0, rows), _grouped_lse(ring, _slice(lse, 1, t0, rows)),
      )
      g_q, g_k, g_v, g_bias = xla.backward(
          ring.pair, ring.config, residuals, _slice(d_out, 1, t0, rows), position
      )
      dq = _add_slice(dq, g_q, {1: t0})
      if d_bias is not None:
        d_bias = _add_slice(d_bias, g_bias, {2: t0, 3: position.col})
      return (dq, d_bias), (_add_slice(dk, g_k, {1: s0}), _add_slice(dv, g_v, {1: s0}))

    return _each_visible_pair(ring, device, source, batch, head, attend, (carry, grads))

  d_bias = None
  if bias is not None:  # It varies as q does, whatever bias does (a row-broadcast bias does not).
    d_bias = jnp.zeros_like(bias, _F32) + jnp.zeros_like(q, _F32, shape=())
  zeros = jnp.zeros_like(k, _F32)
  (dq, d_bias), (dk, dv) = _ring_steps(
      ring, step, (jnp.zeros_like(q, _F32), d_bias), (k, v), (zeros, zeros))
  return dq, dk, dv, d_bias


# ----------------------------------------------------------------------------
# The differentiable function.


def _varying_axes(x: jax.Array) -> frozenset:
  """The mesh axes over which ``x`` may differ between devices, under ``check_vma``.

  jax 0.10 moved ``jax.typeof(x).vma`` to ``.manual_axis_type.varying``.
  """
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)
  return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_attention(ring, q, k, v, bias, mask, key_data, rate):
  return _forward(ring, q, k, v, bias, mask, key_data, rate)[0].astype(q.dtype)


def _ring_attention_fwd(ring, q, k, v, bias, mask, key_data, rate):
  out, lse = _forward(ring, q, k, v, bias, mask, key_data, rate)
  out = out.astype(q.dtype)
  return out, (q, k, v, bias, mask, key_data, rate, out, lse)


def _ring_attention_bwd(ring, residuals, d_out):
  q, k, v, bias = residuals[:4]
  dq, dk, dv, d_bias = _backward(ring, residuals, d_out)
  if d_bias is not None:
    # A bias the same on several devices (a row-broadcast one, say) gets the sum of theirs.
    shared = tuple(axis for axis in _varying_axes(d_bias) if axis not in _varying_axes(bias))
    d_bias = (jax.lax.psum(d_bias, shared) if shared else d_bias).astype(bias.dtype)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_bias, None, None, None


_ring_attention.defvjp(_ring_attention_fwd, _ring_attention_bwd)


# ----------------------------------------------------------------------------
# The public functions.


def _axis_size(axis, name: str) -> int:
  """The size of mesh axis (or axes) ``axis``; an error names the argument if it is unbound."""
  try:
    return jax.lax.psum(1, axis)
  except NameError as error:
    raise ValueError(
        f"{name}={axis!r} is not a mesh axis here: ring_attention runs inside "
        f"jax.shard_map, with {name} naming an axis of its mesh ({error})"
    ) from None


def _check_layout(layout) -> int:
  """The number of chunks per device of ``layout``."""
  if layout not in LAYOUTS:
    raise ValueError(
        f"layout must be one of {', '.join(map(repr, LAYOUTS))}, got layout={layout!r}")
  return LAYOUTS.index(layout) + 1


def _check_implementation(implementation) -> None:
  api.check_implementation(implementation)
  if implementation not in (None, "xla"):
    raise ValueError(
        f"ring_attention supports implementation=None or 'xla' (each step runs the blockwise "
        f"path); implementation={implementation!r} is not supported yet"
    )


def ring_attention(
    query: jax.typing.ArrayLike,
    key: jax.typing.ArrayLike,
    value: jax.typing.ArrayLike,
    bias: jax.typing.ArrayLike | None = None,
    mask: jax.typing.ArrayLike | None = None,
    *,
    axis_name,
    scale: float | None = None,
    is_causal: bool = False,
    dropout_rate: float | jax.typing.ArrayLike = 0.0,
    dropout_key: jax.typing.ArrayLike | None = None,
    deterministic: bool = False,
    layout: str = "contiguous",
    batch_axis=None,
    head_axis=None,
    implementation: str | None = None,
) -> jax.Array:
  """:func:`dot_product_attention` over a sequence sharded across devices, inside ``shard_map``.

  Each of the ``P`` devices along mesh axis ``axis_name`` passes its shard of the
  sequence; the key/value shards travel around the ring (``jax.lax.ppermute``) so that
  each device attends its queries to every key, and the result is this device's shard of
  what :func:`dot_product_attention` gives on the whole sequence, with the same dropout
  mask: :func:`attention_keep_mask` at the global ``(b, n, t, s)``. The backward pass
  runs the same ring and stores only the output and the row log-sum-exp.

  With ``layout="contiguous"``, device ``i`` holds positions ``[i T/P, (i + 1) T/P)``
  of the queries (and the same of the keys, ``S/P`` each). With ``layout="zigzag"``, the
  sequence is cut into ``2P`` chunks and device ``i`` holds chunks ``i`` and
  ``2P - 1 - i``, in that order: permute the sequence with :func:`zigzag_permutation`
  before sharding it. That gives every device the same causal work.

  Args:
    query: this device's ``[B, T/P, N, H]``.
    key: this device's ``[B, S/P, K, H]``, with ``K`` dividing ``N``.
    value: this device's ``[B, S/P, K, H]``.
    bias: a float array broadcastable to ``[B, N, T/P, S]``: this device's query rows
      (in its local order) and all ``S`` key columns, in sequence order (global ``s``).
      It costs ``T S / P`` elements per device (and as much again for its gradient).
    mask: a bool array broadcastable to ``[B, N, T/P, S]``, rows and columns as ``bias``;
      True = may attend.
    axis_name: the mesh axis (or tuple of axes) that shards the sequence.
    scale: the score scale, a finite Python float; ``1 / sqrt(H)`` by default.
    is_causal: if True, query ``t`` attends only keys ``s <= t`` (global positions);
      key shards and tiles wholly above the diagonal are skipped.
    dropout_rate: probability to drop each attention weight, as in
      :func:`dot_product_attention`.
    dropout_key: a threefry PRNG key, the same on every device; needed while dropout is
      active.
    deterministic: if True, no dropout.
    layout: ``"contiguous"`` or ``"zigzag"``.
    batch_axis: the mesh axis (or axes) that shards ``B``, if any, so that the mask uses
      the global batch index.
    head_axis: the mesh axis (or axes) that shards ``N`` and ``K``, if any.
    implementation: ``None`` or ``"xla"``: each step runs the blockwise ``"xla"`` path.
      ``"pallas"`` per step is not supported yet (a ``ValueError``).

  Returns:
    This device's ``[B, T/P, N, H]`` of the output, in the dtype of ``query``.

  Raises:
    ValueError: as :func:`dot_product_attention`; an ``axis_name``, ``batch_axis`` or
      ``head_axis`` that is not a mesh axis of the enclosing ``shard_map``; an unknown
      ``layout``; zigzag shards of odd length; an ``implementation`` other than None or
      ``"xla"``.
    TypeError: as :func:`dot_product_attention`.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxdrop
    >>> from jax.sharding import PartitionSpec as P
    >>> mesh = jax.make_mesh((1,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,))
    >>> attend = jax.shard_map(
    ...     lambda q, k, v: jaxdrop.ring_attention(q, k, v, axis_name="seq"),
    ...     mesh=mesh, in_specs=P(None, "seq"), out_specs=P(None, "seq"))
    >>> q = k = v = jnp.ones((1, 16, 2, 8))
    >>> attend(q, k, v).shape
    (1, 16, 2, 8)
  """
  q, k, v = api._check_qkv(query, key, value)
  devices = _axis_size(axis_name, "axis_name")
  batch_devices = 1 if batch_axis is None else _axis_size(batch_axis, "batch_axis")
  head_devices = 1 if head_axis is None else _axis_size(head_axis, "head_axis")
  chunks = _check_layout(layout)
  _check_implementation(implementation)
  batch, local_rows, heads, head_dim = q.shape
  local_cols = k.shape[1]
  if local_rows % chunks or local_cols % chunks:
    raise ValueError(
        f"layout='zigzag' holds two equal chunks per device, so each device's query and key "
        f"lengths must be even, got T/P={local_rows} and S/P={local_cols}"
    )
  cols = local_cols * devices
  target = (batch, heads, local_rows, cols)
  bias = api._check_broadcastable(bias, "bias", target, boolean=False)
  mask = api._check_broadcastable(mask, "mask", target, boolean=True)
  scale = api._check_scale(scale, head_dim)
  if not isinstance(is_causal, (bool, np.bool_)):
    raise TypeError(f"is_causal must be a bool, got is_causal={is_causal!r}")
  fixed = _validate.static_rate(dropout_rate, "dropout_rate")
  deterministic = _validate.check_deterministic(deterministic)
  if deterministic or fixed == 0.0:
    fixed, key_data, rate = 0.0, None, None
  elif fixed == 1.0:
    return jnp.zeros_like(q)  # Every weight dropped.
  else:
    key_data = api._key_data(dropout_key, dropout_rate)
    _masks.check_attention_size(local_rows * devices, cols)
    rate = None if fixed is not None else dropout_rate
  if q.size == 0 or cols == 0:
    return jnp.zeros_like(q)
  config = base.Config(
      scale=scale,
      is_causal=bool(is_causal),
      dropout_heads=(batch * batch_devices, heads * head_devices),
      fixed_rate=fixed,
  )
  pair = _pair_layout(q.shape, k.shape, devices, chunks)
  ring = _Ring(axis_name, devices, chunks, pair, config, batch_axis, head_axis)
  return _ring_attention(ring, q, k, v, bias, mask, key_data, rate)


def zigzag_permutation(length: int, num_devices: int) -> np.ndarray:
  """The order of a sequence for ``ring_attention(..., layout="zigzag")``.

  The sequence is cut into ``2 P`` equal chunks (``P = num_devices``), and device ``i``
  takes chunks ``i`` and ``2P - 1 - i``. ``x[:, perm]``, split contiguously over the
  devices, gives each device its two chunks in that order; ``y[:, np.argsort(perm)]``
  restores the sequence order.

  Args:
    length: the sequence length, a multiple of ``2 * num_devices``.
    num_devices: ``P``, the number of devices along the sequence.

  Returns:
    An integer array of the ``length`` positions: chunk 0, chunk ``2P - 1``, chunk 1,
    chunk ``2P - 2``, and so on.

  Raises:
    TypeError: a length or device count that is not an integer.
    ValueError: a negative length, fewer than one device, or a length that
      ``2 * num_devices`` does not divide.

  Examples:
    >>> import jaxdrop
    >>> jaxdrop.zigzag_permutation(8, 2)
    array([0, 1, 6, 7, 2, 3, 4, 5])
  """
  for name, value in (("length", length), ("num_devices", num_devices)):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
      raise TypeError(f"{name} must be an int, got {name}={value!r}")
  if length < 0 or num_devices < 1:
    raise ValueError(
        f"zigzag_permutation needs length >= 0 and num_devices >= 1, got length={length} "
        f"and num_devices={num_devices}"
    )
  chunks = 2 * num_devices
  if length % chunks:
    raise ValueError(
        f"the zigzag layout cuts the sequence into 2 * num_devices = {chunks} equal chunks, "
        f"so length must be a multiple of {chunks}, got length={length}"
    )
  size = length // chunks
  order = [c for i in range(num_devices) for c in (i, chunks - 1 - i)]
  return np.concatenate([np.arange(c * size, (c + 1) * size) for c in order])
