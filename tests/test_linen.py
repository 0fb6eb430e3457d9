"""Tests of jaxdrop.linen.Dropout: a drop-in for flax.linen.Dropout."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdrop


def apply(module, x, **kwargs):
  return module.apply({}, x, **kwargs)


def test_equals_the_function_for_the_same_key():
  x = jnp.arange(1.0, 65.0).reshape(8, 8)
  key = jax.random.key(0)
  layer = jaxdrop.linen.Dropout(0.3, broadcast_dims=(0,))
  np.testing.assert_array_equal(
      apply(layer, x, deterministic=False, rng=key),
      jaxdrop.dropout(key, x, 0.3, broadcast_dims=(0,)),
  )


def test_key_comes_from_the_dropout_stream_like_flax():
  # Same stream key and module path give flax's make_rng key, so the mask
  # is jaxdrop's threshold of the very key flax's Dropout would draw.
  x = jnp.ones((4, 16))
  rngs = {"dropout": jax.random.key(1)}
  ours = apply(jaxdrop.linen.Dropout(0.5), x, deterministic=False, rngs=rngs)
  class Probe(nn.Module):
    @nn.compact
    def __call__(self):
      return self.make_rng("dropout")

  key = Probe().apply({}, rngs=rngs)
  np.testing.assert_array_equal(ours, jaxdrop.dropout(key, x, 0.5))


@pytest.mark.parametrize(
    "field, call, active",
    [(None, False, True), (None, True, False), (False, None, True), (True, None, False)],
)
def test_deterministic_merge_rules(field, call, active):
  x = jnp.ones(32)
  layer = jaxdrop.linen.Dropout(0.5, deterministic=field)
  y = apply(layer, x, deterministic=call, rngs={"dropout": jax.random.key(0)})
  assert bool(jnp.any(y != x)) == active


def test_deterministic_given_twice_or_never_is_an_error_as_in_flax():
  x = jnp.ones(3)
  with pytest.raises(ValueError, match="deterministic"):
    apply(jaxdrop.linen.Dropout(0.5, deterministic=True), x, deterministic=False)
  with pytest.raises(ValueError, match="deterministic"):
    apply(jaxdrop.linen.Dropout(0.5), x)


def test_missing_dropout_stream_is_an_error_not_a_params_fallback():
  layer = jaxdrop.linen.Dropout(0.5)
  with pytest.raises(ValueError, match=r"(?s)no 'dropout' rng stream.*rngs=\{'dropout': key\}"):
    apply(layer, jnp.ones(3), deterministic=False, rngs={"params": jax.random.key(0)})
  # flax silently uses 'params' here.
  nn.Dropout(0.5).apply({}, jnp.ones(3), deterministic=False, rngs={"params": jax.random.key(0)})


def test_custom_rng_collection():
  layer = jaxdrop.linen.Dropout(0.5, rng_collection="noise")
  with pytest.raises(ValueError, match="'noise'"):
    apply(layer, jnp.ones(3), deterministic=False, rngs={"dropout": jax.random.key(0)})
  y = apply(layer, jnp.ones(64), deterministic=False, rngs={"noise": jax.random.key(0)})
  assert bool(jnp.any(y == 0))


def test_rate_zero_and_deterministic_need_no_rng_and_rate_one_gives_zeros():
  x = jnp.arange(4.0)
  assert apply(jaxdrop.linen.Dropout(0.0), x, deterministic=False) is x
  np.testing.assert_array_equal(apply(jaxdrop.linen.Dropout(0.5), x, deterministic=True), x)
  # As in flax, rate 1 needs no rng either: nothing random happens.
  zeros = apply(jaxdrop.linen.Dropout(1.0), x, deterministic=False)
  np.testing.assert_array_equal(zeros, jnp.zeros(4))
  np.testing.assert_array_equal(zeros, nn.Dropout(1.0).apply({}, x, deterministic=False))


def test_bad_rate_fails_at_construction():
  with pytest.raises(ValueError, match="rate=1.5"):
    jaxdrop.linen.Dropout(1.5)


def test_traced_rate_field_inside_jit():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, rate):
      return jaxdrop.linen.Dropout(rate, deterministic=False)(x)

  x = jnp.ones(128)
  f = jax.jit(lambda rate: Net().apply({}, x, rate, rngs={"dropout": jax.random.key(0)}))
  np.testing.assert_array_equal(f(jnp.float32(0.0)), x)
  np.testing.assert_array_equal(f(jnp.float32(1.0)), jnp.zeros(128))


class MLP(nn.Module):
  dropout: type = jaxdrop.linen.Dropout

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.relu(nn.Dense(32)(x))
    x = self.dropout(0.5, deterministic=not train)(x)
    return nn.Dense(3)(x)


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
  # Evaluation is deterministic and needs no dropout rng.
  a = model.apply(params, x, train=False)
  np.testing.assert_array_equal(a, model.apply(params, x, train=False))


def test_drops_into_a_model_written_for_flax_dropout():
  # Same params, same evaluation output, and in training the same kept
  # fraction statistics; only the mask's bits differ.
  x = jax.random.normal(jax.random.key(0), (64, 8))
  ours, theirs = MLP(), MLP(dropout=nn.Dropout)
  params = theirs.init(jax.random.key(1), x, train=False)
  np.testing.assert_array_equal(
      ours.apply(params, x, train=False), theirs.apply(params, x, train=False)
  )
  rngs = {"dropout": jax.random.key(2)}
  a = ours.apply(params, x, train=True, rngs=rngs)
  b = theirs.apply(params, x, train=True, rngs=rngs)
  assert a.shape == b.shape and not np.array_equal(a, b)
