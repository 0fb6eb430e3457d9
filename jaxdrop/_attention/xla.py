"""Blockwise attention with dropout in ``jax.numpy``: the flash-attention algorithm.

The forward pass visits blocks of queries; for each it runs an online softmax
over blocks of keys, so only one ``[block_q, block_k]`` tile of scores per head
exists at a time. Dropout masks each tile with :func:`jaxdrop._masks.keep8_block`,
recomputed from the key. The backward pass (a ``custom_vjp``) keeps only the
output and the per-row log-sum-exp: it visits blocks of keys, and for each the
blocks of queries that can see them, recomputing scores, probabilities and the
mask tile by tile (FlashAttention-2, Dao 2023). With ``is_causal``, blocks
above the diagonal are skipped in both passes.

Work happens in a grouped layout: query ``[B, K, G, T, H]`` against key and
value ``[B, K, S, H]``, with ``G = N // K`` query heads per key head.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxdrop import _masks
from jaxdrop._attention import base

_F32 = jnp.float32


class BlockSizes(NamedTuple):
  """Tile sizes; any choice gives the same result (``k`` a multiple of 32)."""

  q: int = 256
  k: int = 512

  @classmethod
  def for_shape(cls, rows: int, cols: int) -> BlockSizes:
    """Tiles of at most the default sizes that pad the sequence lengths little.

    As many tiles as the defaults need, made as even as their alignment allows (``q`` a
    multiple of 8 or the whole length, ``k`` a multiple of 32), so that a length just past a multiple of a default tile
    (ViT's 1024 patches + 1 class token) pads a few rows, not a whole tile: T = S = 1025
    gets 5 x 3 tiles of 208 x 352 (1040 x 1056 padded) instead of 5 x 3 of 256 x 512
    (1280 x 1536).
    """
    default = cls()
    # A single query tile is the whole length: a decoding step's T = 1 pads nothing.
    q = min(_even_tile(rows, default.q, 8), max(rows, 1))
    return cls(q=q, k=_even_tile(cols, default.k, _masks.WORD))


def _even_tile(length: int, largest: int, multiple: int) -> int:
  """The multiple of ``multiple`` (at most ``largest``, itself a multiple) that tiles
  ``length`` with the fewest tiles and, among those, the least padding."""
  tiles = -(-max(length, 1) // largest)
  return _round_up(-(-max(length, 1) // tiles), multiple)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


class Layout(NamedTuple):
  """Static sizes of one call."""

  rows: int  # T
  cols: int  # S
  heads: int  # N
  kv_heads: int  # K
  blocks: BlockSizes
  # For a call on one shard of a larger attention (ring.py): the S of the whole mask
  # (None: cols), and whether every column offset (Position.col) is a multiple of
  # _masks.WORD, which lets the mask tiles start at their own column.
  mask_cols: int | None = None
  aligned: bool = True

  @property
  def num_q_blocks(self) -> int:
    return -(-self.rows // self.blocks.q)

  @property
  def num_k_blocks(self) -> int:
    return -(-self.cols // self.blocks.k)

  @property
  def groups_per_row(self) -> int:
    return -(-(self.mask_cols or self.cols) // _masks.LANES_8)


class Position(NamedTuple):
  """Where a call's arrays start in a larger attention: global offsets, ints or int32 scalars.

  The ring (ring.py) runs a shard of the queries against a shard of the keys; the mask and
  causality then follow the global ``(b, n, t, s)``. All zeros: the call is the whole
  attention.
  """

  row: jax.Array | int = 0  # t of local row 0
  col: jax.Array | int = 0  # s of local column 0
  batch: jax.Array | int = 0  # b of local batch element 0
  head: jax.Array | int = 0  # n of local query head 0


# ----------------------------------------------------------------------------
# Inputs in the grouped, padded layout.


class _Operands(NamedTuple):
  q: jax.Array  # [B, K, G, Tp, H]
  k: jax.Array  # [B, K, Sp, H]
  v: jax.Array  # [B, K, Sp, H]
  bias: jax.Array | None  # [b, K|1, G|1, Tp|1, Sp|1]
  mask: jax.Array | None  # same layout, bool
  keys: jax.Array | None  # uint32[Bm, K|1, G|1, 2]


def _operands(
    layout: Layout, config: base.Config, position: Position, q, k, v, bias, mask, key_data
) -> _Operands:
  rows_p = layout.num_q_blocks * layout.blocks.q
  cols_p = layout.num_k_blocks * layout.blocks.k
  heads, kv_heads = layout.heads, layout.kv_heads
  q = base.reshape(q, (q.shape[0], layout.rows, kv_heads, heads // kv_heads, -1))
  q = base.pad_axis(q.transpose(0, 2, 3, 1, 4), 3, rows_p)
  k = base.pad_axis(k.transpose(0, 2, 1, 3), 2, cols_p)
  v = base.pad_axis(v.transpose(0, 2, 1, 3), 2, cols_p)

  def blockable(x):
    if x is None:
      return None
    x = base.grouped(x, heads, kv_heads)
    return base.pad_unless_broadcast(base.pad_unless_broadcast(x, 3, rows_p), 4, cols_p)

  keys = None
  if config.dropout:
    keys = _masks.head_keys(key_data, *config.dropout_heads)
    if config.dropout_heads not in ((1, 1), (q.shape[0], heads)):  # A shard's heads (ring.py).
      keys = jax.lax.dynamic_slice(keys, (position.batch, position.head, 0), (q.shape[0], heads, 2))
    keys = base.grouped(keys, heads, kv_heads)
  return _Operands(q, k, v, blockable(bias), blockable(mask), keys)


def _slice_rows(x: jax.Array, axis: int, start, size: int) -> jax.Array:
  """``x[..., start:start + size, ...]`` on ``axis``; a broadcast axis stays whole."""
  if x.shape[axis] == 1:
    return x
  return jax.lax.dynamic_slice_in_dim(x, start, size, axis)


def _block_logits(layout, config, ops: _Operands, position: Position, q_block, t0, s0):
  """f32[B, K, G, bq, bk] scores of one tile, -inf where not allowed."""
  bq, bk = layout.blocks
  k_block = jax.lax.dynamic_slice_in_dim(ops.k, s0, bk, 2)
  logits = jnp.einsum(
      "bkgqh,bkch->bkgqc", q_block, k_block,
      preferred_element_type=_F32, precision=config.precision,
  ) * config.scale
  if ops.bias is not None:
    logits = logits + _slice_rows(_slice_rows(ops.bias, 3, t0, bq), 4, s0, bk).astype(_F32)
  mask = None
  if ops.mask is not None:
    mask = _slice_rows(_slice_rows(ops.mask, 3, t0, bq), 4, s0, bk)
  allowed = base.allowed_positions(
      position.row + t0 + jnp.arange(bq), position.col + s0 + jnp.arange(bk),
      position.col + layout.cols, config.is_causal, mask,
  )
  return jnp.where(allowed, logits, -jnp.inf)


def _block_keep(layout, ops: _Operands, resolved, position: Position, t0, s0):
  bq, bk = layout.blocks
  row, col = position.row + t0, position.col + s0
  if layout.aligned:
    return _masks.keep8_block(
        ops.keys, row, bq, col, bk, layout.groups_per_row, resolved.threshold, resolved.keep_any
    )
  # Mask tiles start on a word: make the word-aligned tile one word wider, and cut ours out.
  skew = col % _masks.WORD
  keep = _masks.keep8_block(
      ops.keys, row, bq, col - skew, bk + _masks.WORD, layout.groups_per_row,
      resolved.threshold, resolved.keep_any,
  )
  return jax.lax.dynamic_slice_in_dim(keep, skew, bk, keep.ndim - 1)


def k_block_range(layout: Layout, config: base.Config, position: Position, q_index):
  """Key blocks ``[0, stop)`` that a block of queries can see."""
  if not config.is_causal:
    return layout.num_k_blocks
  last_row = position.row + (q_index + 1) * layout.blocks.q - 1
  return jnp.clip((last_row - position.col) // layout.blocks.k + 1, 0, layout.num_k_blocks)


def _q_block_start(layout: Layout, config: base.Config, position: Position, k_index):
  """The first query block that can see key block ``k_index`` (``num_q_blocks``: none)."""
  if not config.is_causal:
    return 0
  first_col = position.col + k_index * layout.blocks.k
  return jnp.clip((first_col - position.row) // layout.blocks.q, 0, layout.num_q_blocks)


# ----------------------------------------------------------------------------
# Forward.


def forward(layout, config, q, k, v, bias, mask, key_data, rate, position=Position()):
  """Returns ``f32 out [B, T, N, H]`` and the row log-sum-exp ``f32[B, K, G, Tp]``.

  A row with no allowed position has ``out`` 0 and log-sum-exp ``+inf``.
  """
  ops = _operands(layout, config, position, q, k, v, bias, mask, key_data)
  resolved = config.resolve(rate) if config.dropout else None
  bq, bk = layout.blocks

  def q_block(q_index):
    t0 = q_index * bq
    q_tile = jax.lax.dynamic_slice_in_dim(ops.q, t0, bq, 3)

    def k_step(k_index, carry):
      top, total, acc = carry
      s0 = k_index * bk
      logits = _block_logits(layout, config, ops, position, q_tile, t0, s0)
      new_top = jnp.maximum(top, jnp.max(logits, axis=-1))
      safe_top = jnp.where(jnp.isfinite(new_top), new_top, 0)
      weights = jnp.exp(logits - safe_top[..., None])
      rescale = jnp.exp(top - safe_top)
      # The softmax is normalized before dropout: the sum counts dropped weights too.
      total = total * rescale + jnp.sum(weights, axis=-1)
      if resolved is not None:
        weights = jnp.where(_block_keep(layout, ops, resolved, position, t0, s0), weights, 0)
      v_tile = jax.lax.dynamic_slice_in_dim(ops.v, s0, bk, 2)
      acc = acc * rescale[..., None] + jnp.einsum(
          "bkgqc,bkch->bkgqh", weights.astype(v.dtype), v_tile,
          preferred_element_type=_F32, precision=config.precision,
      )
      return new_top, total, acc

    # Initial values made "like" the operands keep their sharding.
    init = (
        base.full_like(q_tile[..., 0], -jnp.inf, _F32),
        base.full_like(q_tile[..., 0], 0, _F32),
        base.full_like(q_tile, 0, _F32),
    )
    stop = k_block_range(layout, config, position, q_index)
    top, total, acc = jax.lax.fori_loop(0, stop, k_step, init)
    empty = total == 0  # not NaN: a NaN bias makes its row NaN
    safe_total = jnp.where(empty, 1, total)
    out = acc / safe_total[..., None]
    if resolved is not None:
      out = out * resolved.scale
    lse = jnp.where(empty, jnp.inf, top + jnp.log(safe_total))
    return out, lse

  out, lse = jax.lax.map(q_block, jnp.arange(layout.num_q_blocks))
  # [nq, B, K, G, bq, H] -> [B, T, N, H]
  batch, kv_heads, groups = ops.q.shape[:3]
  out = base.reshape(out.transpose(1, 0, 4, 2, 3, 5),
                     (batch, -1, kv_heads * groups, out.shape[-1]))
  lse = base.reshape(lse.transpose(1, 2, 3, 0, 4), (batch, kv_heads, groups, -1))
  return out[:, : layout.rows], lse


# ----------------------------------------------------------------------------
# Backward.


def _reduce_to(x: jax.Array, like: jax.Array) -> jax.Array:
  """Sums ``x`` over the axes where ``like`` broadcasts (has size 1)."""
  axes = tuple(i for i, (a, b) in enumerate(zip(x.shape, like.shape)) if b == 1 and a != 1)
  return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def _add_block(buffer: jax.Array, update: jax.Array, t0, s0) -> jax.Array:
  """``buffer[..., t0:, s0:] += update`` on the axes where ``buffer`` is not broadcast."""
  starts = [0, 0, 0, t0 if buffer.shape[3] > 1 else 0, s0 if buffer.shape[4] > 1 else 0]
  current = jax.lax.dynamic_slice(buffer, starts, update.shape)
  return jax.lax.dynamic_update_slice(buffer, current + update, starts)


def backward(layout, config, residuals, d_out, position=Position()):
  """Returns f32 ``dq, dk, dv, d_bias`` (None without a bias) in the inputs' shapes."""
  q, k, v, bias, mask, key_data, rate, out, lse = residuals
  ops = _operands(layout, config, position, q, k, v, bias, mask, key_data)
  resolved = config.resolve(rate) if config.dropout else None
  bq, bk = layout.blocks
  rows_p = layout.num_q_blocks * bq
  batch, kv_heads, groups = ops.q.shape[:3]

  def grouped_rows(x):  # [B, T, N, H] -> [B, K, G, Tp, H]
    x = base.reshape(x, (batch, layout.rows, kv_heads, groups, -1)).transpose(0, 2, 3, 1, 4)
    return base.pad_axis(x, 3, rows_p)

  d_out = grouped_rows(d_out)
  # D_t = sum_s P * dP = dO_t . O_t, dropout included (O = (P * keep * c) V).
  delta = jnp.sum(d_out.astype(_F32) * grouped_rows(out).astype(_F32), axis=-1)

  def k_block(carry, k_index):
    dq, d_bias = carry
    s0 = k_index * bk
    k_tile = jax.lax.dynamic_slice_in_dim(ops.k, s0, bk, 2)
    v_tile = jax.lax.dynamic_slice_in_dim(ops.v, s0, bk, 2)

    def q_step(q_index, inner):
      dq, d_bias, dk, dv = inner
      t0 = q_index * bq
      q_tile = jax.lax.dynamic_slice_in_dim(ops.q, t0, bq, 3)
      do_tile = jax.lax.dynamic_slice_in_dim(d_out, t0, bq, 3)
      logits = _block_logits(layout, config, ops, position, q_tile, t0, s0)
      probs = jnp.exp(logits - jax.lax.dynamic_slice_in_dim(lse, t0, bq, 3)[..., None])
      d_probs = jnp.einsum(
          "bkgqh,bkch->bkgqc", do_tile, v_tile,
          preferred_element_type=_F32, precision=config.precision,
      )
      used = probs
      if resolved is not None:
        keep = _block_keep(layout, ops, resolved, position, t0, s0)
        used = jnp.where(keep, probs * resolved.scale, 0)
        d_probs = jnp.where(keep, d_probs * resolved.scale, 0)
      dv = dv + jnp.einsum(
          "bkgqc,bkgqh->bkch", used.astype(v.dtype), do_tile,
          preferred_element_type=_F32, precision=config.precision,
      )
      d_logits = probs * (d_probs - jax.lax.dynamic_slice_in_dim(delta, t0, bq, 3)[..., None])
      if d_bias is not None:
        d_bias = _add_block(d_bias, _reduce_to(d_logits, d_bias), t0, s0)
      d_scores = (d_logits * config.scale).astype(q.dtype)
      dk = dk + jnp.einsum(
          "bkgqc,bkgqh->bkch", d_scores, q_tile,
          preferred_element_type=_F32, precision=config.precision,
      )
      dq_tile = jnp.einsum(
          "bkgqc,bkch->bkgqh", d_scores, k_tile,
          preferred_element_type=_F32, precision=config.precision,
      )
      dq = jax.lax.dynamic_update_slice_in_dim(
          dq, jax.lax.dynamic_slice_in_dim(dq, t0, bq, 3) + dq_tile, t0, 3
      )
      return dq, d_bias, dk, dv

    zeros = base.full_like(k_tile, 0, _F32)
    dq, d_bias, dk, dv = jax.lax.fori_loop(
        _q_block_start(layout, config, position, k_index), layout.num_q_blocks, q_step,
        (dq, d_bias, zeros, zeros),
    )
    return (dq, d_bias), (dk, dv)

  d_bias = None if ops.bias is None else base.full_like(ops.bias, 0, _F32)
  (dq, d_bias), (dk, dv) = jax.lax.scan(
      k_block, (base.full_like(ops.q, 0, _F32), d_bias), jnp.arange(layout.num_k_blocks)
  )
  dq = base.reshape(dq[:, :, :, : layout.rows].transpose(0, 3, 1, 2, 4), q.shape)

  def ungroup_keys(x):  # [nk, B, K, bk, H] -> [B, S, K, H]
    x = base.reshape(x.transpose(1, 0, 3, 2, 4), (batch, -1, kv_heads, x.shape[-1]))
    return x[:, : layout.cols]

  if d_bias is not None:
    d_bias = base.reshape(d_bias[:, :, :, : bias.shape[2], : bias.shape[3]], bias.shape)
  return dq, ungroup_keys(dk), ungroup_keys(dv), d_bias


# ----------------------------------------------------------------------------
# The differentiable function.


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attention(layout, config, q, k, v, bias, mask, key_data, rate):
  return forward(layout, config, q, k, v, bias, mask, key_data, rate)[0].astype(q.dtype)


def _attention_fwd(layout, config, q, k, v, bias, mask, key_data, rate):
  out, lse = forward(layout, config, q, k, v, bias, mask, key_data, rate)
  out = out.astype(q.dtype)
  return out, (q, k, v, bias, mask, key_data, rate, out, lse)


def _attention_bwd(layout, config, residuals, d_out):
  q, k, v, bias = residuals[:4]
  dq, dk, dv, d_bias = backward(layout, config, residuals, d_out)
  d_bias = None if d_bias is None else d_bias.astype(bias.dtype)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_bias, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q, k, v, bias, mask, key_data, rate, config: base.Config, blocks: BlockSizes | None = None):
  """Blockwise attention; arguments as :func:`base.reference` (already validated).

  Args:
    blocks: tile sizes (``blocks.k`` a multiple of 32); None picks defaults.
  """
  rows, heads = q.shape[1], q.shape[2]
  cols, kv_heads = k.shape[1], k.shape[2]
  if blocks is None:
    blocks = BlockSizes.for_shape(rows, cols)
  if blocks.k % _masks.WORD or blocks.q < 1 or blocks.k < 1:
    raise ValueError(f"blocks.k must be a positive multiple of {_masks.WORD}, got {blocks}")
  layout = Layout(rows, cols, heads, kv_heads, BlockSizes(*blocks))
  return _attention(layout, config, q, k, v, bias, mask, key_data, rate)

