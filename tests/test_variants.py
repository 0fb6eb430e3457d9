"""Tests of the dropout variants in jaxdrop._variants (modules: test_linen/test_nnx)."""

from __future__ import annotations

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdrop
from jaxdrop import _variants
from oracles import K_SIGMA, assert_binomial_fraction, p_keep

pytestmark = pytest.mark.usefixtures("strict_promotion")
KEY = jax.random.key(0)

# Every variant has the signature f(key, x, rate, deterministic).
FUNCTIONS = {
    "spatial": jaxdrop.spatial_dropout,
    "alpha": jaxdrop.alpha_dropout,
    "gaussian": jaxdrop.gaussian_dropout,
    "drop_path": jaxdrop.drop_path,
    "dropconnect": jaxdrop.dropconnect,
}
# Those built on jaxdrop.dropout: outputs are 0 or x / p_keep, linear in x.
MASKING = ["spatial", "drop_path", "dropconnect"]


def normal(shape, seed=1):
  """Standard normal test data (NumPy's generator: no jax.random compiles)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


# ----------------------------------------------------------------------------
# Spatial dropout.

SPATIAL_LAYOUTS = [
    # shape, channel_axis, batch_axis, the axes that share a decision
    ((4, 5, 6, 7), -1, 0, (1, 2)),  # NHWC
    ((4, 7, 5, 6), 1, 0, (2, 3)),  # NCHW
    ((4, 7, 6), 1, 0, (2,)),  # NCL (torch Dropout1d)
    ((2, 3, 4, 5, 7), -1, 0, (1, 2, 3)),  # NDHWC
    ((5, 6, 7), -1, None, (0, 1)),  # unbatched HWC
    ((6, 4, 7), 2, 1, (0,)),  # time-major LNC
]


@pytest.mark.parametrize("shape, channel_axis, batch_axis, shared", SPATIAL_LAYOUTS)
def test_spatial_decisions_are_shared_exactly_over_the_other_axes(
    shape, channel_axis, batch_axis, shared
):
  rate = 0.5
  y = jaxdrop.spatial_dropout(
      KEY, jnp.ones(shape), rate, channel_axis=channel_axis, batch_axis=batch_axis
  )
  chex.assert_shape(y, shape)
  # Constant along the shared axes: equal to its first slice there.
  first = y[tuple(slice(0, 1) if a in shared else slice(None) for a in range(len(shape)))]
  np.testing.assert_array_equal(y, jnp.broadcast_to(first, shape))
  # The decisions are the core's mask of that shape, and the call is
  # jaxdrop.dropout with those broadcast_dims.
  mask_shape = tuple(1 if a in shared else n for a, n in enumerate(shape))
  np.testing.assert_array_equal(first != 0, jaxdrop.keep_mask(KEY, mask_shape, rate))
  np.testing.assert_array_equal(
      y, jaxdrop.dropout(KEY, jnp.ones(shape), rate, broadcast_dims=shared)
  )


@pytest.mark.parametrize("channel_axis, shape", [(-1, (64, 3, 3, 64)), (1, (64, 64, 3, 3))])
def test_spatial_keep_fraction_per_example_and_channel(channel_axis, shape):
  rate = 0.3
  y = jaxdrop.spatial_dropout(KEY, jnp.ones(shape), rate, channel_axis=channel_axis)
  decisions = y[:, 0, 0, :] if channel_axis == -1 else y[:, :, 0, 0]
  values = np.unique(np.asarray(decisions))
  np.testing.assert_array_equal(values, [0, np.float32(1 / p_keep(rate))])
  assert_binomial_fraction(int(jnp.sum(decisions != 0)), decisions.size, p_keep(rate))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"channel_axis": 4},
        {"channel_axis": -5},
        {"batch_axis": 4},
        {"channel_axis": 0},  # == batch_axis
        {"channel_axis": -4, "batch_axis": 0},  # the same axis, spelled apart
    ],
)
def test_spatial_bad_axes_are_value_errors(kwargs):
  with pytest.raises(ValueError, match="axis"):
    jaxdrop.spatial_dropout(KEY, jnp.ones((2, 3, 4, 5)), 0.5, **kwargs)


def test_spatial_axis_of_wrong_type_is_a_type_error():
  with pytest.raises(TypeError, match="channel_axis"):
    jaxdrop.spatial_dropout(KEY, jnp.ones((2, 3)), 0.5, channel_axis=1.0)
  with pytest.raises(TypeError, match="batch_axis"):
    jaxdrop.spatial_dropout(KEY, jnp.ones((2, 3)), 0.5, batch_axis=(0,))


# ----------------------------------------------------------------------------
# Alpha dropout.


def test_alpha_prime_is_selus_negative_saturation():
  assert _variants.ALPHA_PRIME == -1.7580993408473766
  assert np.float32(jax.nn.selu(-100.0)) == np.float32(_variants.ALPHA_PRIME)


def alpha_affine(rate: float) -> tuple[float, float, float]:
  """q, a, b of Klambauer et al. (2017) in float64, with the exact q."""
  q = p_keep(rate)
  alpha = _variants.ALPHA_PRIME
  a = (q + alpha**2 * q * (1 - q)) ** -0.5
  return q, a, -a * alpha * (1 - q)


def test_alpha_keeps_mean_zero_and_variance_one():
  n = 2**18
  x = normal((n,))
  for rate in (0.05, 0.2, 0.5, 0.9):
    y = np.asarray(jaxdrop.alpha_dropout(KEY, x, rate), np.float64)
    # y = a z + b with z = x (prob q) or alpha' (prob 1 - q), x ~ N(0, 1):
    # mean 0 and variance 1 exactly. The sample mean has sd 1/sqrt(n); the
    # sample variance sd sqrt((mu4 - 1) / n), mu4 the 4th central moment of y.
    q, a, _ = alpha_affine(rate)
    m = (1 - q) * _variants.ALPHA_PRIME  # mean of z
    mu4 = a**4 * (q * (3 + 6 * m**2 + m**4) + (1 - q) * (_variants.ALPHA_PRIME - m) ** 4)
    assert abs(y.mean()) <= K_SIGMA / math.sqrt(n), (rate, y.mean())
    assert abs(y.var() - 1) <= K_SIGMA * math.sqrt((mu4 - 1) / n), (rate, y.var())


def test_alpha_drops_where_dropout_drops_and_applies_the_affine_map():
  rate = 0.3
  x = normal((4096,))
  y = jaxdrop.alpha_dropout(KEY, x, rate)
  keep = jaxdrop.keep_mask(KEY, x.shape, rate)
  np.testing.assert_array_equal(keep, jaxdrop.dropout(KEY, x, rate) != 0)
  _, a, b = alpha_affine(rate)
  np.testing.assert_allclose(y[keep], a * x[keep] + b, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(y[~keep], a * _variants.ALPHA_PRIME + b, rtol=1e-6)
  assert_binomial_fraction(int(keep.sum()), keep.size, p_keep(rate))


def test_alpha_rate_one_gives_zeros_with_finite_gradients():
  x = normal((64,))
  np.testing.assert_array_equal(jaxdrop.alpha_dropout(KEY, x, 1.0), jnp.zeros(64))
  traced = jax.jit(jaxdrop.alpha_dropout)
  np.testing.assert_array_equal(traced(KEY, x, jnp.float32(1.0)), jnp.zeros(64))
  grad = jax.grad(lambda x: traced(KEY, x, jnp.float32(1.0)).sum())(x)
  np.testing.assert_array_equal(grad, jnp.zeros(64))


def test_alpha_gradient_is_a_where_kept():
  rate, x = 0.4, normal((256,))
  grad = jax.jit(jax.grad(lambda x: jaxdrop.alpha_dropout(KEY, x, rate).sum()))(x)
  _, a, _ = alpha_affine(rate)
  expected = jnp.where(jaxdrop.keep_mask(KEY, x.shape, rate), np.float32(a), np.float32(0))
  np.testing.assert_allclose(grad, expected, rtol=1e-6)


# ----------------------------------------------------------------------------
# Gaussian dropout.


def test_gaussian_keeps_the_mean_and_has_the_dropout_variance():
  # y = c (1 + sigma eps): mean c, variance c^2 rate / (1 - rate). The sample
  # mean has sd sqrt(v / n); the sample variance of normals sd v sqrt(2 / (n-1)).
  n, c = 2**18, 3.0
  for rate in (0.1, 0.5, 0.8):
    y = np.asarray(jaxdrop.gaussian_dropout(KEY, jnp.full((n,), c), rate), np.float64)
    v = c**2 * rate / (1 - rate)
    assert abs(y.mean() - c) <= K_SIGMA * math.sqrt(v / n), (rate, y.mean())
    assert abs(y.var() - v) <= K_SIGMA * v * math.sqrt(2 / (n - 1)), (rate, y.var(), v)


def test_gaussian_noise_is_jax_random_normal_of_the_key():
  rate = 0.25
  eps = np.asarray(jax.jit(jax.random.normal, static_argnums=1)(KEY, X.shape), np.float64)
  factor = 1 + math.sqrt(rate / (1 - rate)) * eps
  expected = np.asarray(X, np.float64) * factor
  # float32 arithmetic: each of the two products and the sum rounds once.
  tolerance = 4 * 2.0**-24 * np.abs(np.asarray(X)) * (1 + np.abs(factor))
  assert np.all(np.abs(jaxdrop.gaussian_dropout(KEY, X, rate) - expected) <= tolerance)


def test_gaussian_static_rate_one_is_an_error():
  # Traced, rate 1 gives NaN: see test_traced_rate_works_under_jit_without_retracing.
  with pytest.raises(ValueError, match="infinite"):
    jaxdrop.gaussian_dropout(KEY, X, 1.0)
  with pytest.raises(ValueError, match="infinite"):
    jaxdrop.gaussian_dropout(None, X, 1.0, deterministic=True)


# ----------------------------------------------------------------------------
# Drop path.


@pytest.mark.parametrize("batch_axis", [0, 1, -1])
def test_drop_path_one_decision_per_example(batch_axis):
  shape = (6, 5, 4)
  y = jaxdrop.drop_path(KEY, jnp.ones(shape), 0.5, batch_axis=batch_axis)
  axis = batch_axis % 3
  mask_shape = tuple(n if a == axis else 1 for a, n in enumerate(shape))
  np.testing.assert_array_equal(
      y,
      jnp.broadcast_to(
          jnp.where(jaxdrop.keep_mask(KEY, mask_shape, 0.5), np.float32(2), np.float32(0)),
          shape,
      ),
  )


def test_drop_path_keep_fraction_and_residual_identity():
  rate, n = 0.2, 4096
  branch = normal((n, 8))
  y = jaxdrop.drop_path(KEY, branch, rate)
  dropped = np.all(np.asarray(y) == 0, axis=1)
  assert_binomial_fraction(int((~dropped).sum()), n, p_keep(rate))
  np.testing.assert_array_equal(
      y[~dropped], branch[~dropped] * np.float32(1 / p_keep(rate))
  )


def test_drop_path_bad_batch_axis():
  with pytest.raises(ValueError, match="batch_axis"):
    jaxdrop.drop_path(KEY, jnp.ones((2, 3)), 0.5, batch_axis=2)
  with pytest.raises(ValueError, match="batch_axis"):
    jaxdrop.drop_path(KEY, jnp.ones(()), 0.5)
  with pytest.raises(TypeError, match="batch_axis"):
    jaxdrop.drop_path(KEY, jnp.ones((2, 3)), 0.5, batch_axis=None)


def test_drop_path_rates_are_timms_linspace():
  rates = jaxdrop.drop_path_rates(12, 0.1)
  assert isinstance(rates, list) and all(type(r) is float for r in rates)
  np.testing.assert_array_equal(rates, np.linspace(0.0, 0.1, 12))
  assert rates[0] == 0.0 and rates[-1] == 0.1
  assert np.all(np.diff(rates) > 0)
  assert jaxdrop.drop_path_rates(5, 0.2) == [0.0, 0.05, 0.1, 0.15000000000000002, 0.2]
  assert jaxdrop.drop_path_rates(1, 0.3) == [0.0]
  assert jaxdrop.drop_path_rates(0, 0.3) == []


@pytest.mark.parametrize(
    "args, error",
    [
        ((-1, 0.1), ValueError),
        ((3, 1.5), ValueError),
        ((3, float("nan")), ValueError),
        ((3.0, 0.1), TypeError),
        ((True, 0.1), TypeError),
        ((3, jnp.float32(0.1)), TypeError),
    ],
)
def test_drop_path_rates_errors(args, error):
  with pytest.raises(error):
    jaxdrop.drop_path_rates(*args)


# ----------------------------------------------------------------------------
# DropConnect.


def test_dropconnect_is_dropout_on_the_kernel():
  kernel = normal((16, 8))
  w = jaxdrop.dropconnect(KEY, kernel, 0.5)
  np.testing.assert_array_equal(w, jaxdrop.dropout(KEY, kernel, 0.5))
  with pytest.raises(TypeError, match="kernel"):
    jaxdrop.dropconnect(KEY, jnp.ones((2, 2), jnp.int32), 0.5)


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_dropconnect_dense_is_flax_dense_on_the_dropped_kernel(use_bias, dtype):
  x, kernel, bias = normal((5, 3, 16)), normal((16, 8), 2), normal((8,), 3)
  dense = nn.Dense(8, use_bias=use_bias, dtype=dtype)
  params = {"kernel": jaxdrop.dropconnect(KEY, kernel, 0.3)} | ({"bias": bias} if use_bias else {})
  y = jaxdrop.dropconnect_dense(KEY, x, kernel, bias if use_bias else None, 0.3, dtype=dtype)
  np.testing.assert_array_equal(y, dense.apply({"params": params}, x))
  # Dropped weights get no gradient.
  grad = jax.grad(lambda k: jaxdrop.dropconnect_dense(KEY, x, k, None, 0.3).sum())(kernel)
  dropped = np.asarray(jaxdrop.dropconnect(KEY, jnp.ones_like(kernel), 0.3) == 0)
  assert 0 < dropped.sum() and np.all(np.asarray(grad)[dropped] == 0)


def test_dropconnect_dense_shape_errors():
  with pytest.raises(ValueError, match="kernel"):
    jaxdrop.dropconnect_dense(KEY, normal((2, 4)), normal((4,)), None, 0.5)
  with pytest.raises(ValueError, match="bias"):
    jaxdrop.dropconnect_dense(KEY, normal((2, 4)), normal((4, 3)), normal((4,)), 0.5)


# ----------------------------------------------------------------------------
# Properties every variant shares.

X = normal((8, 4, 4, 16))
# Rounding differs between eager and jitted code (fusion), so values that
# pass through arithmetic are compared to about an ulp; masks exactly.
ULP = {"rtol": 1e-6, "atol": 1e-6}


@pytest.mark.parametrize("name", FUNCTIONS)
def test_same_key_same_output_different_key_different_output(name):
  fn = FUNCTIONS[name]
  y = fn(KEY, X, 0.5)
  chex.assert_shape(y, X.shape)
  chex.assert_type(y, jnp.float32)
  np.testing.assert_array_equal(y, fn(KEY, X, 0.5))
  assert not np.array_equal(y, fn(jax.random.key(1), X, 0.5))


@pytest.mark.parametrize("name", MASKING)
def test_every_element_is_zero_or_exactly_scaled(name):
  y = np.asarray(FUNCTIONS[name](KEY, X, 0.3))
  kept = y != 0
  assert 0 < kept.sum() < kept.size
  np.testing.assert_array_equal(y[kept], np.asarray(X)[kept] * np.float32(1 / p_keep(0.3)))


@pytest.mark.parametrize("name", FUNCTIONS)
def test_deterministic_and_rate_zero_return_x_without_a_key(name):
  fn = FUNCTIONS[name]
  np.testing.assert_array_equal(fn(None, X, 0.5, deterministic=True), X)
  np.testing.assert_array_equal(fn(None, X, 0.0), X)
  with pytest.raises(ValueError, match="key"):
    fn(None, X, 0.5)
  with pytest.raises(TypeError, match="deterministic"):
    fn(KEY, X, 0.5, deterministic=jnp.bool_(True))


@pytest.mark.parametrize("name", FUNCTIONS)
def test_bad_rate_is_a_value_error_and_integer_input_a_type_error(name):
  fn = FUNCTIONS[name]
  for rate in (1.5, -0.1, float("nan")):
    with pytest.raises(ValueError, match="rate"):
      fn(KEY, X, rate)
    with pytest.raises(ValueError, match="rate"):
      fn(None, X, rate, deterministic=True)
  with pytest.raises(TypeError, match="floating"):
    fn(KEY, jnp.ones((4, 4), jnp.int32), 0.5)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_half_precision_is_computed_in_float32_and_cast_once(name):
  fn = FUNCTIONS[name]
  for dtype in (jnp.bfloat16, jnp.float16):
    y = fn(KEY, X.astype(dtype), 0.3)
    chex.assert_type(y, dtype)
    expected = fn(KEY, X.astype(dtype).astype(jnp.float32), 0.3).astype(dtype)
    np.testing.assert_array_equal(y, expected)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_traced_rate_works_under_jit_without_retracing(name):
  traces = 0

  def fn(key, x, rate):
    nonlocal traces
    traces += 1
    return FUNCTIONS[name](key, x, rate)

  jitted = jax.jit(fn)
  for rate in (0.1, 0.6):
    # Jitted with a traced rate equals eager with the static rate.
    y, eager = jitted(KEY, X, jnp.float32(rate)), FUNCTIONS[name](KEY, X, rate)
    np.testing.assert_array_equal(y == 0, eager == 0)
    np.testing.assert_allclose(y, eager, **ULP)
  # Rate 1: zeros (finite gradients), except gaussian dropout's infinite
  # variance, which is NaN like any invalid traced rate.
  at_one = jitted(KEY, X, jnp.float32(1.0))
  if name == "gaussian":
    assert np.all(np.isnan(at_one))
  else:
    np.testing.assert_array_equal(at_one, jnp.zeros_like(X))
    np.testing.assert_array_equal(FUNCTIONS[name](KEY, X, 1.0), jnp.zeros_like(X))
  # An invalid traced rate is not clipped: the output is NaN.
  assert np.all(np.isnan(jitted(KEY, X, jnp.float32(1.5))))
  assert np.all(np.isnan(jitted(KEY, X, jnp.float32(jnp.nan))))
  assert traces == 1


@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("rate", [0.3, np.float32(0.3)], ids=["static", "traced"])
def test_eager_and_jit_are_bitwise_equal(name, rate):
  fn = FUNCTIONS[name]
  if isinstance(rate, np.float32):
    rate = jnp.float32(rate)  # A JAX array: traced under jit.
    jitted = jax.jit(fn)
  else:
    jitted = jax.jit(fn, static_argnums=2)
  np.testing.assert_array_equal(jitted(KEY, X, rate), fn(KEY, X, rate))


@pytest.mark.parametrize("name", FUNCTIONS)
def test_vmap_over_keys_equals_one_call_per_key(name):
  fn = FUNCTIONS[name]
  keys = jax.random.split(KEY, 3)
  ys = jax.jit(jax.vmap(lambda k: fn(k, X, 0.5)))(keys)
  for i in range(3):
    np.testing.assert_allclose(ys[i], fn(keys[i], X, 0.5), **ULP)


@pytest.mark.parametrize("name", MASKING + ["gaussian"])
def test_gradient_of_a_linear_variant_is_its_output_for_ones(name):
  # Each is x times a key-dependent factor, so d sum(f(x)) / dx = f(ones).
  fn = FUNCTIONS[name]
  grad = jax.grad(lambda x: fn(KEY, x, 0.5).sum())(X)
  np.testing.assert_array_equal(grad, fn(KEY, jnp.ones_like(X), 0.5))
