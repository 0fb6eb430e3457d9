"""jaxdrop.dot_product_attention: every implementation against the materialized reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_cases import CASES
from conftest import run_with_devices
from oracles import attention_keep_mask, equations

import jaxdrop
from jaxdrop._attention import base

KEY = jax.random.key(7)


def inputs(batch=2, rows=13, cols=40, heads=4, kv_heads=2, head_dim=8, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(batch, rows, heads, head_dim))
  k = rng.normal(size=(batch, cols, kv_heads, head_dim))
  v = rng.normal(size=(batch, cols, kv_heads, head_dim))
  return tuple(jnp.asarray(a, dtype) for a in (q, k, v))


def attend(q, k, v, bias=None, mask=None, implementation="xla", **kwargs):
  return jaxdrop.dot_product_attention(q, k, v, bias, mask, implementation=implementation, **kwargs)


def case_arrays(name, dtype=jnp.float32):
  """``(q, k, v, bias, mask, is_causal)`` of the case ``name`` of ``attention_cases``."""
  case = CASES[name]
  q, k, v, bias, mask, _ = case.arrays(dtype)
  return q, k, v, bias, mask, case.causal


# ----------------------------------------------------------------------------
# The mask.


@pytest.mark.parametrize("shape", [(2, 3, 5, 19), (1, 1, 4, 8), (1, 2, 3, 1)])
@pytest.mark.parametrize("rate", [0.1, 0.5, 0.999])
def test_mask_is_the_documented_jax_random_expression(shape, rate):
  np.testing.assert_array_equal(
      jaxdrop.attention_keep_mask(KEY, shape, rate), attention_keep_mask(KEY, shape, rate)
  )


def test_mask_at_a_rate_that_rounds_near_a_half_is_the_attention_mask():
  """The static threshold is rounded once, on the host, for the mask and the attention."""
  rate = 0.5 / 256 + 1e-12  # round(rate * 256) = 1 in float64; float32 would give 0.
  rows = cols = 64
  q = k = jnp.zeros((1, rows, 1, cols))
  v = jnp.eye(cols)[None, :, None, :]
  out = jaxdrop.dot_product_attention(q, k, v, dropout_rate=rate, dropout_key=KEY)
  keep = jaxdrop.attention_keep_mask(KEY, (1, 1, rows, cols), rate)
  np.testing.assert_array_equal(np.asarray(out[:, :, 0]) != 0, np.asarray(keep[:, 0]))
  assert not np.all(keep)


def test_mask_is_independent_across_heads_and_batch():
  keep = np.asarray(jaxdrop.attention_keep_mask(KEY, (2, 2, 64, 64), 0.5)).reshape(4, -1)
  for i in range(4):
    for j in range(i):
      # Two independent fair masks agree on a Binomial(n, 1/2) count of positions.
      agree = int(np.sum(keep[i] == keep[j]))
      n = keep.shape[1]
      assert abs(agree - n / 2) <= 4 * np.sqrt(n / 4), (i, j, agree)


def test_keep_fraction_is_the_quantized_probability():
  rate = 0.1
  keep = np.asarray(jaxdrop.attention_keep_mask(KEY, (4, 8, 64, 64), rate))
  p = (256 - round(rate * 256)) / 256
  n = keep.size
  assert abs(keep.mean() - p) <= 4 * np.sqrt(p * (1 - p) / n)


def test_output_is_unbiased_over_keys():
  q, k, v = inputs(1, 6, 10, 2, 2, head_dim=4)
  expected = np.asarray(attend(q, k, v, implementation="reference"), np.float64)
  keys = jax.random.split(jax.random.key(11), 4000)
  outs = jax.vmap(lambda key: attend(q, k, v, dropout_rate=0.3, dropout_key=key))(keys)
  outs = np.asarray(outs, np.float64)
  mean = outs.mean(axis=0)
  stderr = outs.std(axis=0, ddof=1) / np.sqrt(len(keys))
  # Central limit: each mean is within 5 standard errors of the no-dropout
  # output (48 elements: a false alarm about once in 35,000 runs).
  z = np.abs(mean - expected) / stderr
  assert z.max() < 5, z.max()


# ----------------------------------------------------------------------------
# Without dropout, rows without positions, rate handling.


@pytest.mark.parametrize("implementation", [None, "xla", "reference"])
def test_without_dropout_equals_jax_nn(implementation):
  q, k, v, bias, mask, causal = case_arrays("full_mask_and_bias")
  expected = jax.nn.dot_product_attention(q, k, v, bias, mask, is_causal=True)
  out = jaxdrop.dot_product_attention(q, k, v, bias, mask, is_causal=True, implementation=implementation)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  out = jaxdrop.dot_product_attention(
      q, k, v, bias, mask, is_causal=True, implementation=implementation,
      dropout_rate=0.5, deterministic=True,
  )
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_jax_nn_by_name_is_jax_nn_and_refuses_what_it_cannot_do():
  q, k, v, bias, mask, _ = case_arrays("full_mask_and_bias")
  expected = jax.nn.dot_product_attention(q, k, v, bias, mask, is_causal=True)
  out = jaxdrop.dot_product_attention(q, k, v, bias, mask, is_causal=True, implementation="jax.nn")
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="'jax.nn' has no dropout"):
    jaxdrop.dot_product_attention(q, k, v, implementation="jax.nn", dropout_rate=0.1,
                                  dropout_key=KEY)
  with pytest.raises(ValueError, match="'jax.nn' takes no precision"):
    jaxdrop.dot_product_attention(q, k, v, implementation="jax.nn",
                                  precision=jax.lax.Precision.HIGHEST)


def test_an_unknown_implementation_names_every_registered_one():
  q, k, v = inputs()
  with pytest.raises(ValueError, match="'reference', 'xla', 'pallas', 'jax.nn', got "
                                       "implementation='cudnn'"):
    jaxdrop.dot_product_attention(q, k, v, implementation="cudnn")


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_broadcast_dropout_drops_one_mask_for_every_batch_element_and_head(implementation):
  batch, rows, heads, cols = 2, 5, 3, 40
  q, k, _ = inputs(batch=batch, rows=rows, cols=cols, heads=heads, kv_heads=heads, head_dim=cols)
  # v = identity: out[b, t, n, s] is weight (t, s) of head (b, n), positive unless dropped.
  v = jnp.broadcast_to(jnp.eye(cols)[None, :, None, :], (batch, cols, heads, cols))
  out = jaxdrop.dot_product_attention(q, k, v, dropout_rate=0.5, dropout_key=KEY,
                                      broadcast_dropout=True, implementation=implementation)
  keep = attention_keep_mask(KEY, (1, 1, rows, cols), 0.5)[0, 0]
  for b in range(batch):
    for n in range(heads):
      np.testing.assert_array_equal(np.asarray(out[b, :, n]) != 0, keep)
  with pytest.raises(TypeError, match="broadcast_dropout must be a bool, got broadcast_dropout=1"):
    jaxdrop.dot_product_attention(q, k, v, broadcast_dropout=1)


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_precision_reaches_every_matrix_product(implementation):
  q, k, v = inputs()
  highest = jax.lax.Precision.HIGHEST

  def attention(q, k, v):
    return jaxdrop.dot_product_attention(q, k, v, dropout_rate=0.1, dropout_key=KEY,
                                         implementation=implementation, precision=highest)

  jaxpr = jax.make_jaxpr(jax.grad(lambda *qkv: attention(*qkv).sum(), (0, 1, 2)))(q, k, v)
  products = [e.params["precision"] for e in equations(jaxpr.jaxpr)
              if e.primitive.name == "dot_general"]
  assert len(products) >= 4, products  # two forward, at least two backward
  assert all(p == (highest, highest) for p in products), products


@pytest.mark.parametrize("rate", [0.0, 0.3])
@pytest.mark.parametrize("implementation", [None, "xla", "reference"])
def test_row_with_no_allowed_position_is_zero_with_finite_grads(implementation, rate):
  q, k, v = inputs()
  mask = np.ones((2, 4, 13, 40), bool)
  mask[0, 1, 3] = False
  mask[1, :, 0] = False
  mask = jnp.asarray(mask)

  def loss(q, k, v):
    out = jaxdrop.dot_product_attention(
        q, k, v, mask=mask, implementation=implementation, dropout_rate=rate, dropout_key=KEY
    )
    return jnp.sum(out**2), out

  grads, out = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  np.testing.assert_array_equal(out[0, 3, 1], 0)
  np.testing.assert_array_equal(out[1, 0], 0)
  assert np.any(np.asarray(out[0, 3, 0]) != 0)
  for g in grads:
    assert np.all(np.isfinite(g))
  np.testing.assert_array_equal(grads[0][0, 3, 1], 0)


@pytest.mark.parametrize("rate", [0.0, 0.3])
@pytest.mark.parametrize("implementation", [None, "xla", "reference"])
def test_a_row_of_minus_inf_bias_is_a_row_with_no_allowed_position(implementation, rate):
  q, k, v = inputs()
  bias = np.zeros((1, 4, 13, 40), np.float32)
  bias[0, 2, 5] = -np.inf  # Row t = 5 of head 2: no position left.
  bias[0, 1, :, 7] = -np.inf  # Key s = 7 excluded for head 1.
  bias = jnp.asarray(bias)

  def loss(q, bias):
    out = jaxdrop.dot_product_attention(
        q, k, v, bias, implementation=implementation, dropout_rate=rate, dropout_key=KEY
    )
    return jnp.sum(out**2), out

  grads, out = jax.grad(loss, argnums=(0, 1), has_aux=True)(q, bias)
  np.testing.assert_array_equal(out[:, 5, 2], 0)
  for g in grads:
    assert np.all(np.isfinite(g))
  masked = jnp.asarray(np.arange(40) != 7)[None, None, None, :]
  expected = jaxdrop.dot_product_attention(
      q, k, v, jnp.where(jnp.isfinite(bias), bias, 0), masked | (jnp.arange(4) != 1)[None, :, None, None],
      implementation="reference", dropout_rate=rate, dropout_key=KEY,
  )
  np.testing.assert_allclose(out[:, :, 1], expected[:, :, 1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rate", [0.0, 0.3])
@pytest.mark.parametrize("implementation", [None, "xla", "reference"])
def test_nan_bias_makes_its_row_nan_as_jax_nn_unless_masked(implementation, rate):
  q, k, v = inputs()
  bias = np.zeros((1, 4, 13, 40), np.float32)
  bias[0, 2, :, 3] = np.nan  # Every row of head 2: NaN at an allowed key.
  bias[0, 1, :, 5] = np.nan  # Head 1: NaN at a masked key, which ignores it.
  mask = np.ones((1, 4, 1, 40), bool)
  mask[0, 1, 0, 5] = False
  bias, mask = jnp.asarray(bias), jnp.asarray(mask)
  assert np.all(np.isnan(jax.nn.dot_product_attention(q, k, v, bias, mask)[:, :, 2]))
  out = jaxdrop.dot_product_attention(
      q, k, v, bias, mask, implementation=implementation, dropout_rate=rate, dropout_key=KEY
  )
  # Dropout drops the NaN weight from some rows: the softmax sum still holds it.
  assert np.all(np.isnan(out[:, :, 2]))
  clean = jaxdrop.dot_product_attention(
      q, k, v, jnp.nan_to_num(bias), mask, implementation="reference", dropout_rate=rate,
      dropout_key=KEY,
  )
  for head in (0, 1, 3):
    np.testing.assert_allclose(out[:, :, head], clean[:, :, head], rtol=1e-5, atol=1e-6)


def test_traced_rate_compiles_once_and_matches_static():
  q, k, v = inputs()
  traces = []

  @jax.jit
  def f(rate):
    traces.append(1)
    return jaxdrop.dot_product_attention(q, k, v, dropout_rate=rate, dropout_key=KEY)

  for rate in (0.1, 0.3, 0.0):
    static = jaxdrop.dot_product_attention(
        q, k, v, dropout_rate=rate, dropout_key=KEY, implementation="xla"
    )
    np.testing.assert_allclose(f(jnp.float32(rate)), static, rtol=1e-5, atol=1e-6)
  assert len(traces) == 1


@pytest.mark.parametrize("rate", [-0.1, 1.5, float("nan")])
@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_traced_rate_out_of_range_poisons_with_nan(implementation, rate):
  q, k, v = inputs()
  out = jax.jit(
      lambda r: jaxdrop.dot_product_attention(
          q, k, v, dropout_rate=r, dropout_key=KEY, implementation=implementation
      )
  )(jnp.float32(rate))
  assert np.all(np.isnan(out))


def test_rate_one_gives_zeros_and_needs_no_key():
  q, k, v = inputs()
  out = jaxdrop.dot_product_attention(q, k, v, dropout_rate=1.0)
  np.testing.assert_array_equal(out, 0)
  traced = jaxdrop.dot_product_attention(q, k, v, dropout_rate=jnp.float32(1.0), dropout_key=KEY)
  np.testing.assert_array_equal(traced, 0)


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_no_gradient_flows_to_the_rate(implementation):
  q, k, v = inputs()
  grad = jax.grad(
      lambda r: jnp.sum(
          jaxdrop.dot_product_attention(
              q, k, v, dropout_rate=r, dropout_key=KEY, implementation=implementation
          )
      )
  )(jnp.float32(0.3))
  assert grad == 0


def test_vmap_over_keys_equals_a_loop():
  q, k, v = inputs()
  keys = jax.random.split(KEY, 3)
  f = lambda key: jaxdrop.dot_product_attention(q, k, v, dropout_rate=0.2, dropout_key=key)
  batched = jax.vmap(f)(keys)
  for i in range(3):
    np.testing.assert_allclose(batched[i], f(keys[i]), rtol=1e-6, atol=1e-7)
  assert np.any(np.asarray(batched[0]) != np.asarray(batched[1]))


def test_same_key_same_output_different_key_different_output():
  q, k, v = inputs()
  f = lambda key: jaxdrop.dot_product_attention(q, k, v, dropout_rate=0.2, dropout_key=key)
  np.testing.assert_array_equal(f(KEY), f(KEY))
  assert np.any(np.asarray(f(KEY)) != np.asarray(f(jax.random.key(8))))
  # A legacy raw key is the same key.
  np.testing.assert_array_equal(f(KEY), f(jax.random.key_data(KEY)))


# ----------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(dropout_rate=0.1), ValueError, "dropout_key=None"),
        (dict(dropout_rate=1.5), ValueError, "dropout_rate"),
        (dict(dropout_rate=0.1, dropout_key=jax.random.key(0, impl="rbg")), ValueError, "threefry"),
        (dict(dropout_rate=0.1, dropout_key=jax.random.split(KEY, 2)), ValueError, "dropout_key"),
        (dict(dropout_rate=0.1, dropout_key=3), TypeError, "dropout_key"),
        (dict(implementation="cudnn"), ValueError, "implementation"),
        (dict(implementation="pallas", dropout_rate=0.1, dropout_key=KEY), ValueError, "GPU"),
        (dict(is_causal=1), TypeError, "is_causal"),
        (dict(scale="big"), TypeError, "scale"),
        (dict(deterministic=None), TypeError, "deterministic"),
        (dict(mask=jnp.ones((2, 4, 13, 40))), TypeError, "mask"),
        (dict(mask=jnp.ones((3, 1, 1, 40), bool)), ValueError, "mask"),
        (dict(bias=jnp.ones((13, 39))), ValueError, "bias"),
        (dict(bias=jnp.ones((13, 40), jnp.int32)), TypeError, "bias"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
  q, k, v = inputs()
  with pytest.raises(error, match=match):
    jaxdrop.dot_product_attention(q, k, v, **kwargs)


@pytest.mark.parametrize("rate", [0.0, 0.3])
@pytest.mark.parametrize("implementation", [None, "xla", "reference", "pallas"])
@pytest.mark.parametrize(
    ("scale", "error", "match"),
    [
        (float("nan"), ValueError, "scale=nan"),
        (float("inf"), ValueError, "scale=inf"),
        (-np.inf, ValueError, "scale=-inf"),
        (np.float32("nan"), ValueError, "scale=nan"),
        (jnp.float32(0.5), TypeError, r"query \* s"),
    ],
)
def test_a_non_finite_or_array_scale_is_named(implementation, rate, scale, error, match):
  q, k, v = inputs()
  with pytest.raises(error, match=match):
    jaxdrop.dot_product_attention(
        q, k, v, scale=scale, dropout_rate=rate, dropout_key=KEY, implementation=implementation
    )


@pytest.mark.parametrize(
    ("shapes", "match"),
    [
        (((2, 13, 4, 8), (2, 40, 3, 8), (2, 40, 3, 8)), "divide"),
        (((2, 13, 4, 8), (2, 40, 2, 8), (2, 39, 2, 8)), "same shape"),
        (((2, 13, 4, 8), (2, 40, 2, 4), (2, 40, 2, 4)), "agree"),
        (((13, 4, 8), (40, 2, 8), (40, 2, 8)), "4 dimensions"),
    ],
)
def test_bad_shapes_are_named(shapes, match):
  q, k, v = (jnp.ones(s) for s in shapes)
  with pytest.raises(ValueError, match=match):
    jaxdrop.dot_product_attention(q, k, v)


def test_mixed_dtypes_are_refused():
  q, k, v = inputs()
  with pytest.raises(TypeError, match="one dtype"):
    jaxdrop.dot_product_attention(q, k.astype(jnp.bfloat16), v)


# ----------------------------------------------------------------------------
# Zero sizes.

# [B, T, N, H] and [B, S, K, H] from inputs()' defaults, one size set to 0.
ZERO_SIZES = {
    "B": dict(batch=0),
    "N_and_K": dict(heads=0, kv_heads=0),
    "N": dict(heads=0),
    "T": dict(rows=0),
    "S": dict(cols=0),
    "H": dict(head_dim=0),
}


@pytest.mark.parametrize("rate", [0.0, 0.3])
@pytest.mark.parametrize("implementation", [None, "xla", "reference"])
@pytest.mark.parametrize("zero", sorted(ZERO_SIZES))
def test_zero_sizes_give_zeros_and_zero_gradients(zero, implementation, rate):
  """An empty output, or S = 0 (rows with no key: zeros, as jax.nn gives), with dropout too."""
  q, k, v = inputs(**ZERO_SIZES[zero])
  batch, rows, heads, _ = q.shape
  bias = jnp.ones((1, heads, rows, k.shape[1]))
  mask = jnp.ones((batch, 1, 1, k.shape[1]), bool)

  def loss(q, k, v, bias):
    out = jaxdrop.dot_product_attention(
        q, k, v, bias, mask, implementation=implementation, dropout_rate=rate, dropout_key=KEY
    )
    return jnp.sum(out), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(
      q, k, v, bias
  )
  np.testing.assert_array_equal(out, np.zeros(q.shape))
  if zero in ("B", "N", "T", "S"):  # jax.nn divides by K and H.
    np.testing.assert_array_equal(out, jax.nn.dot_product_attention(q, k, v, bias, mask))
  for grad, x in zip(grads, (q, k, v, bias)):
    assert grad.shape == x.shape
    np.testing.assert_array_equal(grad, 0)


@pytest.mark.parametrize("rate", [0.3, jnp.float32(0.3)], ids=["static", "array"])
@pytest.mark.parametrize("shape", [(0, 2, 3, 40), (2, 0, 3, 40), (2, 2, 0, 40), (2, 2, 3, 0)])
def test_mask_of_a_zero_size_shape_is_empty(shape, rate):
  keep = jaxdrop.attention_keep_mask(KEY, shape, rate)
  assert keep.shape == shape and keep.dtype == jnp.bool_


def test_heads_k_zero_must_have_n_zero():
  q, k, v = inputs(kv_heads=0)
  with pytest.raises(ValueError, match="K=0"):
    jaxdrop.dot_product_attention(q, k, v)


# ----------------------------------------------------------------------------
# Forward mode.


@pytest.mark.parametrize("implementation", [None, "xla"])
def test_forward_mode_through_the_custom_vjp_paths_is_jaxs_named_error(implementation):
  q, k, v = inputs()
  f = lambda q: jaxdrop.dot_product_attention(
      q, k, v, dropout_rate=0.3, dropout_key=KEY, implementation=implementation
  )
  with pytest.raises(TypeError, match=r"forward-mode autodiff \(jvp\) to a custom_vjp"):
    jax.jvp(f, (q,), (q,))


def test_reference_forward_mode_is_the_transpose_of_xla_reverse_mode():
  """<J t, c> from the reference's jvp equals <t, J^T c> from "xla"'s custom backward."""
  q, k, v, bias, mask, causal = case_arrays("full_mask_and_bias")
  kwargs = dict(is_causal=causal, dropout_rate=0.3, dropout_key=KEY)
  attend_with = lambda implementation: lambda q, k, v, bias: jaxdrop.dot_product_attention(
      q, k, v, bias, mask, implementation=implementation, **kwargs
  )
  primals = (q, k, v, bias)
  rng = np.random.default_rng(5)
  tangents = tuple(jnp.asarray(rng.normal(size=x.shape), x.dtype) for x in primals)
  _, forward = jax.jvp(attend_with("reference"), primals, tangents)
  cotangent = jnp.asarray(rng.normal(size=q.shape), q.dtype)
  _, vjp = jax.vjp(attend_with("xla"), *primals)
  backward = vjp(cotangent)
  lhs = jnp.vdot(forward, cotangent)
  rhs = sum(jnp.vdot(t, g) for t, g in zip(tangents, backward))
  np.testing.assert_allclose(lhs, rhs, rtol=1e-4)


def test_forward_over_reverse_through_xla_equals_reference():
  q, k, v, bias, mask, causal = case_arrays("causal")

  def hvp(implementation):
    loss = lambda q: jnp.sum(
        jaxdrop.dot_product_attention(
            q, k, v, is_causal=causal, dropout_rate=0.3, dropout_key=KEY,
            implementation=implementation,
        ) ** 2
    )
    return jax.jvp(jax.grad(loss), (q,), (jnp.cos(q),))[1]

  np.testing.assert_allclose(hvp("xla"), hvp("reference"), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------
# Memory, sharding, export.


def temp_bytes(implementation, rows):
  q, k, v = (jax.ShapeDtypeStruct((1, rows, 4, 32), jnp.float32) for _ in range(3))

  def loss(q, k, v):
    out = jaxdrop.dot_product_attention(
        q, k, v, dropout_rate=0.1, dropout_key=KEY, implementation=implementation
    )
    return jnp.sum(out)

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_xla_memory_is_linear_in_length_and_a_fraction_of_reference():
  xla_small, xla_large = temp_bytes("xla", 1024), temp_bytes("xla", 4096)
  reference_large = temp_bytes("reference", 4096)
  # One [N, T, S] float32 array at T = S = 4096 is 256 MiB; the blockwise
  # path holds tiles and [T, H] rows only.
  assert xla_large <= 4 * xla_small * 1.1, (xla_small, xla_large)
  assert xla_large * 16 <= reference_large, (xla_large, reference_large)


SHARDING_CODE = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import jaxdrop

COLLECTIVES = ("all-gather", "all-reduce", "collective-permute", "all-to-all", "reduce-scatter")
mesh = jax.make_mesh((4, 2), ("data", "model"),
                     axis_types=(jax.sharding.AxisType.Explicit,) * 2)
rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.normal(size=(8, 24, 4, 8)), jnp.float32) for _ in range(3))
key = jax.random.key(3)
def loss(q, k, v):
  out = jaxdrop.dot_product_attention(q, k, v, is_causal=True, dropout_rate=0.2, dropout_key=key)
  return jnp.sum(out * out)
functions = {"forward": lambda q, k, v: jaxdrop.dot_product_attention(
                 q, k, v, is_causal=True, dropout_rate=0.2, dropout_key=key),
             "grad": jax.grad(loss, argnums=(0, 1, 2))}
spec = NamedSharding(mesh, P("data", None, "model", None))
for name, fn in functions.items():
  f = jax.jit(fn)
  expected = f(q, k, v)
  args = [jax.device_put(x, spec) for x in (q, k, v)]
  out = f(*args)
  for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(expected)):
    # Per-device matmuls may round differently; the mask is checked exactly below.
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5, err_msg=name)
  hlo = f.lower(*args).compile().as_text()
  found = [c for c in COLLECTIVES if c in hlo]
  assert not found, (name, found)
  print(name, "ok")
shape = (8, 4, 24, 24)
mask_fn = lambda key: jaxdrop.attention_keep_mask(key, shape, 0.2)
expected = jax.jit(mask_fn)(key)
sharded = jax.jit(mask_fn, out_shardings=NamedSharding(mesh, P("data", "model")))
np.testing.assert_array_equal(np.asarray(sharded(key)), np.asarray(expected))
hlo = sharded.lower(key).compile().as_text()
assert not [c for c in COLLECTIVES if c in hlo]
print("mask ok")
"""


def test_sharded_over_batch_and_heads_equals_unsharded_without_collectives():
  out = run_with_devices(SHARDING_CODE)
  assert out.count("ok") == 3, out


GQA_SHARDING_CODE = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import jaxdrop

COLLECTIVES = ("all-gather", "all-reduce", "collective-permute", "all-to-all", "reduce-scatter")
mesh = jax.make_mesh((2, 4), ("data", "model"),
                     axis_types=(jax.sharding.AxisType.Explicit,) * 2)
rng = np.random.default_rng(0)
# 8 query heads on 4 key/value heads, both sharded 4 ways: each device holds 1 key head, 2 queries.
q = jnp.asarray(rng.normal(size=(4, 40, 8, 16)), jnp.float32)
k, v = (jnp.asarray(rng.normal(size=(4, 40, 4, 16)), jnp.float32) for _ in range(2))
bias = jnp.asarray(rng.normal(size=(4, 8, 40, 40)), jnp.float32)
mask = jnp.asarray(rng.random((4, 1, 40, 40)) < 0.8)
key = jax.random.key(3)
spec = NamedSharding(mesh, P("data", None, "model", None))
per_head = NamedSharding(mesh, P("data", "model", None, None))
per_batch = NamedSharding(mesh, P("data", None, None, None))
for implementation in ("xla", "reference"):
  for rate in (0.0, 0.3):
    def attend(q, k, v, bias, mask):
      return jaxdrop.dot_product_attention(q, k, v, bias=bias, mask=mask, is_causal=True,
                                           dropout_rate=rate, dropout_key=key,
                                           implementation=implementation)
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(attend(*a) ** 2), argnums=(0, 1, 2, 3)))
    forward = jax.jit(attend)
    args = (q, k, v, bias, mask)
    want = [forward(*args), *grad(*args)]
    with jax.set_mesh(mesh):
      placed = [jax.device_put(x, s) for x, s in zip(args, (spec, spec, spec, per_head, per_batch))]
      got = [forward(*placed), *grad(*placed)]
      hlo = grad.lower(*placed).compile().as_text()
    assert got[0].sharding.spec == P("data", None, "model", None), got[0].sharding
    for a, b in zip(got, want):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)
    found = [c for c in COLLECTIVES if c in hlo]
    assert not found, (implementation, rate, found)
    print(implementation, rate, "ok")
# The flax attention_fn drop-ins, as flax's modules call them.
for name, fn in (("linen", jaxdrop.linen.dot_product_attention),
                 ("nnx", jaxdrop.nnx.dot_product_attention)):
  attend = jax.jit(lambda q, k, v: fn(q, k, v, dropout_rng=key, dropout_rate=0.3,
                                      broadcast_dropout=False))
  want = attend(q, k, v)
  with jax.set_mesh(mesh):
    placed = [jax.device_put(x, spec) for x in (q, k, v)]
    got = attend(*placed)
    hlo = attend.lower(*placed).compile().as_text()
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
  assert not [c for c in COLLECTIVES if c in hlo], name
  print(name, "adapter ok")
"""


def test_reshape_keeps_the_mesh_axes_of_split_and_merged_axes():
  # [B, T, N, H] -> [B, T, K, G, H]: the heads' mesh axis goes to K.
  assert base._reshaped_spec((4, 40, 8, 16), ("d", None, "m", None), (4, 40, 4, 2, 16)) == (
      "d", None, "m", None, None)
  # [B, T, K, G, H] -> [B, T, N, H], and two sharded axes merged, major first.
  assert base._reshaped_spec((4, 40, 4, 2, 16), ("d", None, "m", None, None), (4, 40, 8, 16)) == (
      "d", None, "m", None)
  assert base._reshaped_spec((4, 8, 16), ("d", "m", None), (32, 16)) == (("d", "m"), None)
  # A sharded minor axis under an unsharded major one has no spec after the merge.
  assert base._reshaped_spec((4, 8, 16), (None, "m", None), (32, 16)) is None


def test_grouped_query_heads_sharded_over_explicit_axes_equal_unsharded_without_collectives():
  # Issue 22: the grouped-query reshape raised ShardingTypeError under explicit axes.
  out = run_with_devices(GQA_SHARDING_CODE)
  assert out.count("ok") == 6, out


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_exports_for_every_platform(implementation):
  q, k, v = inputs()

  def loss(q, k, v):
    out = jaxdrop.dot_product_attention(
        q, k, v, is_causal=True, dropout_rate=0.1, dropout_key=KEY, implementation=implementation
    )
    return jnp.sum(out * out)

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  exported = jax.export.export(fn, platforms=("cpu", "cuda", "tpu"))(q, k, v)
  got = exported.call(q, k, v)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(fn(q, k, v))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
