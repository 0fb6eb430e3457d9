"""Ring attention inside shard_map equals one-device attention, with the same dropout mask.

Each mesh runs in its own subprocess with 8 simulated CPU devices (conftest's
``run_with_devices``); each case compiles its forward and backward once, as one ``jax.vjp``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdrop
from conftest import run_with_devices

PRELUDE = """
import numpy as np, jax, jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import jaxdrop

assert jax.device_count() == 8, jax.devices()
shard_map = getattr(jax, "shard_map", None)
if shard_map is None:  # jax < 0.7
  from jax.experimental.shard_map import shard_map


def make_mesh(shape, names):
  return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape),
                       devices=jax.devices()[:int(np.prod(shape))])


def inputs(B, T, S, N, K, H, dtype, seed=0):
  ks = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(ks[0], (B, T, N, H), dtype)
  k = jax.random.normal(ks[1], (B, S, K, H), dtype)
  v = jax.random.normal(ks[2], (B, S, K, H), dtype)
  bias = jax.random.normal(ks[3], (B, N, T, S), dtype)
  return q, k, v, bias, jax.random.normal(ks[4], (B, T, N, H), dtype)


def ring_and_one(mesh, layout, batch_axis=None, head_axis=None, **options):
  '''(ring, one): functions of (q, k, v, bias, mask) in sequence order, on the mesh and on
  one device; ``bias`` [B, N, T, S], ``mask`` [B, 1, T, S].'''
  seq = mesh.shape["seq"]
  def order(length):
    return (jaxdrop.zigzag_permutation(length, seq) if layout == "zigzag"
            else np.arange(length))
  qkv = P(batch_axis, "seq", head_axis)
  sharded = shard_map(
      lambda q, k, v, bias, mask: jaxdrop.ring_attention(
          q, k, v, bias, mask, axis_name="seq", layout=layout, batch_axis=batch_axis,
          head_axis=head_axis, **options),
      mesh=mesh, in_specs=(qkv, qkv, qkv, P(batch_axis, head_axis, "seq"),
                           P(batch_axis, None, "seq")),
      out_specs=qkv)

  def ring(q, k, v, bias, mask):
    rows, cols = order(q.shape[1]), order(k.shape[1])
    out = sharded(q[:, rows], k[:, cols], v[:, cols], bias[:, :, rows], mask[:, :, rows])
    return out[:, np.argsort(rows)]

  def one(q, k, v, bias, mask):
    return jaxdrop.dot_product_attention(q, k, v, bias, mask, implementation="reference",
                                         **options)
  return ring, one


def out_and_grads(f, q, k, v, bias, mask, d_out):
  '''The output and the gradients of q, k, v, bias: one compiled forward and backward.'''
  def run(q, k, v, bias):
    out, vjp = jax.vjp(lambda *a: f(*a, mask), q, k, v, bias)
    return out, vjp(d_out)
  return jax.jit(run)(q, k, v, bias)


def check(name, mesh, layout, B=2, T=32, S=32, N=4, K=2, H=8, dtype=jnp.float32,
          batch_axis=None, head_axis=None, masked_row=None, **options):
  q, k, v, bias, d_out = inputs(B, T, S, N, K, H, dtype)
  mask = jnp.ones((B, 1, T, S), bool)
  if masked_row is not None:
    mask = mask.at[:, :, masked_row].set(False)
  ring, one = ring_and_one(mesh, layout, batch_axis, head_axis, dropout_key=jax.random.key(3),
                           **options)
  got = out_and_grads(ring, q, k, v, bias, mask, d_out)
  want = out_and_grads(one, q, k, v, bias, mask, d_out)
  tol = dict(rtol=2e-5, atol=2e-5) if dtype == jnp.float32 else dict(rtol=5e-2, atol=5e-2)
  (out, grads), (want_out, want_grads) = got, want
  assert out.dtype == dtype, out.dtype
  for what, a, b in zip(("out", "dq", "dk", "dv", "dbias"), (out, *grads),
                        (want_out, *want_grads)):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               err_msg=f"{name}: {what}", **tol)
  if masked_row is not None:
    np.testing.assert_array_equal(np.asarray(out[:, masked_row]), 0)
    assert all(bool(jnp.isfinite(g).all()) for g in grads), name
  print(name, "ok")
"""


def test_two_devices():
  code = PRELUDE + """
mesh = make_mesh((2,), ("seq",))
check("contiguous causal MHA", mesh, "contiguous", N=2, K=2, is_causal=True, dropout_rate=0.3)
check("zigzag causal GQA, T != S, masked row", mesh, "zigzag", T=24, S=40, is_causal=True,
      dropout_rate=0.3, masked_row=5)
check("contiguous bfloat16", mesh, "contiguous", dtype=jnp.bfloat16, dropout_rate=0.2)
"""
  assert run_with_devices(code).count(" ok") == 3


def test_four_devices_with_a_batch_or_head_axis():
  code = PRELUDE + """
check("zigzag causal, batch axis", make_mesh((4, 2), ("seq", "data")), "zigzag", B=4,
      batch_axis="data", is_causal=True, dropout_rate=0.3)
check("contiguous GQA, head axis, T != S", make_mesh((4, 2), ("seq", "model")), "contiguous",
      T=48, S=32, N=4, K=2, head_axis="model", dropout_rate=0.3)
"""
  assert run_with_devices(code).count(" ok") == 2


def test_eight_devices_unaligned_offsets_and_the_exact_mask():
  """S = 64 over 8 zigzag devices: chunks of 4 keys, offsets off every mask word.

  With value = identity (H = S), the output row is ``P * keep * c``: its zeros are the
  dropout mask, which must be the one-device mask bit for bit.
  """
  code = PRELUDE + """
mesh = make_mesh((8,), ("seq",))
check("zigzag causal, chunks of 3 queries and 4 keys", mesh, "zigzag", B=1, T=48, S=64,
      is_causal=True, dropout_rate=0.3, masked_row=7)
check("contiguous, 125 keys per device", mesh, "contiguous", B=1, T=40, S=1000, N=2, K=1,
      dropout_rate=0.3)

B, T, S, N, K, rate = 2, 48, 64, 2, 1, 0.4
q, k, *_ = inputs(B, T, S, N, K, S, jnp.float32)
v = jnp.broadcast_to(jnp.eye(S)[None, :, None], (B, S, K, S))
for layout, causal in (("contiguous", False), ("zigzag", True)):
  ring, _ = ring_and_one(mesh, layout, is_causal=causal, dropout_rate=rate,
                         dropout_key=jax.random.key(11))
  out = jax.jit(ring)(q, k, v, jnp.zeros((B, N, T, S)), jnp.ones((B, 1, T, S), bool))
  kept = np.asarray(out != 0).transpose(0, 2, 1, 3)  # [B, N, T, S]
  want = np.asarray(jaxdrop.attention_keep_mask(jax.random.key(11), (B, N, T, S), rate))
  if causal:
    want = want & np.tril(np.ones((T, S), bool))
  np.testing.assert_array_equal(kept, want, err_msg=f"{layout} causal={causal}")
  print("mask", layout, causal, "ok")
"""
  assert run_with_devices(code).count(" ok") == 2 + 2


def test_ring_communicates_by_permutes_and_memory_falls_as_one_over_p():
  """Compiled only. At T = 65536 the per-device buffers, proportional to T/P, dominate the
  temp memory; what does not shrink with P is a few [B, N, 256, 512] tiles (about 2 MB each
  here against 33 MB for one f32 copy of q at P = 2), so from P = 2 to 8 the temp memory
  should fall to a quarter, give or take those tiles: at most 0.3 of it.
  """
  code = PRELUDE + """
B, T, N, H = 1, 65536, 4, 64
x = jax.ShapeDtypeStruct((B, T, N, H), jnp.float32)
for layout in ("zigzag",):
  temp = {}
  for seq in (2, 4, 8):
    mesh = make_mesh((seq,), ("seq",))
    sharded = shard_map(
        lambda q, k, v: jaxdrop.ring_attention(
            q, k, v, axis_name="seq", layout=layout, is_causal=True, dropout_rate=0.1,
            dropout_key=jax.random.key(0)),
        mesh=mesh, in_specs=(P(None, "seq"),) * 3, out_specs=P(None, "seq"))
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(sharded(q, k, v)), argnums=(0, 1, 2)))
    compiled = grad.lower(x, x, x).compile()
    text = compiled.as_text()
    counts = {op: text.count(op + "-start(") or text.count(op + "(")
              for op in ("collective-permute", "all-gather", "all-reduce", "all-to-all")}
    assert counts["collective-permute"] > 0, counts
    assert counts["all-gather"] == counts["all-to-all"] == counts["all-reduce"] == 0, counts
    temp[seq] = compiled.memory_analysis().temp_size_in_bytes
    print("table", layout, seq, round(temp[seq] / 2**20, 1), "MiB", counts)
  assert temp[2] > temp[4] > temp[8], temp
  assert temp[8] / temp[2] < 0.3, temp
  print(layout, "ok")
"""
  out = run_with_devices(code)
  print(out)
  assert out.count(" ok") == 1, out


def _tiles_per_device(devices, layout, rows, cols, is_causal=True):
  """The tiles each device computes over the whole ring, counted from the loop bounds."""
  from jaxdrop._attention import base, ring, xla

  chunks = ring.LAYOUTS.index(layout) + 1
  q_shape, k_shape = (1, rows // devices, 1, 8), (1, cols // devices, 1, 8)
  config = base.Config(scale=1.0, is_causal=is_causal, dropout_heads=(1, 1), fixed_rate=0.0)
  plan = ring._Ring("seq", devices, chunks, ring._pair_layout(q_shape, k_shape, devices, chunks),
                    config, None, None)
  counts = []
  for device in range(devices):
    total = 0
    for source in range(devices):
      for q_chunk in range(chunks):
        for k_chunk in range(chunks):
          position, visible = ring._position(plan, device, source, q_chunk, k_chunk)
          if visible:
            total += sum(int(xla.k_block_range(plan.pair, config, position, q_index))
                         for q_index in range(plan.pair.num_q_blocks))
    counts.append(total)
  return counts, plan.pair.num_k_blocks


@pytest.mark.parametrize("devices, rows", [(4, 4096), (8, 1000 * 16), (8, 64)])
def test_zigzag_balances_causal_work(devices, rows):
  counts, row_of_tiles = _tiles_per_device(devices, "zigzag", rows, rows)
  assert max(counts) - min(counts) <= row_of_tiles, counts
  # The contiguous layout does not: the last device sees every key shard, the first one.
  contiguous, _ = _tiles_per_device(devices, "contiguous", rows, rows)
  assert max(contiguous) >= 2 * min(contiguous), contiguous


def test_zigzag_permutation():
  perm = jaxdrop.zigzag_permutation(12, 3)
  chunks = np.arange(12).reshape(6, 2)
  np.testing.assert_array_equal(perm, np.concatenate([chunks[i] for i in (0, 5, 1, 4, 2, 3)]))
  x = np.arange(12) * 10
  np.testing.assert_array_equal(x[perm][np.argsort(perm)], x)
  np.testing.assert_array_equal(jaxdrop.zigzag_permutation(6, 1), np.arange(6))
  assert jaxdrop.zigzag_permutation(0, 4).size == 0


@pytest.mark.parametrize("length, devices, error, match", [
    (10, 3, ValueError, "multiple of 6, got length=10"),
    (8, 0, ValueError, "num_devices >= 1"),
    (-4, 2, ValueError, "length >= 0"),
    (8.0, 2, TypeError, "length must be an int"),
    (8, True, TypeError, "num_devices must be an int"),
])
def test_zigzag_permutation_errors(length, devices, error, match):
  with pytest.raises(error, match=match):
    jaxdrop.zigzag_permutation(length, devices)


def _one_device_ring(**options):
  mesh = jax.make_mesh((1,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:1])
  spec = jax.sharding.PartitionSpec(None, "seq")
  q = jnp.ones((1, 8, 2, 4))
  return jax.shard_map(lambda q: jaxdrop.ring_attention(q, q, q, **options), mesh=mesh,
                       in_specs=spec, out_specs=spec)(q)


@pytest.mark.parametrize("options, error, match", [
    (dict(axis_name="seq", layout="spiral"), ValueError, "layout must be one of"),
    (dict(axis_name="seq", implementation="pallas"), ValueError, "not supported yet"),
    (dict(axis_name="seq", implementation="cudnn"), ValueError, "implementation must be"),
    (dict(axis_name="sequence"), ValueError, "axis_name='sequence' is not a mesh axis"),
    (dict(axis_name="seq", batch_axis="data"), ValueError, "batch_axis='data' is not a mesh"),
    (dict(axis_name="seq", dropout_rate=0.1), ValueError, "dropout_key=None"),
    (dict(axis_name="seq", dropout_rate=1.5), ValueError, "dropout_rate"),
    (dict(axis_name="seq", scale=jnp.float32(2.0)), TypeError, "scale must be a Python float"),
])
def test_ring_attention_errors(options, error, match):
  with pytest.raises(error, match=match):
    _one_device_ring(**options)


def test_zigzag_needs_two_chunks_per_device():
  with pytest.raises(ValueError, match="lengths must be even, got T/P=7"):
    mesh = jax.make_mesh((1,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:1])
    spec = jax.sharding.PartitionSpec(None, "seq")
    jax.shard_map(lambda q: jaxdrop.ring_attention(q, q, q, axis_name="seq", layout="zigzag"),
                  mesh=mesh, in_specs=spec, out_specs=spec)(jnp.ones((1, 7, 2, 4)))
