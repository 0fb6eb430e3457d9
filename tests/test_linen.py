"""Tests of jaxdrop.linen: every module equals its pure function, and drops into flax code."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdrop
from conftest import MODULE_RATE, MODULE_X, MODULES

KEY = jax.random.key(0)
X = MODULE_X


def init(name, rate=MODULE_RATE, **fields):
  """The module of row ``name``, its variables and its params ({} if none)."""
  module = MODULES[name].linen(rate, **fields)
  variables = MODULES[name].linen(rate).init({"params": jax.random.key(2)}, X, deterministic=True)
  return module, variables, variables.get("params", {})


def stream_key(rngs, collection="dropout"):
  """The key a root module draws from ``rngs`` with ``make_rng(collection)``."""

  class Probe(nn.Module):
    @nn.compact
    def __call__(self):
      return self.make_rng(collection)

  return Probe().apply({}, rngs=rngs)


# ----------------------------------------------------------------------------
# Every module: the same checks, from one table.


@pytest.mark.usefixtures("strict_promotion")
@pytest.mark.parametrize("name", MODULES)
def test_module_equals_its_function_for_the_same_key(name):
  module, variables, params = init(name)
  function = MODULES[name].function
  expected = function(KEY, X, MODULE_RATE, params, False)
  np.testing.assert_array_equal(module.apply(variables, X, deterministic=False, rng=KEY), expected)
  # From the stream: flax's make_rng key for the module's path.
  rngs = {"dropout": jax.random.key(1)}
  np.testing.assert_array_equal(
      module.apply(variables, X, deterministic=False, rngs=rngs),
      function(stream_key(rngs), X, MODULE_RATE, params, False),
  )
  np.testing.assert_array_equal(
      module.apply(variables, X, deterministic=True), function(None, X, MODULE_RATE, params, True)
  )


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize(
    "field, call, active",
    [(None, False, True), (None, True, False), (False, None, True), (True, None, False)],
)
def test_deterministic_merge_rules(name, field, call, active):
  module, variables, params = init(name, deterministic=field)
  rngs = {"dropout": jax.random.key(1)}
  y = module.apply(variables, X, deterministic=call, rngs=rngs)
  key = stream_key(rngs) if active else None
  np.testing.assert_array_equal(y, MODULES[name].function(key, X, MODULE_RATE, params, not active))


@pytest.mark.parametrize("name", MODULES)
def test_module_errors_name_the_problem(name):
  module, variables, _ = init(name)
  with pytest.raises(ValueError, match=r"(?s)no 'dropout' rng stream.*rngs=\{'dropout': key\}"):
    module.apply(variables, X, deterministic=False, rngs={"params": KEY})
  with pytest.raises(ValueError, match="deterministic"):
    init(name, deterministic=True)[0].apply(variables, X, deterministic=False)
  with pytest.raises(ValueError, match="deterministic"):
    module.apply(variables, X)
  with pytest.raises(TypeError, match="deterministic"):
    module.apply(variables, X, deterministic=0, rng=KEY)
  with pytest.raises(ValueError, match="rate=1.5"):
    MODULES[name].linen(1.5)


@pytest.mark.parametrize("name", MODULES)
def test_traced_rate_field_inside_jit(name):
  module, variables, params = init(name)
  function = MODULES[name].function

  def apply(rate):
    layer = MODULES[name].linen(rate)
    return layer.apply(variables, X, deterministic=False, rng=KEY)

  y = jax.jit(apply)(jnp.float32(0.5))  # 0.5 is exact in float32.
  expected = function(KEY, X, 0.5, params, False)
  np.testing.assert_array_equal(y == 0, expected == 0)
  np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)


def test_gaussian_module_refuses_rate_one_like_its_function():
  with pytest.raises(ValueError, match="infinite"):
    jaxdrop.linen.GaussianDropout(1.0)


# ----------------------------------------------------------------------------
# Dropout as a drop-in for flax.linen.Dropout.


def test_missing_dropout_stream_is_an_error_where_flax_falls_back_to_params():
  nn.Dropout(0.5).apply({}, jnp.ones(3), deterministic=False, rngs={"params": KEY})
  with pytest.raises(ValueError, match="'params' stream"):
    jaxdrop.linen.Dropout(0.5).apply({}, jnp.ones(3), deterministic=False, rngs={"params": KEY})


def test_custom_rng_collection():
  layer = jaxdrop.linen.Dropout(0.5, rng_collection="noise")
  with pytest.raises(ValueError, match="'noise'"):
    layer.apply({}, X, deterministic=False, rngs={"dropout": KEY})
  rngs = {"noise": KEY}
  np.testing.assert_array_equal(
      layer.apply({}, X, deterministic=False, rngs=rngs),
      jaxdrop.dropout(stream_key(rngs, "noise"), X, 0.5),
  )


def test_rate_zero_and_one_need_no_rng_as_in_flax():
  x = jnp.arange(4.0)
  assert jaxdrop.linen.Dropout(0.0).apply({}, x, deterministic=False) is x
  zeros = jaxdrop.linen.Dropout(1.0).apply({}, x, deterministic=False)
  np.testing.assert_array_equal(zeros, jnp.zeros(4))
  np.testing.assert_array_equal(zeros, nn.Dropout(1.0).apply({}, x, deterministic=False))


@pytest.mark.parametrize("dims", [(0,), (-1,), [1], np.array([1]), jnp.array([1]), 1])
def test_broadcast_dims_as_flax_accepts_them(dims):
  x = jnp.ones((6, 5))
  rngs = {"dropout": KEY}
  ours = jaxdrop.linen.Dropout(0.5, broadcast_dims=dims).apply({}, x, deterministic=False, rngs=rngs)
  np.testing.assert_array_equal(ours, jaxdrop.dropout(stream_key(rngs), x, 0.5, broadcast_dims=dims))
  # The mask is shared along those axes, as flax's is.
  theirs = nn.Dropout(0.5, broadcast_dims=tuple(np.atleast_1d(dims).tolist()))
  theirs = theirs.apply({}, x, deterministic=False, rngs=rngs)
  axis = int(np.atleast_1d(dims)[0]) % 2
  for y in (ours, theirs):
    np.testing.assert_array_equal(y, np.broadcast_to(np.take(y, [0], axis=axis), y.shape))


class MLP(nn.Module):
  dropout: type = jaxdrop.linen.Dropout

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.relu(nn.Dense(32)(x))
    x = self.dropout(0.5, deterministic=not train)(x)
    return nn.Dense(3)(x)


def assert_dropout_inside(model, params, x, rngs):
  """The model's Dropout layer drops its input as jaxdrop.dropout does."""
  logits, state = model.apply(params, x, train=True, rngs=rngs, capture_intermediates=True)
  seen = state["intermediates"]
  hidden = nn.relu(seen["Dense_0"]["__call__"][0])
  dropped = seen["Dropout_0"]["__call__"][0]
  jaxdrop.checks.assert_dropout_output(hidden, dropped, 0.5)
  dense = nn.Dense(3).apply({"params": params["params"]["Dense_1"]}, dropped)
  np.testing.assert_array_equal(logits, dense)


def test_drops_into_a_model_written_for_flax_dropout():
  # The same params load, evaluation is identical, and in training the layer
  # drops like dropout (only the mask's bits differ from flax's).
  x = jax.random.normal(jax.random.key(0), (64, 8))
  ours, theirs = MLP(), MLP(dropout=nn.Dropout)
  params = theirs.init(jax.random.key(1), x, train=False)
  np.testing.assert_array_equal(
      ours.apply(params, x, train=False), theirs.apply(params, x, train=False)
  )
  assert_dropout_inside(ours, params, x, {"dropout": jax.random.key(2)})


def test_inside_a_real_model_trains_and_evaluates():
  model = MLP()
  x = jax.random.normal(jax.random.key(0), (16, 8))
  labels = jnp.arange(16) % 3
  params = model.init(jax.random.key(1), x, train=False)
  optimizer = optax.sgd(0.1)
  state = optimizer.init(params)

  @jax.jit
  def step(params, state, key):
    def loss(params):
      logits = model.apply(params, x, train=True, rngs={"dropout": key})
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    value, grads = jax.value_and_grad(loss)(params)
    updates, state = optimizer.update(grads, state)
    return optax.apply_updates(params, updates), state, value

  losses = []
  for i in range(30):
    params, state, value = step(params, state, jax.random.fold_in(jax.random.key(2), i))
    losses.append(float(value))
  assert np.all(np.isfinite(losses)) and np.mean(losses[-5:]) < np.mean(losses[:5])
  assert_dropout_inside(model, params, jnp.tile(x, (8, 1)), {"dropout": jax.random.key(3)})
  # Evaluation is deterministic, needs no dropout rng and drops nothing.
  a = model.apply(params, x, train=False)
  np.testing.assert_array_equal(a, MLP(dropout=nn.Dropout).apply(params, x, train=False))


def test_init_in_training_mode_needs_a_dropout_stream():
  x = jnp.ones((2, 8))
  with pytest.raises(ValueError, match="model.init"):
    MLP().init(KEY, x, train=True)
  params = MLP().init({"params": KEY, "dropout": jax.random.key(1)}, x, train=True)
  np.testing.assert_array_equal(
      MLP().apply(params, x, train=False), MLP(dropout=nn.Dropout).apply(params, x, train=False)
  )
