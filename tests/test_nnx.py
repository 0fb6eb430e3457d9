"""Tests of jaxdrop.nnx: every module equals its pure function, and drops into flax code."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxdrop
from conftest import MODULE_RATE, MODULE_X, MODULES, module_params

KEY = jax.random.key(0)
X = MODULE_X


def make(name, rngs=None, rate=MODULE_RATE, **kwargs):
  if rngs is None and name == "DropConnect":
    rngs = nnx.Rngs(params=2, dropout=3)  # Its parameters need a stream.
  return MODULES[name].nnx(rate, rngs, **kwargs)


def expected(name, layer, key, deterministic=False, x=X):
  return MODULES[name].function(key, x, MODULE_RATE, module_params(layer), deterministic)


def next_key(stream: nnx.RngStream) -> jax.Array:
  """The key ``stream()`` gives next, without advancing it."""
  return jax.random.fold_in(stream.key[...], stream.count[...])


def assert_same_state(ours, theirs):
  """Same variables (parameters, rng keys and counts), leaf for leaf."""
  a, b = nnx.state(ours), nnx.state(theirs)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  as_data = lambda v: jax.random.key_data(v) if jnp.issubdtype(v.dtype, jax.dtypes.prng_key) else v  # noqa: E731
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(as_data(x), as_data(y))


# ----------------------------------------------------------------------------
# Every module: the same checks, from one table.


@pytest.mark.usefixtures("strict_promotion")
@pytest.mark.parametrize("name", MODULES)
def test_module_equals_its_function_for_the_same_key(name):
  layer = make(name, nnx.Rngs(params=2, dropout=3))
  np.testing.assert_array_equal(layer(X, rngs=KEY), expected(name, layer, KEY))
  # From its own stream, forked from 'dropout' at construction, as flax's
  # nnx.Dropout does: one fresh key per call.
  stream = nnx.Rngs(dropout=3).dropout.fork()
  for _ in range(2):
    np.testing.assert_array_equal(layer(X), expected(name, layer, stream()))
  np.testing.assert_array_equal(layer(X, deterministic=True), expected(name, layer, None, True))


@pytest.mark.parametrize("name", MODULES)
def test_train_eval_and_view_switch_the_module(name):
  layer = make(name, nnx.Rngs(params=2, dropout=3))
  layer.eval()
  np.testing.assert_array_equal(layer(X), expected(name, layer, None, True))
  view = nnx.view(layer, deterministic=False)
  np.testing.assert_array_equal(view(X, rngs=KEY), expected(name, layer, KEY))
  layer.train()
  np.testing.assert_array_equal(layer(X, rngs=KEY), expected(name, layer, KEY))
  np.testing.assert_array_equal(
      nnx.view(layer, deterministic=True)(X), expected(name, layer, None, True)
  )


@pytest.mark.parametrize("name", MODULES)
def test_default_stream_is_forked_as_flax_does(name):
  layer = make(name, nnx.Rngs(0))
  # Parameters (if any) come first from 'default', then the fork.
  rngs = nnx.Rngs(0)
  if name == "DropConnect":
    nnx.Linear(16, 8, rngs=rngs)
  stream = rngs.default.fork()
  np.testing.assert_array_equal(layer(X), expected(name, layer, stream()))


@pytest.mark.parametrize("name", MODULES)
def test_module_errors_name_the_problem(name):
  with pytest.raises(ValueError, match=r"(?s)'dropout' or 'default'.*\['params'\].*nnx\.Rngs\(seed\)"):
    make(name, nnx.Rngs(params=0))
  if name != "DropConnect":  # Its parameters need an Rngs: it always has a stream.
    with pytest.raises(ValueError, match=r"(?s)no rng stream.*rngs=nnx\.Rngs"):
      make(name)(X)
  with pytest.raises(TypeError, match="rngs must be"):
    make(name, rngs=0)
  with pytest.raises(ValueError, match="nnx.view"):
    make(name, deterministic=None)(X)
  with pytest.raises(ValueError, match="rate=1.5"):
    make(name, rate=1.5)


@pytest.mark.parametrize("name", MODULES)
def test_a_failed_call_leaves_the_stream_unchanged(name):
  layer = make(name, nnx.Rngs(params=2, dropout=3))
  before = nnx.clone(layer)
  with pytest.raises(TypeError, match="deterministic"):
    layer(X, deterministic=0)
  with pytest.raises(TypeError, match="floating|contracting"):
    layer(X[..., :3].astype(jnp.int32))
  assert_same_state(layer, before)
  layer(X)
  with pytest.raises(AssertionError):
    assert_same_state(layer, before)  # A successful call does advance it.


def test_gaussian_module_refuses_rate_one_like_its_function():
  with pytest.raises(ValueError, match="infinite"):
    jaxdrop.nnx.GaussianDropout(1.0)


def test_drop_connect_dense_is_a_deprecated_alias():
  with pytest.warns(DeprecationWarning, match="DropConnectLinear"):
    layer = jaxdrop.nnx.DropConnectDense(16, 8, 0.5, rngs=nnx.Rngs(0))
  assert isinstance(layer, jaxdrop.nnx.DropConnectLinear)


def test_drop_connect_linear_has_linears_parameters():
  layer = jaxdrop.nnx.DropConnectLinear(16, 8, 0.5, rngs=nnx.Rngs(params=2, dropout=3))
  linear = nnx.Linear(16, 8, rngs=nnx.Rngs(params=2))
  np.testing.assert_array_equal(layer.kernel[...], linear.kernel[...])
  layer.eval()
  np.testing.assert_array_equal(layer(X), linear(X))


# ----------------------------------------------------------------------------
# Dropout as a drop-in for flax.nnx.Dropout.


class MLP(nnx.Module):
  """flax's nnx.Dropout docstring example, with the layer class as a parameter."""

  def __init__(self, rngs, dropout=jaxdrop.nnx.Dropout):
    self.linear = nnx.Linear(in_features=3, out_features=4, rngs=rngs)
    self.dropout = dropout(0.5, rngs=rngs)

  def __call__(self, x, rngs=None):
    return self.dropout(self.linear(x), rngs=rngs)


@pytest.mark.parametrize(
    "make_rngs", [lambda: nnx.Rngs(0), lambda: nnx.Rngs(params=0, dropout=1)], ids=["Rngs(0)", "Rngs(dropout=1)"]
)
def test_flax_docstring_example(make_rngs):
  ours, theirs = MLP(make_rngs()), MLP(make_rngs(), dropout=nnx.Dropout)
  assert_same_state(ours, theirs)  # Same parameters and the same forked stream.
  x = jnp.ones((1, 3))
  ours.train()
  key = next_key(ours.dropout.rngs)
  np.testing.assert_array_equal(ours(x), jaxdrop.dropout(key, ours.linear(x), 0.5))
  ours.eval()
  theirs.eval()
  np.testing.assert_array_equal(ours(x), theirs(x))
  np.testing.assert_array_equal(ours(x), ours.linear(x))


def test_call_time_rngs_override_as_rngs_stream_or_key():
  model = MLP(nnx.Rngs(0))
  x = jnp.ones((2, 3))
  hidden = model.linear(x)
  before = model.dropout.rngs.count[...]
  for rngs, key in [
      (jax.random.key(9), jax.random.key(9)),
      (nnx.Rngs(dropout=9), nnx.Rngs(dropout=9).dropout()),
      (nnx.Rngs(9), nnx.Rngs(9).default()),  # falls back to 'default', as flax does
      (nnx.Rngs(dropout=9).dropout, nnx.Rngs(dropout=9).dropout()),
  ]:
    np.testing.assert_array_equal(model(x, rngs=rngs), jaxdrop.dropout(key, hidden, 0.5))
  assert model.dropout.rngs.count[...] == before  # The module's stream is not used.


def test_nnx_jit_advances_the_stream_like_eager_calls():
  model = MLP(nnx.Rngs(0))
  eager = nnx.clone(model)
  x = jnp.ones((4, 3))
  step = nnx.jit(lambda model, x: model(x))
  outputs = [step(model, x) for _ in range(3)]
  assert not np.array_equal(outputs[0], outputs[1])
  for y in outputs:
    np.testing.assert_array_equal(y, eager(x))
  assert int(model.dropout.rngs.count[...]) == 3


def test_broadcast_dims_accepts_ints_and_arrays():
  x = jnp.ones((6, 5))
  for dims in (0, (0,), [0], np.array([0]), jnp.array([0])):
    layer = jaxdrop.nnx.Dropout(0.5, broadcast_dims=dims)
    np.testing.assert_array_equal(layer(x, rngs=KEY), jaxdrop.dropout(KEY, x, 0.5, broadcast_dims=(0,)))
  with pytest.raises(TypeError, match="broadcast_dims"):
    jaxdrop.nnx.Dropout(0.5, broadcast_dims=0.5)


def test_rate_zero_and_one_need_no_rng_as_in_flax():
  x = jnp.arange(4.0)
  assert jaxdrop.nnx.Dropout(0.0)(x) is x
  np.testing.assert_array_equal(jaxdrop.nnx.Dropout(1.0)(x), jnp.zeros(4))
  np.testing.assert_array_equal(nnx.Dropout(1.0)(x), jnp.zeros(4))


class Net(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(8, 32, rngs=rngs)
    self.dropout = jaxdrop.nnx.Dropout(0.5, rngs=rngs)
    self.out = nnx.Linear(32, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(self.dropout(nnx.relu(self.hidden(x))))


def test_inside_a_real_model_trains_under_nnx_jit():
  model = Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(0), (16, 8))
  labels = jnp.arange(16) % 3

  @nnx.jit
  def step(model, optimizer):
    def loss(model):
      logits = model(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    value, grads = nnx.value_and_grad(loss)(model)
    optimizer.update(model, grads)
    return value

  losses = [float(step(model, optimizer)) for _ in range(30)]
  assert np.all(np.isfinite(losses)) and np.mean(losses[-5:]) < np.mean(losses[:5])
  # In training the layer drops like dropout; in evaluation not at all.
  hidden = nnx.relu(model.hidden(jnp.tile(x, (8, 1))))
  jaxdrop.checks.assert_dropout_output(hidden, model.dropout(hidden), 0.5)
  model.eval()
  np.testing.assert_array_equal(model(x), model.out(nnx.relu(model.hidden(x))))
