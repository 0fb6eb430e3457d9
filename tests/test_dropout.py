"""Tests of jaxdrop.dropout (jaxdrop/_dropout.py) and jaxdrop.keep_mask (jaxdrop/_masks.py)."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax._src.ad_checkpoint import saved_residuals  # print_saved_residuals' data.
from jax.ad_checkpoint import checkpoint_name
from scipy import stats

import jaxdrop
from jaxdrop import _masks
from jaxdrop import _threefry
from conftest import maybe_jit
from oracles import K_SIGMA, assert_binomial_fraction, equations, p_keep, threshold

pytestmark = pytest.mark.usefixtures("strict_promotion")
TWO_32 = 2**32


def reference(key, x, rate, mask_shape=None):
  """dropout written from jax.random.bits, for comparison."""
  mask_shape = x.shape if mask_shape is None else mask_shape
  t = threshold(rate)
  keep = jax.random.bits(key, mask_shape, jnp.uint32) >= np.uint32(t)
  scale = np.float32(TWO_32 / (TWO_32 - t))
  return jnp.where(keep, x.astype(jnp.float32) * scale, np.float32(0)).astype(x.dtype)


SHAPES = [(), (0,), (1,), (7,), (3, 5), (2, 3, 4), (33, 1, 17), (1000,), (0, 3)]


# ---------------------------------------------------------------------------
# Bits: equal to jax.random.bits.


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("make_key", [jax.random.key, jax.random.PRNGKey], ids=["typed", "raw"])
def test_bits_equal_jax_random_bits(shape, make_key):
  key = make_key(1234)
  typed = jax.random.wrap_key_data(key) if make_key is jax.random.PRNGKey else key
  expected = jax.random.bits(key, shape, jnp.uint32)
  key_data = jax.random.key_data(typed)
  np.testing.assert_array_equal(_threefry.bits32(key_data, shape), expected)
  # The backward pass passes the key schedule instead of the key's two words.
  schedule = jnp.stack(_threefry.key_schedule(key_data[0], key_data[1]))
  np.testing.assert_array_equal(_threefry.bits32(schedule, shape), expected)


def test_bits_refuse_key_data_of_another_length():
  with pytest.raises(ValueError, match=r"uint32\[3\] schedule, got shape \(4,\)"):
    _threefry.bits32(jnp.zeros(4, jnp.uint32), (5,))


@pytest.mark.parametrize("seed", [0, 1, 2**31 - 1, 987654321])
def test_keep_mask_is_threshold_of_jax_random_bits(seed, use_jit):
  key = jax.random.key(seed)
  fn = maybe_jit(jaxdrop.keep_mask, use_jit, static_argnums=(1, 2))
  for rate in (0.1, 0.5, 0.9):
    bits = jax.random.bits(key, (37, 11), jnp.uint32)
    np.testing.assert_array_equal(fn(key, (37, 11), rate), bits >= np.uint32(threshold(rate)))


def test_dropout_equals_reference_from_jax_random_bits(use_jit):
  key = jax.random.key(7)
  x = jax.random.normal(jax.random.key(8), (64, 33))
  fn = maybe_jit(jaxdrop.dropout, use_jit, static_argnums=(2,))
  for rate in (0.05, 0.3, 0.5, 0.95):
    np.testing.assert_array_equal(fn(key, x, rate), reference(key, x, rate))


@pytest.mark.parametrize("impl", ["rbg", "unsafe_rbg", "threefry2x32"])
def test_every_key_implementation_thresholds_its_own_bits(impl):
  key = jax.random.key(3, impl=impl)
  x = jnp.arange(1.0, 301.0).reshape(20, 15)
  np.testing.assert_array_equal(jaxdrop.dropout(key, x, 0.4), reference(key, x, 0.4))
  np.testing.assert_array_equal(
      jaxdrop.keep_mask(key, (20, 15), 0.4),
      jax.random.bits(key, (20, 15), jnp.uint32) >= np.uint32(threshold(0.4)),
  )


@pytest.mark.parametrize("impl", ["rbg", "unsafe_rbg", "threefry2x32"])
def test_every_key_implementation_drops_the_same_elements_in_the_backward_pass(impl):
  # The backward pass recomputes the mask from every word of the key (4 for rbg).
  key = jax.random.key(3, impl=impl)
  x = jnp.arange(1.0, 301.0).reshape(20, 15)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(jaxdrop.dropout(key, x, 0.4))))(x)
  np.testing.assert_array_equal(grad != 0, reference(key, x, 0.4) != 0)


def test_raw_and_typed_keys_agree():
  raw = jax.random.PRNGKey(42)
  x = jnp.ones((50,))
  np.testing.assert_array_equal(
      jaxdrop.dropout(raw, x, 0.5), jaxdrop.dropout(jax.random.wrap_key_data(raw), x, 0.5)
  )


# ---------------------------------------------------------------------------
# Values and statistics.


def test_every_element_is_zero_or_scaled():
  x = jax.random.normal(jax.random.key(0), (4096,))
  for rate in (0.1, 0.5, 0.8):
    y = jaxdrop.dropout(jax.random.key(1), x, rate)
    jaxdrop.checks.assert_dropout_output(x, y, rate)


def test_scale_is_exact_inverse_keep_probability():
  # A kept element of value 1 carries exactly float32(2**32 / (2**32 - t)).
  for rate in (0.1, 1 / 3, 0.5, 0.999):
    y = np.asarray(jaxdrop.dropout(jax.random.key(0), jnp.ones(4096), rate))
    kept = y[y != 0]
    assert kept.size > 0
    np.testing.assert_array_equal(kept, np.float32(TWO_32 / (TWO_32 - threshold(rate))))


@pytest.mark.parametrize("rate", [1e-12, 0.1, 0.3, 0.5, 1 - 1e-12, 1 - 2.0**-40])
def test_keep_probability_is_exact_for_python_floats(rate):
  # The library's own threshold and scale, not this file's threshold().
  resolved = _masks.resolve_rate(rate, jnp.float32)
  t = int(resolved.threshold)
  assert abs((TWO_32 - t) / TWO_32 - (1 - rate)) <= 2.0**-32
  assert float(resolved.scale) == np.float32(TWO_32 / (TWO_32 - t))


@pytest.mark.parametrize("bits", [32, 16, 8])
@pytest.mark.parametrize("rate", [0.0, 1e-12, 0.1, 1 / 3, 0.5, 0.9, 1 - 1e-12, 1.0])
def test_quantize_rate_and_keep_probability_follow_the_documented_formula(rate, bits):
  t, p = _masks.quantize_rate(rate, bits)
  assert (t, p) == ((2**bits, 0.0) if rate == 1.0 else (threshold(rate, bits), p_keep(rate, bits)))
  if bits != 8:  # 8 is for attention masks, not a dropout mode.
    assert jaxdrop.keep_probability(rate, bits) == p


def test_keep_probability_errors():
  with pytest.raises(ValueError, match="rate=1.5"):
    jaxdrop.keep_probability(1.5)
  with pytest.raises(TypeError, match="static"):
    _masks.quantize_rate(jnp.float32(0.5), 32)
  with pytest.raises(ValueError, match="bits=8"):
    jaxdrop.keep_probability(0.5, bits=8)


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.7, 0.9, 1e-3])
def test_traced_float32_rate_keep_probability_within_2_to_minus_24(rate):
  resolved = jax.jit(_masks.resolve_rate, static_argnums=1)(jnp.float32(rate), jnp.float32)
  p_keep = (TWO_32 - int(resolved.threshold)) / TWO_32
  assert abs(p_keep - (1 - rate)) <= 2.0**-24
  assert abs(float(resolved.scale) * p_keep - 1) <= 2.0**-23  # one float32 rounding


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_keep_fraction_within_binomial_bound(rate):
  n = 200_000
  kept = int(jnp.sum(jaxdrop.keep_mask(jax.random.key(11), (n,), rate)))
  assert_binomial_fraction(kept, n, 1 - rate)


def test_keeps_are_uniform_over_positions_chi_square():
  # 400 keys x 50 positions: each position's keep count is Binomial(400, p).
  # The sum of squared standardized counts is ~ chi-square with 50 dof.
  rate, num_keys, positions = 0.3, 400, 50
  keys = jax.random.split(jax.random.key(5), num_keys)
  masks = jax.vmap(lambda k: jaxdrop.keep_mask(k, (positions,), rate))(keys)
  counts = np.asarray(masks.sum(axis=0), np.float64)
  p = 1 - rate
  chi2 = np.sum((counts - num_keys * p) ** 2 / (num_keys * p * (1 - p)))
  assert chi2 < stats.chi2.ppf(1 - 1e-4, df=positions), chi2


def test_mean_over_keys_equals_input():
  # E[y] = x: over N keys, mean(y_i) - x_i has sd x_i * sqrt(rate / (1-rate) / N).
  rate, n_keys = 0.5, 2000
  x = jnp.linspace(0.5, 2.0, 16)
  keys = jax.random.split(jax.random.key(9), n_keys)
  ys = jax.vmap(lambda k: jaxdrop.dropout(k, x, rate))(keys)
  sd = x * math.sqrt(rate / (1 - rate) / n_keys)
  assert np.all(np.abs(ys.mean(axis=0) - x) <= K_SIGMA * sd)
  # Pooled over the 16 positions (each standardized) the bound is tighter.
  z = (ys.mean(axis=0) - x) / sd
  assert abs(float(z.sum())) / 4.0 <= K_SIGMA


@pytest.mark.parametrize(
    "second", ["other_seed", "fold_in"], ids=["different_keys", "fold_in_steps"]
)
def test_masks_of_different_keys_are_independent(second):
  # Two independent masks agree on a fraction p^2 + (1-p)^2 of elements.
  rate, n = 0.5, 100_000
  base = jax.random.key(0)
  other = jax.random.key(1) if second == "other_seed" else jax.random.fold_in(base, 1)
  a = jaxdrop.keep_mask(base, (n,), rate)
  b = jaxdrop.keep_mask(other, (n,), rate)
  assert not np.array_equal(a, b)
  p = 1 - rate
  assert_binomial_fraction(int(jnp.sum(a == b)), n, p**2 + (1 - p) ** 2)


def test_same_key_same_output_different_key_different_output():
  x = jnp.ones((256,))
  a = jaxdrop.dropout(jax.random.key(0), x, 0.5)
  np.testing.assert_array_equal(a, jaxdrop.dropout(jax.random.key(0), x, 0.5))
  assert not np.array_equal(a, jaxdrop.dropout(jax.random.key(1), x, 0.5))


# ---------------------------------------------------------------------------
# broadcast_dims.


@pytest.mark.parametrize("dims", [(0,), (-1,), (1, 2), (-3, -1)])
def test_broadcast_dims_share_the_mask(dims):
  x = jnp.ones((6, 5, 4))
  key = jax.random.key(2)
  y = jaxdrop.dropout(key, x, 0.5, broadcast_dims=dims)
  axes = tuple(d % 3 for d in dims)
  mask_shape = tuple(1 if a in axes else s for a, s in enumerate(x.shape))
  np.testing.assert_array_equal(y, reference(key, x, 0.5, mask_shape))
  first = np.take(np.asarray(y), [0], axis=axes[0])
  np.testing.assert_array_equal(np.broadcast_to(first, y.shape), y)


@pytest.mark.parametrize(
    "dims, match",
    [((3,), "out of range"), ((-4,), "out of range"), ((0, 0), "repeats"), ((1, -2), "repeats")],
)
def test_bad_broadcast_dims_raise_value_error(dims, match):
  with pytest.raises(ValueError, match=match):
    jaxdrop.dropout(jax.random.key(0), jnp.ones((2, 3, 4)), 0.5, broadcast_dims=dims)


@pytest.mark.parametrize("dims", [(0.5,), 0.5, "0", np.array([0.0]), True], ids=str)
def test_broadcast_dims_of_wrong_type_raise_type_error(dims):
  with pytest.raises(TypeError, match="broadcast_dims"):
    jaxdrop.dropout(jax.random.key(0), jnp.ones((2, 3)), 0.5, broadcast_dims=dims)


@pytest.mark.parametrize("dims", [1, [1], np.array([1]), jnp.array([1]), jnp.array(1), np.int64(1)], ids=str)
def test_broadcast_dims_may_be_an_int_or_an_int_array(dims):
  key, x = jax.random.key(0), jnp.ones((4, 6))
  np.testing.assert_array_equal(
      jaxdrop.dropout(key, x, 0.5, broadcast_dims=dims),
      jaxdrop.dropout(key, x, 0.5, broadcast_dims=(1,)),
  )


def test_traced_broadcast_dims_raise_type_error():
  f = jax.jit(lambda dims: jaxdrop.dropout(jax.random.key(0), jnp.ones((2, 3)), 0.5, broadcast_dims=dims))
  with pytest.raises(TypeError, match="broadcast_dims must be static"):
    f(jnp.array([1]))


# ---------------------------------------------------------------------------
# Edge cases: deterministic, rate 0 and 1, traced rates.


def test_deterministic_returns_input_and_needs_no_key():
  x = jnp.arange(5.0)
  assert jaxdrop.dropout(None, x, 0.5, deterministic=True) is x


def test_static_rate_zero_has_no_random_ops():
  x = jnp.arange(5.0)
  jaxpr = jax.make_jaxpr(lambda k, x: jaxdrop.dropout(k, x, 0.0))(jax.random.key(0), x)
  assert jaxpr.jaxpr.eqns == []  # nothing at all: x is returned as is.
  np.testing.assert_array_equal(jaxdrop.dropout(None, x, 0.0), x)


def test_static_rates_zero_and_one_need_no_key():
  x = jnp.ones(3)
  np.testing.assert_array_equal(jaxdrop.dropout(None, x, 1.0), jnp.zeros(3))
  np.testing.assert_array_equal(jaxdrop.keep_mask(None, (3,), 0.0), jnp.ones(3, bool))


def test_non_partitionable_threefry_falls_back_to_jax_random_bits():
  key = jax.random.key(0)
  previous = jax.config.jax_threefry_partitionable
  jax.config.update("jax_threefry_partitionable", False)
  try:
    keep = jax.random.bits(key, (1000,), jnp.uint32) >= np.uint32(2**31)
    np.testing.assert_array_equal(jaxdrop.keep_mask(key, (1000,), 0.5), keep)
    # The backward pass recomputes the same mask from the key's array.
    grad = jax.jit(jax.grad(lambda x: jnp.sum(jaxdrop.dropout(key, x, 0.5))))(jnp.ones(1000))
    np.testing.assert_array_equal(grad != 0, keep)
  finally:
    jax.config.update("jax_threefry_partitionable", previous)


def test_static_rate_one_gives_zeros_and_zero_gradient():
  x = jnp.arange(1.0, 6.0)
  key = jax.random.key(0)
  np.testing.assert_array_equal(jaxdrop.dropout(key, x, 1.0), jnp.zeros(5))
  grad = jax.grad(lambda x: jaxdrop.dropout(key, x, 1.0).sum())(x)
  np.testing.assert_array_equal(grad, jnp.zeros(5))


def test_traced_rate_covers_zero_and_one_without_retracing():
  traces = []

  @jax.jit
  def step(key, x, rate):
    traces.append(None)
    y, grad = jax.value_and_grad(lambda x: jaxdrop.dropout(key, x, rate).sum())(x)
    return y, grad

  x = jnp.arange(1.0, 101.0)
  key = jax.random.key(4)
  y, grad = step(key, x, jnp.float32(0.0))
  np.testing.assert_array_equal(grad, jnp.ones(100))
  assert float(y) == float(x.sum())
  y, grad = step(key, x, jnp.float32(1.0))
  assert float(y) == 0.0
  np.testing.assert_array_equal(grad, jnp.zeros(100))
  y, grad = step(jax.random.key(5), x, jnp.float32(0.5))
  assert np.all(np.isfinite(grad))
  assert len(traces) == 1


def test_traced_rate_matches_static_rate_for_exact_values():
  # 0.25 and 0.5 are exact in float32, so the thresholds are the same.
  key = jax.random.key(6)
  x = jnp.arange(1.0, 201.0)
  for rate in (0.25, 0.5):
    np.testing.assert_array_equal(
        jax.jit(jaxdrop.dropout)(key, x, jnp.float32(rate)), jaxdrop.dropout(key, x, rate)
    )


@pytest.mark.parametrize("rate", [-0.5, 1.5, float("nan"), float("inf")])
def test_invalid_traced_rate_gives_nan_not_a_clip(rate):
  y = jax.jit(jaxdrop.dropout)(jax.random.key(0), jnp.ones(64), jnp.float32(rate))
  assert np.all(np.isnan(y))
  mask = jax.jit(jaxdrop.keep_mask, static_argnums=1)(jax.random.key(0), (64,), jnp.float32(rate))
  assert not np.any(mask)


def test_no_gradient_flows_to_rate():
  key = jax.random.key(0)
  x = jnp.arange(1.0, 65.0)
  grad = jax.grad(lambda r: jaxdrop.dropout(key, x, r).sum())(jnp.float32(0.3))
  assert float(grad) == 0.0


def test_gradient_flows_through_kept_elements_only(use_jit):
  key = jax.random.key(1)
  x = jnp.arange(1.0, 129.0)
  rate = 0.3
  grad_fn = maybe_jit(jax.grad(lambda x: jnp.sum(jaxdrop.dropout(key, x, rate) * x)), use_jit)
  keep = jaxdrop.keep_mask(key, x.shape, rate)
  scale = np.float32(TWO_32 / (TWO_32 - threshold(rate)))
  np.testing.assert_allclose(grad_fn(x), jnp.where(keep, 2 * x * scale, 0), rtol=1e-6)


def test_forward_mode_jvp_matches_reverse_mode():
  key = jax.random.key(2)
  x = jnp.arange(1.0, 33.0)
  f = lambda x: jaxdrop.dropout(key, x, 0.4)  # noqa: E731
  primal, tangent = jax.jvp(f, (x,), (jnp.ones_like(x),))
  np.testing.assert_array_equal(primal, f(x))
  np.testing.assert_array_equal(tangent, jax.grad(lambda x: f(x).sum())(x))
  hessian_vector = jax.jvp(jax.grad(lambda x: jnp.sum(f(x) ** 2)), (x,), (x,))[1]
  assert np.all(np.isfinite(hessian_vector))


# ---------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize("rate", [-0.5, 1.5, float("nan"), -1e-9, 1 + 1e-9, float("inf")])
def test_bad_static_rate_raises_value_error_naming_it(rate):
  with pytest.raises(ValueError, match=r"rate=(-0\.5|1\.5|nan|-1e-09|1\.000000001|inf)"):
    jaxdrop.dropout(jax.random.key(0), jnp.ones(3), rate)
  with pytest.raises(ValueError, match="rate="):
    jaxdrop.keep_mask(jax.random.key(0), (3,), rate)


def test_numpy_rates_are_static_and_checked():
  with pytest.raises(ValueError, match="rate=1.5"):
    jaxdrop.dropout(jax.random.key(0), jnp.ones(3), np.array(1.5))
  x = jnp.ones(64)
  np.testing.assert_array_equal(
      jaxdrop.dropout(jax.random.key(0), x, np.float32(0.5)),
      jaxdrop.dropout(jax.random.key(0), x, 0.5),
  )


def test_bad_static_rate_raises_even_when_deterministic():
  with pytest.raises(ValueError, match="rate=2"):
    jaxdrop.dropout(None, jnp.ones(3), 2, deterministic=True)


@pytest.mark.parametrize("rate", [True, "0.5", None, [0.5]])
def test_rate_of_wrong_type_raises_type_error(rate):
  with pytest.raises(TypeError, match="rate"):
    jaxdrop.dropout(jax.random.key(0), jnp.ones(3), rate)


def test_rate_array_that_is_not_scalar_raises_value_error():
  with pytest.raises(ValueError, match=r"scalar.*\(2,\)"):
    jaxdrop.dropout(jax.random.key(0), jnp.ones(3), jnp.array([0.1, 0.2]))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.bool_, jnp.complex64])
def test_non_floating_input_raises_type_error(dtype):
  with pytest.raises(TypeError, match=r"x\.dtype="):
    jaxdrop.dropout(jax.random.key(0), jnp.ones(3, dtype), 0.5)


@pytest.mark.parametrize("x", [None, "abc", object()], ids=["None", "str", "object"])
def test_input_that_is_not_an_array_raises_type_error_naming_x(x):
  with pytest.raises(TypeError, match="x must be a floating array"):
    jaxdrop.dropout(jax.random.key(0), x, 0.5)


def test_missing_key_raises_value_error_saying_how_to_pass_one():
  with pytest.raises(ValueError, match=r"key=None.*jax\.random\.key\(seed\)"):
    jaxdrop.dropout(None, jnp.ones(3), 0.5)


@pytest.mark.parametrize(
    "key", [0, "key", jnp.ones(2), jnp.zeros(3, jnp.uint32), np.zeros(2, np.int32)],
    ids=["int", "str", "float_array", "uint32_wrong_shape", "int32_array"],
)
def test_something_that_is_not_a_key_raises_type_error(key):
  with pytest.raises(TypeError, match="key must be"):
    jaxdrop.dropout(key, jnp.ones(3), 0.5)


@pytest.mark.parametrize(
    "keys",
    [jax.random.split(jax.random.key(0), 2), jax.random.split(jax.random.PRNGKey(0), 2)],
    ids=["typed", "raw"],
)
def test_a_batch_of_keys_raises_value_error_pointing_to_vmap(keys):
  with pytest.raises(ValueError, match="vmap"):
    jaxdrop.dropout(keys, jnp.ones(3), 0.5)


def test_traced_deterministic_raises_type_error():
  with pytest.raises(TypeError, match="deterministic"):
    jax.jit(lambda d: jaxdrop.dropout(jax.random.key(0), jnp.ones(3), 0.5, d))(True)


@pytest.mark.parametrize(
    "shape, error", [((-1,), ValueError), ((2.0,), TypeError), ("ab", TypeError)]
)
def test_keep_mask_rejects_bad_shapes(shape, error):
  with pytest.raises(error, match="shape"):
    jaxdrop.keep_mask(jax.random.key(0), shape, 0.5)


# ---------------------------------------------------------------------------
# dtypes.


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_dtype_and_shape_survive(dtype, use_jit):
  x = jnp.ones((3, 7), dtype)
  fn = maybe_jit(jaxdrop.dropout, use_jit, static_argnums=(2,))
  y = fn(jax.random.key(0), x, 0.3)
  chex.assert_shape(y, x.shape)
  chex.assert_type(y, dtype)


def test_float64_survives_with_x64():
  with jax.enable_x64(True):
    x = jnp.ones((3, 7), jnp.float64)
    y = jaxdrop.dropout(jax.random.key(0), x, 1 / 3)
    chex.assert_type(y, jnp.float64)
    kept = np.asarray(y)[np.asarray(y) != 0]
    np.testing.assert_array_equal(kept, TWO_32 / (TWO_32 - threshold(1 / 3)))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_outputs_round_once_from_float32(dtype):
  # The scale is applied in float32 and the product rounded once, so the
  # output is the correctly rounded x / p_keep: no bias from a scale that
  # was first rounded to 16 bits (1/0.9 rounds to 1.109375 in bfloat16).
  rate = 0.1
  x = jax.random.uniform(jax.random.key(0), (4096,), minval=1.0, maxval=2.0).astype(dtype)
  y = jaxdrop.dropout(jax.random.key(1), x, rate)
  expected = reference(jax.random.key(1), x, rate)
  np.testing.assert_array_equal(y, expected)


# ---------------------------------------------------------------------------
# Transformations.


def test_no_retrace_when_only_the_key_changes():
  traces = []

  @jax.jit
  def f(key, x):
    traces.append(None)
    return jaxdrop.dropout(key, x, 0.5)

  x = jnp.ones(10)
  for seed in range(4):
    f(jax.random.key(seed), x)
  assert len(traces) == 1


def test_vmap_over_keys_gives_each_example_its_own_mask():
  keys = jax.random.split(jax.random.key(0), 5)
  x = jnp.arange(1.0, 41.0).reshape(5, 8)
  batched = jax.vmap(lambda k, x: jaxdrop.dropout(k, x, 0.5))(keys, x)
  for i in range(5):
    np.testing.assert_array_equal(batched[i], jaxdrop.dropout(keys[i], x[i], 0.5))
  assert len({tuple(np.asarray(row != 0)) for row in batched}) > 1


def _split_raw(key, n):
  return jax.random.key_data(jax.random.split(key, n))


@pytest.mark.parametrize("split", [jax.random.split, _split_raw], ids=["typed", "raw"])
def test_vmap_of_grad_over_keys_recomputes_each_example_mask(split):
  # The backward pass recomputes each example's mask from its batched key.
  keys = split(jax.random.key(0), 5)
  x = jnp.arange(1.0, 41.0).reshape(5, 8)
  grad = jax.grad(lambda x, k: jnp.sum(jnp.sin(jaxdrop.dropout(k, x, 0.5))))
  batched = jax.jit(jax.vmap(grad))(x, keys)
  for i in range(5):
    np.testing.assert_array_equal(batched[i], grad(x[i], keys[i]))
    np.testing.assert_array_equal(batched[i] != 0, jaxdrop.dropout(keys[i], x[i], 0.5) != 0)


def test_vmap_over_raw_keys_and_traced_rates():
  keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(3))
  rates = jnp.array([0.0, 0.5, 1.0], jnp.float32)
  x = jnp.ones((3, 16))
  out = jax.vmap(jaxdrop.dropout)(keys, x, rates)
  np.testing.assert_array_equal(out[0], x[0])
  np.testing.assert_array_equal(out[2], jnp.zeros(16))
  np.testing.assert_array_equal(out[1], jaxdrop.dropout(keys[1], x[1], 0.5))


def test_scan_with_fold_in_equals_a_python_loop():
  base = jax.random.key(3)
  x = jnp.ones(32)

  def body(carry, step):
    return carry, jaxdrop.dropout(jax.random.fold_in(base, step), x, 0.5)

  _, scanned = jax.lax.scan(body, None, jnp.arange(4))
  for step in range(4):
    np.testing.assert_array_equal(
        scanned[step], jaxdrop.dropout(jax.random.fold_in(base, step), x, 0.5)
    )


# ---------------------------------------------------------------------------
# Memory: backward keeps nothing but the key.


def _mlp_step_temp_bytes(layer) -> int:
  sizes = [784, 1024, 1024, 10]
  params = [
      (jnp.zeros((a, b)), jnp.zeros((b,))) for a, b in zip(sizes[:-1], sizes[1:])
  ]
  optimizer = optax.adam(1e-3)

  def loss(params, x, y, key):
    h = x
    for i, (w, b) in enumerate(params):
      h = h @ w + b
      if i < len(params) - 1:
        h = layer(jax.random.fold_in(key, i), jax.nn.relu(h))
    return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()

  def step(params, state, x, y, key):
    grads = jax.grad(loss)(params, x, y, key)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  args = (params, optimizer.init(params), jnp.zeros((256, 784)), jnp.zeros(256, jnp.int32), jax.random.key(0))
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(*args).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_backward_keeps_only_the_key():
  # The MLP itself broadcasts its biases: allow promotion outside dropout.
  with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
    none = _mlp_step_temp_bytes(lambda key, h: h)
    ours = _mlp_step_temp_bytes(lambda key, h: jaxdrop.dropout(key, h, 0.5))
    traced = _mlp_step_temp_bytes(lambda key, h: jaxdrop.dropout(key, h, jnp.float32(0.5)))
  # Dropout adds at most 1 KiB (the key and scalars); XLA may even schedule
  # the step into less (jax 0.11 does, on CPU).
  assert ours - none <= 1024, (none, ours)
  assert traced - none <= 1024, (none, traced)


def _barriers(jaxpr):
  """Each barrier in ``jaxpr``: an optimization_barrier's operands as (shape,
  dtype) pairs, or "remat" for a checkpoint whose lowering puts a barrier on
  all its inputs (``prevent_cse=True``)."""
  found = []
  for eqn in equations(jaxpr):
    if eqn.primitive.name == "optimization_barrier":
      found.append([(v.aval.shape, v.aval.dtype) for v in eqn.invars])
    if eqn.params.get("prevent_cse"):
      found.append("remat")
  return found


U32 = jnp.dtype(jnp.uint32)


@pytest.mark.parametrize(
    "impl, bits, expected",
    [
        ("threefry2x32", 32, [[((), U32)] * 3]),  # the key schedule's words, one by one
        ("rbg", 32, [[((4,), U32)]]),  # the key's array
        ("threefry2x32", 16, ["remat"]),  # the key and the cotangent
    ],
)
def test_backward_barrier_holds_the_key_and_nothing_else(impl, bits, expected):
  # The backward recomputes the mask behind a barrier on the key: without one,
  # XLA may merge its hash with the forward's and keep the mask alive between
  # the two (seen compiling for a GPU). With more than the key behind it (the
  # incoming cotangent), XLA cannot fuse that cotangent's producer into the
  # masking and launches extra GPU kernels. Neither shows in CPU memory. The
  # fast mode's packed words are the exception: they need the cotangent behind
  # the barrier too, or XLA computes them in the forward pass and keeps them.
  key = jax.random.key(0, impl=impl)
  x = jnp.ones((8, 16))
  loss = lambda x: jnp.sum(jnp.tanh(jaxdrop.dropout(key, x * 2, 0.5, bits=bits)))  # noqa: E731
  assert _barriers(jax.make_jaxpr(jax.grad(loss))(x).jaxpr) == expected


def test_hash_counters_are_one_flat_iota_in_both_passes():
  # Per-axis counters (iota(rows) * cols + iota(cols)) let XLA's GPU compiler
  # hoist the row term into a kernel and buffer of its own (seen compiling
  # for an H100). One flat iota, reshaped, leaves nothing to hoist.
  key = jax.random.key(0)
  loss = lambda x: jnp.sum(jnp.tanh(jaxdrop.dropout(key, x * 2, 0.5)))  # noqa: E731
  jaxpr = jax.make_jaxpr(jax.grad(loss))(jnp.ones((8, 4, 16)))
  iotas = [e.outvars[0].aval.shape for e in equations(jaxpr.jaxpr) if e.primitive.name == "iota"]
  assert iotas == [(512,), (512,)]  # the forward's hash and the backward's


def _named_mlp_loss(layer):
  """An MLP loss that tags its dense outputs, as a model with remat names would."""

  def loss(params, x, key):
    h = x
    for i, (w, b) in enumerate(params):
      h = checkpoint_name(h @ w + b, "dense")
      if i < len(params) - 1:
        h = layer(jax.random.fold_in(key, i), jax.nn.relu(h))
    return jnp.sum(h)

  return loss


def _residuals(loss, policy=None):
  sizes = [8, 16, 16, 4]
  params = [(jnp.ones((a, b)), jnp.ones((b,))) for a, b in zip(sizes[:-1], sizes[1:])]
  fn = loss if policy is None else jax.checkpoint(loss, policy=policy)
  with jax.numpy_rank_promotion("allow"):  # The MLP broadcasts its biases.
    return saved_residuals(fn, params, jnp.ones((5, 8)), jax.random.key(0))


@pytest.mark.parametrize("bits", [32, 16])
def test_outputs_carry_the_checkpoint_name_and_a_names_policy_recomputes_them(bits):
  layer = lambda key, h: jaxdrop.dropout(key, h, 0.5, bits=bits)  # noqa: E731
  named = f"named {jaxdrop.CHECKPOINT_NAME!r}"
  # Without checkpointing, the second dense layer's backward keeps the
  # dropout outputs: one (5, 16) array per hidden layer, under its name.
  plain = [aval for aval, source in _residuals(_named_mlp_loss(layer)) if named in source]
  assert [a.shape for a in plain] == [(5, 16), (5, 16)]
  # A policy can pick exactly those by name...
  only = jax.checkpoint_policies.save_only_these_names(jaxdrop.CHECKPOINT_NAME)
  picked = _residuals(_named_mlp_loss(layer), only)
  # (jax 0.8 labels them "output of reduce_precision" under a policy: counted by shape.)
  saved = [a.shape for a, source in picked if "from the argument" not in source]
  assert saved == [(5, 16), (5, 16)]
  # ...or keep every named value but them: then dropout costs only its key.
  policy = jax.checkpoint_policies.save_any_names_but_these(jaxdrop.CHECKPOINT_NAME)
  nbytes = lambda residuals: sum(a.size * a.dtype.itemsize for a, _ in residuals)  # noqa: E731
  ours = _residuals(_named_mlp_loss(layer), policy)
  none = _residuals(_named_mlp_loss(lambda key, h: h), policy)
  assert not any(named in source for _, source in ours)
  assert nbytes(ours) - nbytes(none) == jax.random.key_data(jax.random.key(0)).nbytes


def test_mask_size_at_the_fused_limit_uses_jax_random_bits():
  # Masks of 2**32 or more elements need 64-bit counters; they go through
  # jax.random.bits. Checked on the dispatch, without allocating 16 GiB.
  jaxpr = jax.make_jaxpr(
      lambda k: jaxdrop.keep_mask(k, (2**16, 2**16), 0.5)
  )(jax.random.key(0))
  assert "random_bits" in str(jaxpr)
  jaxpr = jax.make_jaxpr(lambda k: jaxdrop.keep_mask(k, (2**16, 2**15), 0.5))(jax.random.key(0))
  assert "random_bits" not in str(jaxpr)
