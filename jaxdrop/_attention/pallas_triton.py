"""Fused attention with dropout for GPUs: Pallas kernels for the Triton backend.

The same function as :mod:`jaxdrop._attention.xla` (FlashAttention-2, Dao
2023), written as Pallas kernels so that scores, probabilities and the dropout
mask of a tile never leave the chip.

Kernels (grids in parentheses; ``i``/``j`` index query/key blocks):

- forward ``(T/bq, B, N)``: one program owns ``bq`` queries of one head, keeps
  the running max, sum and output in registers and walks the key blocks (an
  online softmax). It writes the output and the row log-sum-exp (base 2): the
  only residuals.
- ``delta = sum_h dO * O`` per row, in XLA (one cheap pass).
- dk/dv ``(S/bk, B, K)``: one program owns ``bk`` keys of one key/value head
  and walks the ``N/K`` query heads that read it (grouped-query attention,
  summed in registers, no atomics) and their query blocks, recomputing scores,
  probabilities and mask.
- dq ``(T/bq, B, N)``: like the forward, walking key blocks again.
- dbias (only with a bias): one program per tile of the bias as given, summing
  the score gradient over the batch elements, heads, rows or columns that the
  bias broadcasts over.

Every kernel recomputes its dropout mask tile from the head key of
:func:`jaxdrop._masks.head_keys` with :func:`jaxdrop._masks.keep8_tile`, the
in-kernel form of the 8-bit attention mask: a ``bq x bk`` tile costs
``bq * bk / 8`` hashes, and the mask is never read or written.

With ``is_causal`` the loops skip blocks that lie wholly above the diagonal:
the forward and dq kernels stop at the last key block a query block can see,
and the dk/dv kernel starts at the first query block that can see its keys.

``T`` and ``S`` are padded (in XLA) to multiples of the blocks; padded keys
are masked out and padded query rows are sliced off. ``H`` is zero-padded to a
power of two of at least 16 (Triton's tiles): zero columns add nothing to a
score and are sliced off the output, so ``H = 96`` costs what 128 does, plus
the padded copies. Scores are kept in base 2 (``exp2``), so the saved
log-sum-exp is ``log2``-based; only these kernels read it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxdrop import _masks
from jaxdrop._attention import base

_F32 = jnp.float32
_LOG2E = math.log2(math.e)
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
_MIN_BLOCK = 16  # Triton's dot needs 16 rows and columns.
_MAX_HEAD_DIM = 256  # The forward keeps a (bq, H) float32 accumulator in registers.
# Named TritonCompilerParams in older jax releases.
_COMPILER_PARAMS = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")


# jax >= 0.11 warns with this whenever it lowers a Triton kernel.
TRITON_DEPRECATION = "The Pallas Triton backend is deprecated"


@contextlib.contextmanager
def triton_deprecation_ignored():
  """Ignores jax's deprecation warning of its Triton backend, and only it, inside the block.

  jaxdrop keeps these kernels while jax ships the backend and falls back to
  "xla" once it is gone (docs/attention.md): the warning gives jaxdrop's users
  nothing to act on.
  """
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=TRITON_DEPRECATION, category=DeprecationWarning)
    yield


class BlockSizes(NamedTuple):
  """Tile sizes and launch options; each size a power of two >= 16.

  The defaults were chosen on an H100 (``benchmarks/gpu_attention_check.py``'s
  "tune" section, docs/performance.md): 64 x 64 tiles with 4 warps and 3 stages
  were the fastest uniform choice for H 64 and 128, with and without dropout,
  causal or not. The tiles never change the result's mask.

  Attributes:
    q, k: queries per forward program and keys per step of its loop.
    q_dkv, k_dkv: queries per step and keys per program of the dk/dv kernel.
    q_dq, k_dq: queries per program and keys per step of the dq kernel.
    num_warps: Triton warps per program; None picks per kernel: 4 for tiles of
      at most 64 x 64 with ``H <= 128``, else 8.
    num_stages: Triton software-pipelining stages of the loops; None picks per
      kernel: 3 where a (tile, H) operand block takes at most 16 KiB (so 64 x
      128 in bf16, 64 x 64 in float32), else 2, to stay within shared memory.
  """

  q: int = 64
  k: int = 64
  q_dkv: int = 64
  k_dkv: int = 64
  q_dq: int = 64
  k_dq: int = 64
  num_warps: int | None = None
  num_stages: int | None = None

  def shrunk(self, rows: int, cols: int) -> BlockSizes:
    """The same blocks, shrunk to at most the (power-of-two) sequence lengths."""
    r = max(_MIN_BLOCK, pl.next_power_of_2(rows))
    c = max(_MIN_BLOCK, pl.next_power_of_2(cols))
    return self._replace(
        q=min(self.q, r), k=min(self.k, c), q_dkv=min(self.q_dkv, r),
        k_dkv=min(self.k_dkv, c), q_dq=min(self.q_dq, r), k_dq=min(self.k_dq, c),
    )

  @property
  def row_multiple(self) -> int:
    return max(self.q, self.q_dkv, self.q_dq)

  @property
  def col_multiple(self) -> int:
    return max(self.k, self.k_dkv, self.k_dq)


def _check_blocks(blocks) -> BlockSizes:
  if not isinstance(blocks, BlockSizes):
    raise TypeError(f"blocks must be a pallas_triton.BlockSizes or None, got blocks={blocks!r}")
  for name in ("q", "k", "q_dkv", "k_dkv", "q_dq", "k_dq"):
    size = getattr(blocks, name)
    if not isinstance(size, int) or size < _MIN_BLOCK or size & (size - 1):
      raise ValueError(
          f"blocks.{name} must be a power of two >= {_MIN_BLOCK}, got blocks.{name}={size!r}"
      )
  return blocks


class _Dims(NamedTuple):
  """Which of (B, N, T, S) a bias or mask has in full (the others are 1)."""

  b: bool
  n: bool
  t: bool
  s: bool


class _Static(NamedTuple):
  """Everything static about one call (hashable)."""

  rows: int  # T
  cols: int  # S
  rows_p: int  # T padded to the query blocks
  cols_p: int  # S padded to the key blocks
  heads: int  # N
  kv_heads: int  # K
  head_dim: int  # H
  itemsize: int  # bytes per element of q, k and v
  blocks: BlockSizes
  scale: float
  causal: bool
  dropout: bool
  shared_keys: bool  # one mask for every batch element and head
  bias: _Dims | None
  mask: _Dims | None
  precision: object
  interpret: bool

  @property
  def groups(self) -> int:  # query heads per key/value head
    return self.heads // self.kv_heads

  @property
  def groups_per_row(self) -> int:  # hashes per mask row: ceil(S / 8)
    return -(-self.cols // _masks.LANES_8)

  def compiler_params(self, rows: int, cols: int):
    """Launch options of a kernel whose tiles are ``rows x cols``."""
    warps, stages = self.blocks.num_warps, self.blocks.num_stages
    if warps is None:
      warps = 4 if rows * cols <= 64 * 64 and self.head_dim <= 128 else 8
    if stages is None:
      stages = 3 if max(rows, cols) * self.head_dim * self.itemsize <= 16 * 1024 else 2
    return _COMPILER_PARAMS(num_warps=warps, num_stages=stages)


# ----------------------------------------------------------------------------
# Tile computations shared by the kernels (traced inside them).


def _load_broadcast(ref, dims: _Dims, head, t0, rows: int, s0, cols: int):
  """A ``(rows|1, cols|1)`` tile of a bias or mask ref (``head`` indexes a head axis)."""
  index = () if head is None else (head,)
  index += (pl.ds(t0, rows) if dims.t else pl.ds(0, 1),)
  index += (pl.ds(s0, cols) if dims.s else pl.ds(0, 1),)
  return ref[index]


def _dot(st: _Static, a, b, contract):
  return lax.dot_general(
      a, b, (contract, ((), ())), precision=st.precision, preferred_element_type=_F32
  )


def _scores(st: _Static, q, k, bias, mask, t0, s0, rows: int, cols: int):
  """f32[rows, cols]: ``log2(e) * (scale * q.k + bias)``, -inf where not allowed."""
  scores = _dot(st, q, k, ((1,), (1,))) * (st.scale * _LOG2E)
  if bias is not None:
    scores = scores + bias.astype(_F32) * _LOG2E
  allowed = None

  def both(a, b):
    return b if a is None else a & b

  if st.cols_p != st.cols:
    allowed = lax.broadcasted_iota(jnp.int32, (1, cols), 1) + s0 < st.cols
  if st.causal:
    t = lax.broadcasted_iota(jnp.int32, (rows, cols), 0) + t0
    s = lax.broadcasted_iota(jnp.int32, (rows, cols), 1) + s0
    allowed = both(allowed, s <= t)
  if mask is not None:
    allowed = both(allowed, mask != 0)
  if allowed is not None:
    scores = jnp.where(allowed, scores, -jnp.inf)
  return scores


def _causal_stop(st: _Static, q_block, bq: int, bk: int, num_k_blocks: int):
  """Key blocks ``[0, stop)`` that query block ``q_block`` can see."""
  if not st.causal:
    return num_k_blocks
  return jnp.minimum(num_k_blocks, lax.div((q_block + 1) * bq + bk - 1, bk))


# ----------------------------------------------------------------------------
# Kernels. Each names its refs, inputs then outputs; an input the call does not
# have (bias, mask; keys, threshold and dscale without dropout) is None.


def _forward_kernel(
    q_ref, k_ref, v_ref, bias_ref, mask_ref, keys_ref, threshold_ref, dscale_ref,
    out_ref, lse_ref, *, st: _Static,
):
  bq, bk = st.blocks.q, st.blocks.k
  q_block = pl.program_id(0)
  t0 = q_block * bq
  q = q_ref[...]
  if st.dropout:
    k0, k1, threshold = keys_ref[0], keys_ref[1], threshold_ref[()]

  def body(k_block, carry):
    acc, top, total = carry
    s0 = k_block * bk
    bias = None if bias_ref is None else _load_broadcast(bias_ref, st.bias, None, t0, bq, s0, bk)
    mask = None if mask_ref is None else _load_broadcast(mask_ref, st.mask, None, t0, bq, s0, bk)
    scores = _scores(st, q, k_ref[pl.ds(s0, bk), :], bias, mask, t0, s0, bq, bk)
    new_top = jnp.maximum(top, jnp.max(scores, axis=1))
    safe_top = jnp.where(new_top == -jnp.inf, 0.0, new_top)
    weights = jnp.exp2(scores - safe_top[:, None])
    rescale = jnp.exp2(top - safe_top)
    total = total * rescale + jnp.sum(weights, axis=1)
    if st.dropout:
      keep = _masks.keep8_tile(k0, k1, threshold, t0, s0, bq, bk, st.groups_per_row)
      weights = jnp.where(keep, weights, 0.0)
    v = v_ref[pl.ds(s0, bk), :]
    acc = acc * rescale[:, None] + _dot(st, weights.astype(v.dtype), v, ((1,), (0,)))
    return acc, new_top, total

  init = (
      jnp.zeros((bq, st.head_dim), _F32),
      jnp.full((bq,), -jnp.inf, _F32),
      jnp.zeros((bq,), _F32),
  )
  stop = _causal_stop(st, q_block, bq, bk, st.cols_p // bk)
  acc, top, total = lax.fori_loop(0, stop, body, init)
  empty = total == 0  # not NaN: a NaN bias makes its row NaN
  safe_total = jnp.where(empty, 1.0, total)
  out = acc / safe_total[:, None]
  if st.dropout:
    out = out * dscale_ref[()]
  out_ref[...] = out.astype(out_ref.dtype)
  lse_ref[...] = jnp.where(empty, jnp.inf, top + jnp.log2(safe_total))


def _dq_kernel(
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
    bias_ref, mask_ref, keys_ref, threshold_ref, dscale_ref,
    dq_ref, *, st: _Static,
):
  bq, bk = st.blocks.q_dq, st.blocks.k_dq
  q_block = pl.program_id(0)
  t0 = q_block * bq
  q, d_out = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  if st.dropout:
    k0, k1, threshold = keys_ref[0], keys_ref[1], threshold_ref[()]
    dscale = dscale_ref[()]

  def body(k_block, dq):
    s0 = k_block * bk
    bias = None if bias_ref is None else _load_broadcast(bias_ref, st.bias, None, t0, bq, s0, bk)
    mask = None if mask_ref is None else _load_broadcast(mask_ref, st.mask, None, t0, bq, s0, bk)
    k = k_ref[pl.ds(s0, bk), :]
    probs = jnp.exp2(_scores(st, q, k, bias, mask, t0, s0, bq, bk) - lse[:, None])
    d_probs = _dot(st, d_out, v_ref[pl.ds(s0, bk), :], ((1,), (1,)))
    if st.dropout:
      keep = _masks.keep8_tile(k0, k1, threshold, t0, s0, bq, bk, st.groups_per_row)
      d_probs = jnp.where(keep, d_probs * dscale, 0.0)
    d_scores = probs * (d_probs - delta[:, None])
    return dq + _dot(st, d_scores.astype(k.dtype), k, ((1,), (0,)))

  stop = _causal_stop(st, q_block, bq, bk, st.cols_p // bk)
  dq = lax.fori_loop(0, stop, body, jnp.zeros((bq, st.head_dim), _F32))
  dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)


def _dkdv_kernel(
    k_ref, v_ref, q_ref, do_ref, lse_ref, delta_ref,
    bias_ref, mask_ref, keys_ref, threshold_ref, dscale_ref,
    dk_ref, dv_ref, *, st: _Static,
):
  bq, bk = st.blocks.q_dkv, st.blocks.k_dkv
  s0 = pl.program_id(0) * bk
  k, v = k_ref[...], v_ref[...]
  if st.dropout:
    threshold = threshold_ref[()]
  # The first query block that sees this key block (rows t >= s0).
  start = lax.div(s0, bq) if st.causal else 0

  def group(g, carry):
    if st.dropout:
      k0, k1 = (keys_ref[0], keys_ref[1]) if st.shared_keys else (keys_ref[g, 0], keys_ref[g, 1])
    head = g  # index on the head axis of per-head refs

    def step(q_block, carry):
      dk, dv = carry
      t0 = q_block * bq
      rows = pl.ds(t0, bq)
      q = q_ref[rows, head, :]
      d_out = do_ref[rows, head, :]
      lse, delta = lse_ref[head, rows], delta_ref[head, rows]
      bias = mask = None
      if bias_ref is not None:
        bias = _load_broadcast(bias_ref, st.bias, head if st.bias.n else None, t0, bq, s0, bk)
      if mask_ref is not None:
        mask = _load_broadcast(mask_ref, st.mask, head if st.mask.n else None, t0, bq, s0, bk)
      probs = jnp.exp2(_scores(st, q, k, bias, mask, t0, s0, bq, bk) - lse[:, None])
      d_probs = _dot(st, d_out, v, ((1,), (1,)))
      used = probs
      if st.dropout:
        keep = _masks.keep8_tile(k0, k1, threshold, t0, s0, bq, bk, st.groups_per_row)
        used = jnp.where(keep, probs, 0.0)  # times dscale, applied to dv at the end
        d_probs = jnp.where(keep, d_probs * dscale_ref[()], 0.0)
      dv = dv + _dot(st, used.astype(d_out.dtype), d_out, ((0,), (0,)))
      d_scores = probs * (d_probs - delta[:, None])
      dk = dk + _dot(st, d_scores.astype(q.dtype), q, ((0,), (0,)))
      return dk, dv

    return lax.fori_loop(start, st.rows_p // bq, step, carry)

  zeros = jnp.zeros((bk, st.head_dim), _F32)
  dk, dv = lax.fori_loop(0, st.groups, group, (zeros, zeros))
  if st.dropout:
    dv = dv * dscale_ref[()]
  dk_ref[...] = (dk * st.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dbias_kernel(
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
    bias_ref, mask_ref, keys_ref, threshold_ref, dscale_ref,
    dbias_ref, *, st: _Static, bq: int, bk: int,
):
  """One tile of d(bias): the score gradient summed over what the bias broadcasts."""
  dims = st.bias
  pid_t, pid_s, pid_b, pid_n = (pl.program_id(a) for a in range(4))
  batch = q_ref.shape[0]
  # The loop runs over every (b, n, t block, s block) that adds into this tile.
  extents = (
      1 if dims.b else batch,
      1 if dims.n else st.heads,
      1 if dims.t else st.rows_p // bq,
      1 if dims.s else st.cols_p // bk,
  )
  if st.dropout:
    threshold, dscale = threshold_ref[()], dscale_ref[()]

  def body(index, acc):
    parts = []
    for extent in reversed(extents):
      parts.append(lax.rem(index, extent))
      index = lax.div(index, extent)
    lb, ln, lt, ls = reversed(parts)
    b = pid_b if dims.b else lb
    n = pid_n if dims.n else ln
    t0 = (pid_t if dims.t else lt) * bq
    s0 = (pid_s if dims.s else ls) * bk
    rows, cols = pl.ds(t0, bq), pl.ds(s0, bk)
    kv = lax.div(n, st.groups)
    q, d_out = q_ref[b, rows, n, :], do_ref[b, rows, n, :]
    k, v = k_ref[b, cols, kv, :], v_ref[b, cols, kv, :]
    lse, delta = lse_ref[b, n, rows], delta_ref[b, n, rows]
    bias = bias_ref[...]  # this program's (bq|1, bk|1) tile
    mask = None
    if mask_ref is not None:
      md = st.mask
      mask = mask_ref[
          b if md.b else 0, n if md.n else 0,
          rows if md.t else pl.ds(0, 1), cols if md.s else pl.ds(0, 1),
      ]
    probs = jnp.exp2(_scores(st, q, k, bias, mask, t0, s0, bq, bk) - lse[:, None])
    d_probs = _dot(st, d_out, v, ((1,), (1,)))
    if st.dropout:
      key_b = 0 if st.shared_keys else b
      key_n = 0 if st.shared_keys else n
      k0, k1 = keys_ref[key_b, key_n, 0], keys_ref[key_b, key_n, 1]
      keep = _masks.keep8_tile(k0, k1, threshold, t0, s0, bq, bk, st.groups_per_row)
      d_probs = jnp.where(keep, d_probs * dscale, 0.0)
    d_scores = probs * (d_probs - delta[:, None])
    if not dims.t:
      d_scores = jnp.sum(d_scores, axis=0, keepdims=True)
    if not dims.s:
      d_scores = jnp.sum(d_scores, axis=1, keepdims=True)
    return acc + d_scores

  shape = (bq if dims.t else 1, bk if dims.s else 1)
  acc = lax.fori_loop(0, math.prod(extents), body, jnp.zeros(shape, _F32))
  dbias_ref[...] = acc


# ----------------------------------------------------------------------------
# pallas_call wrappers. Inputs are padded: q [B, Tp, N, H], k/v [B, Sp, K, H],
# bias/mask [b, n, Tp|1, Sp|1] (mask as int8), keys uint32[Bm, Nm, 2].


def _scalar_spec():
  return pl.BlockSpec((), lambda *_: ())


def _optional_inputs(st: _Static, bias, mask, keys, threshold, dscale, per_head_spec, keys_spec):
  """(array, spec) of bias, mask, keys, threshold and dscale; (None, None) where absent."""
  inputs = [
      (None, None) if bias is None else (bias, per_head_spec(st.bias)),
      (None, None) if mask is None else (mask, per_head_spec(st.mask)),
  ]
  if not st.dropout:
    return inputs + [(None, None)] * 3
  return inputs + [(keys, keys_spec), (threshold, _scalar_spec()), (dscale, _scalar_spec())]


def _call(kernel, st: _Static, inputs, outputs, grid, name: str, tile, **kernel_args):
  """Runs ``kernel``; ``inputs`` and ``outputs`` are (array, spec) pairs in its refs' order."""
  in_arrays, in_specs = zip(*inputs)
  out_shapes, out_specs = zip(*outputs)
  return pl.pallas_call(
      functools.partial(kernel, st=st, **kernel_args),
      grid=grid,
      in_specs=list(in_specs),
      out_specs=list(out_specs),
      out_shape=list(out_shapes),
      compiler_params=st.compiler_params(*tile),
      interpret=st.interpret,
      name=name,
  )(*in_arrays)


def _row_program_specs(st: _Static, bq: int):
  """Specs for grids ``(q block i, b, n)``: one query block of one head."""
  groups, h = st.groups, st.head_dim

  def per_head(dims: _Dims):
    block = (None, None, st.rows_p if dims.t else 1, st.cols_p if dims.s else 1)
    return pl.BlockSpec(block, lambda i, b, n: (b if dims.b else 0, n if dims.n else 0, 0, 0))

  if st.shared_keys:
    keys = pl.BlockSpec((None, None, 2), lambda i, b, n: (0, 0, 0))
  else:
    keys = pl.BlockSpec((None, None, 2), lambda i, b, n: (b, n, 0))
  rows = pl.BlockSpec((None, bq, None, h), lambda i, b, n: (b, i, n, 0))
  whole_kv = pl.BlockSpec((None, st.cols_p, None, h), lambda i, b, n: (b, 0, lax.div(n, groups), 0))
  stats = pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, i))
  return per_head, keys, rows, whole_kv, stats


def _forward(st: _Static, q, k, v, bias, mask, keys, threshold, dscale):
  """out [B, Tp, N, H] and lse f32[B, N, Tp] (base 2)."""
  batch = q.shape[0]
  bq = st.blocks.q
  per_head, keys_spec, rows, whole_kv, stats = _row_program_specs(st, bq)
  inputs = [(q, rows), (k, whole_kv), (v, whole_kv)]
  inputs += _optional_inputs(st, bias, mask, keys, threshold, dscale, per_head, keys_spec)
  outputs = [
      (jax.ShapeDtypeStruct(q.shape, q.dtype), rows),
      (jax.ShapeDtypeStruct((batch, st.heads, st.rows_p), _F32), stats),
  ]
  grid = (st.rows_p // bq, batch, st.heads)
  return _call(_forward_kernel, st, inputs, outputs, grid, "jaxdrop_attention_fwd",
               (bq, st.blocks.k))


def _backward(st: _Static, residuals, d_out):
  q, k, v, bias, mask, keys, threshold, dscale, out, lse = residuals
  batch, h, groups = q.shape[0], st.head_dim, st.groups
  # D_t = dO_t . O_t, dropout included: O = (P * keep * c) V.
  delta = jnp.einsum("btnh,btnh->bnt", d_out.astype(_F32), out.astype(_F32))

  # dq: grid (q block, b, n).
  bq = st.blocks.q_dq
  per_head, keys_spec, rows, whole_kv, stats = _row_program_specs(st, bq)
  inputs = [
      (q, rows), (k, whole_kv), (v, whole_kv), (d_out, rows), (lse, stats), (delta, stats),
  ]
  inputs += _optional_inputs(st, bias, mask, keys, threshold, dscale, per_head, keys_spec)
  (dq,) = _call(
      _dq_kernel, st, inputs, [(jax.ShapeDtypeStruct(q.shape, q.dtype), rows)],
      (st.rows_p // bq, batch, st.heads), "jaxdrop_attention_dq", (bq, st.blocks.k_dq),
  )

  # dk, dv: grid (k block, b, kv head); each program sees its `groups` query heads.
  bk = st.blocks.k_dkv

  def group_per_head(dims: _Dims):
    block = (None, groups if dims.n else None, st.rows_p if dims.t else 1, st.cols_p if dims.s else 1)
    return pl.BlockSpec(block, lambda j, b, kh: (b if dims.b else 0, kh if dims.n else 0, 0, 0))

  if st.shared_keys:
    group_keys = pl.BlockSpec((None, None, 2), lambda j, b, kh: (0, 0, 0))
  else:
    group_keys = pl.BlockSpec((None, groups, 2), lambda j, b, kh: (b, kh, 0))
  kv_rows = pl.BlockSpec((None, bk, None, h), lambda j, b, kh: (b, j, kh, 0))
  group_q = pl.BlockSpec((None, st.rows_p, groups, h), lambda j, b, kh: (b, 0, kh, 0))
  group_stats = pl.BlockSpec((None, groups, st.rows_p), lambda j, b, kh: (b, kh, 0))
  inputs = [
      (k, kv_rows), (v, kv_rows), (q, group_q), (d_out, group_q),
      (lse, group_stats), (delta, group_stats),
  ]
  inputs += _optional_inputs(st, bias, mask, keys, threshold, dscale, group_per_head, group_keys)
  dk, dv = _call(
      _dkdv_kernel, st, inputs,
      [
          (jax.ShapeDtypeStruct(k.shape, k.dtype), kv_rows),
          (jax.ShapeDtypeStruct(v.shape, v.dtype), kv_rows),
      ],
      (st.cols_p // bk, batch, st.kv_heads), "jaxdrop_attention_dkdv", (st.blocks.q_dkv, bk),
  )

  d_bias = None
  if st.bias is not None:
    d_bias = _bias_gradient(st, q, k, v, bias, mask, keys, threshold, dscale, d_out, lse, delta)
  return dq, dk, dv, d_bias


def _bias_gradient(st: _Static, q, k, v, bias, mask, keys, threshold, dscale, d_out, lse, delta):
  dims = st.bias
  bq, bk = st.blocks.q_dkv, st.blocks.k_dkv
  tile = (bq if dims.t else 1, bk if dims.s else 1)

  def whole(x):
    return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)

  bias_spec = pl.BlockSpec((None, None) + tile, lambda i, j, b, n: (b, n, i, j))
  inputs = [
      (q, whole(q)), (k, whole(k)), (v, whole(v)), (d_out, whole(d_out)),
      (lse, whole(lse)), (delta, whole(delta)), (bias, bias_spec),
      (None, None) if mask is None else (mask, whole(mask)),
  ]
  if st.dropout:
    inputs += [(keys, whole(keys)), (threshold, _scalar_spec()), (dscale, _scalar_spec())]
  else:
    inputs += [(None, None)] * 3
  grid = (
      st.rows_p // bq if dims.t else 1, st.cols_p // bk if dims.s else 1,
      bias.shape[0], bias.shape[1],
  )
  (d_bias,) = _call(
      _dbias_kernel, st, inputs,
      [(jax.ShapeDtypeStruct(bias.shape, _F32), bias_spec)],
      grid, "jaxdrop_attention_dbias", (bq, bk), bq=bq, bk=bk,
  )
  return d_bias


# ----------------------------------------------------------------------------
# The differentiable function (on padded operands).


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(st, q, k, v, bias, mask, keys, threshold, dscale):
  return _forward(st, q, k, v, bias, mask, keys, threshold, dscale)[0]


def _attention_fwd(st, q, k, v, bias, mask, keys, threshold, dscale):
  out, lse = _forward(st, q, k, v, bias, mask, keys, threshold, dscale)
  return out, (q, k, v, bias, mask, keys, threshold, dscale, out, lse)


def _attention_bwd(st, residuals, d_out):
  dq, dk, dv, d_bias = _backward(st, residuals, d_out)
  if d_bias is not None:
    d_bias = d_bias.astype(residuals[3].dtype)
  return dq, dk, dv, d_bias, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _dims(x: jax.Array | None) -> _Dims | None:
  return None if x is None else _Dims(*(size > 1 for size in x.shape))


def unsupported_reason(q, k, v, bias, mask, config: base.Config, platform: str | None = None) -> str | None:
  """Why the kernels cannot run this call, or None when they can.

  Args:
    q, k, v, bias, mask, config: as :func:`attention` (arrays or shape-dtype
      structs); ``bias`` and ``mask`` already 4-D.
    platform: the backend to run on; None means ``jax.default_backend()``.
      The kernels compile for ``"gpu"`` only (the interpreter runs anywhere).

  Returns:
    None, or a message naming the unsupported argument and its value.
  """
  platform = jax.default_backend() if platform is None else platform
  if platform not in ("gpu", "cuda", "rocm"):
    return f"implementation='pallas' runs on GPUs (Triton), got platform={platform!r}"
  return _operand_reason(q, k, v, bias, mask, config)


def _operand_reason(q, k, v, bias, mask, config: base.Config) -> str | None:
  """The part of :func:`unsupported_reason` that does not depend on the platform."""
  del v, mask, config  # Every mask, causal flag, rate and mask sharing is supported.
  dtype = jnp.dtype(q.dtype)
  if dtype not in DTYPES:
    return (
        f"implementation='pallas' supports bfloat16, float16 and float32 inputs, got "
        f"query.dtype={dtype}"
    )
  head_dim = q.shape[-1]
  if not 1 <= head_dim <= _MAX_HEAD_DIM:
    return (
        f"implementation='pallas' needs a head dimension H in [1, {_MAX_HEAD_DIM}], got "
        f"H={head_dim} (query.shape={tuple(q.shape)})"
    )
  if q.shape[1] == 0 or k.shape[1] == 0:
    return f"implementation='pallas' needs T, S >= 1, got T={q.shape[1]}, S={k.shape[1]}"
  if bias is not None and jnp.dtype(bias.dtype) not in DTYPES:
    return (
        f"implementation='pallas' supports bfloat16, float16 and float32 bias, got "
        f"bias.dtype={jnp.dtype(bias.dtype)}"
    )
  return None


def padded_head_dim(head_dim: int) -> int:
  """The head dimension the kernels run at: the next power of two, at least 16."""
  return max(_MIN_BLOCK, pl.next_power_of_2(head_dim))


class Prepared(NamedTuple):
  """One call's static description and its padded kernel operands."""

  st: _Static
  operands: tuple  # (q, k, v, bias, mask, keys, threshold, dscale), as the kernels take them


def prepare(
    q, k, v, bias, mask, key_data, rate, config: base.Config,
    blocks: BlockSizes | None = None, interpret: bool = False,
) -> Prepared:
  """What :func:`attention` hands the kernels: arguments as there.

  ``_forward(p.st, *p.operands)`` runs the forward kernel alone, and
  ``_backward(p.st, (*p.operands, out, lse), d_out)`` the backward ones, as
  ``benchmarks/gpu_attention_check.py`` times them. Both work at the padded
  sizes: ``d_out`` is ``[B, p.st.rows_p, N, p.st.head_dim]``, zero-padded.

  Raises:
    ValueError: as :func:`attention`.
  """
  # No platform check here: the kernels also lower for "cuda" from another host
  # (jax.export); callers that pick an implementation use unsupported_reason.
  reason = _operand_reason(q, k, v, bias, mask, config)
  if reason is not None:
    raise ValueError(reason)
  rows, heads, head_dim = q.shape[1:]
  cols, kv_heads = k.shape[1], k.shape[2]
  head_dim_p = padded_head_dim(head_dim)
  blocks = _check_blocks(BlockSizes() if blocks is None else blocks).shrunk(rows, cols)
  rows_p = -(-rows // blocks.row_multiple) * blocks.row_multiple
  cols_p = -(-cols // blocks.col_multiple) * blocks.col_multiple
  st = _Static(
      rows=rows, cols=cols, rows_p=rows_p, cols_p=cols_p, heads=heads, kv_heads=kv_heads,
      head_dim=head_dim_p, itemsize=jnp.dtype(q.dtype).itemsize, blocks=blocks,
      scale=float(config.scale), causal=config.is_causal,
      dropout=config.dropout, shared_keys=tuple(config.dropout_heads) == (1, 1),
      bias=_dims(bias), mask=_dims(mask), precision=config.precision,
      interpret=bool(interpret),
  )
  q = base.pad_axis(base.pad_axis(q, 1, rows_p), 3, head_dim_p)
  k = base.pad_axis(base.pad_axis(k, 1, cols_p), 3, head_dim_p)
  v = base.pad_axis(base.pad_axis(v, 1, cols_p), 3, head_dim_p)
  if bias is not None:
    bias = base.pad_unless_broadcast(base.pad_unless_broadcast(bias, 2, rows_p), 3, cols_p)
  if mask is not None:
    mask = base.pad_unless_broadcast(
        base.pad_unless_broadcast(mask.astype(jnp.int8), 2, rows_p), 3, cols_p
    )
  keys = threshold = dscale = None
  if st.dropout:
    resolved = config.resolve(rate)
    keys = _masks.head_keys(key_data, *config.dropout_heads)
    threshold = _masks.kernel_threshold(resolved, _masks.ATTENTION_BITS)
    dscale = resolved.scale.astype(_F32)
  return Prepared(st, (q, k, v, bias, mask, keys, threshold, dscale))


def attention(
    q, k, v, bias, mask, key_data, rate, config: base.Config,
    blocks: BlockSizes | None = None, interpret: bool = False,
):
  """Fused attention with dropout; arguments as :func:`xla.attention` (already validated).

  Args:
    q: ``[B, T, N, H]``.
    k, v: ``[B, S, K, H]`` with ``K`` dividing ``N``.
    bias: float, 4-D, broadcastable to ``[B, N, T, S]``, or None.
    mask: bool, 4-D, broadcastable to ``[B, N, T, S]``, or None.
    key_data: uint32[2] threefry key data (None without dropout).
    rate: the traced rate (None when ``config.fixed_rate`` is set).
    config: the static :class:`base.Config`.
    blocks: tile sizes; None uses the :class:`BlockSizes` defaults, shrunk to
      the sequence lengths.
    interpret: run the kernels in the Pallas interpreter (any backend; slow).

  Returns:
    ``[B, T, N, H]`` in the dtype of ``q``.

  Raises:
    ValueError: bad ``blocks``, or operands the kernels do not
      support (see :func:`unsupported_reason`, less its platform check).
  """
  prepared = prepare(q, k, v, bias, mask, key_data, rate, config, blocks, interpret)
  out = _attention(prepared.st, *prepared.operands)
  return out[:, : q.shape[1], :, : q.shape[3]]
