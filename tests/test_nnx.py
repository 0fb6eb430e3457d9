"""Tests of jaxdrop.nnx.Dropout: a drop-in for flax.nnx.Dropout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxdrop


def test_equals_the_function_for_the_same_key():
  x = jnp.arange(1.0, 65.0).reshape(8, 8)
  key = jax.random.key(0)
  layer = jaxdrop.nnx.Dropout(0.3, broadcast_dims=(-1,))
  np.testing.assert_array_equal(
      layer(x, rngs=key), jaxdrop.dropout(key, x, 0.3, broadcast_dims=(-1,))
  )


def test_stream_keys_match_flax_nnx_dropout_keys():
  # Both fork the 'dropout' stream at construction and draw a key per call.
  ours = jaxdrop.nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=3))
  stream = nnx.Rngs(dropout=3)["dropout"].fork()
  x = jnp.ones(64)
  for _ in range(3):
    np.testing.assert_array_equal(ours(x), jaxdrop.dropout(stream(), x, 0.5))


def test_successive_calls_use_fresh_keys():
  layer = jaxdrop.nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=0))
  x = jnp.ones(64)
  assert not np.array_equal(layer(x), layer(x))


def test_call_flag_overrides_constructor_and_missing_flag_explains_options():
  x = jnp.ones(16)
  layer = jaxdrop.nnx.Dropout(0.5, deterministic=True, rngs=nnx.Rngs(dropout=0))
  assert layer(x) is x
  assert bool(jnp.any(layer(x, deterministic=False) != x))
  with pytest.raises(ValueError, match="nnx.view"):
    jaxdrop.nnx.Dropout(0.5, deterministic=None)(x)


def test_missing_stream_is_an_error_not_a_default_fallback():
  with pytest.raises(ValueError, match=r"'dropout'.*\['default'\]"):
    jaxdrop.nnx.Dropout(0.5, rngs=nnx.Rngs(0))
  layer = jaxdrop.nnx.Dropout(0.5)
  with pytest.raises(ValueError, match="no rng stream"):
    layer(jnp.ones(3))
  with pytest.raises(TypeError, match="rngs must be"):
    jaxdrop.nnx.Dropout(0.5, rngs=0)


def test_rngs_at_call_time_as_rngs_stream_or_key():
  x = jnp.ones(64)
  layer = jaxdrop.nnx.Dropout(0.5)
  key = jax.random.key(9)
  np.testing.assert_array_equal(layer(x, rngs=key), jaxdrop.dropout(key, x, 0.5))
  from_rngs = layer(x, rngs=nnx.Rngs(dropout=9))
  np.testing.assert_array_equal(from_rngs, jaxdrop.dropout(nnx.Rngs(dropout=9).dropout(), x, 0.5))
  from_stream = layer(x, rngs=nnx.Rngs(dropout=9).dropout)
  np.testing.assert_array_equal(from_stream, from_rngs)


def test_rate_zero_and_one():
  x = jnp.arange(4.0)
  assert jaxdrop.nnx.Dropout(0.0)(x) is x
  # As in flax, rate 1 needs no rng: nothing random happens.
  np.testing.assert_array_equal(jaxdrop.nnx.Dropout(1.0)(x), jnp.zeros(4))
  np.testing.assert_array_equal(nnx.Dropout(1.0)(x), jnp.zeros(4))
  with pytest.raises(ValueError, match="rate=-0.1"):
    jaxdrop.nnx.Dropout(-0.1)


class Net(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(8, 32, rngs=rngs)
    self.dropout = jaxdrop.nnx.Dropout(0.5, rngs=rngs)
    self.out = nnx.Linear(32, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(self.dropout(nnx.relu(self.hidden(x))))


def test_state_matches_flax_nnx_dropout():
  ours = jaxdrop.nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=0))
  theirs = nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=0))
  a, b = nnx.state(ours), nnx.state(theirs)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  as_data = lambda v: jax.random.key_data(v) if jnp.issubdtype(v.dtype, jax.dtypes.prng_key) else v  # noqa: E731
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(as_data(x), as_data(y))


def test_train_eval_and_view_switch_dropout():
  model = Net(nnx.Rngs(params=0, dropout=1))
  x = jnp.ones((4, 8))
  model.eval()
  a = model(x)
  np.testing.assert_array_equal(a, model(x))
  model.train()
  assert not np.array_equal(model(x), model(x))
  view = nnx.view(model, deterministic=True)
  np.testing.assert_array_equal(view(x), a)


def test_inside_a_real_model_trains_under_nnx_jit():
  model = Net(nnx.Rngs(params=0, dropout=1))
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
