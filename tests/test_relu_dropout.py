"""relu_dropout: the values and gradient of dropout(key, relu(x)), keeping only y."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdrop

KEY = jax.random.key(11)


def _pre_activation(dtype, shape=(64, 48)):
  x = jax.random.normal(jax.random.key(1), shape, jnp.float32).astype(dtype)
  # The places where relu's gradient and the sign of the output could
  # disagree: zeros of both signs, the smallest subnormal of the dtype, NaN
  # and infinities.
  tiny = jnp.finfo(dtype).smallest_subnormal
  special = jnp.array([0.0, -0.0, tiny, -tiny, jnp.nan, jnp.inf, -jnp.inf, 1.0], dtype)
  return x.at[:8, :8].set(jnp.broadcast_to(special, (8, 8)))


def _composition(x, rate, **options):
  return jaxdrop.dropout(KEY, jax.nn.relu(x), rate, **options)


def _fused(x, rate, **options):
  return jaxdrop.relu_dropout(KEY, x, rate, **options)


def _value_and_grad(fn, x, rate, options):
  """(y, x_bar) for a fixed cotangent; a Python float rate stays static."""
  g = jax.random.normal(jax.random.key(2), x.shape, jnp.float32).astype(x.dtype)

  def run(x, rate):
    y, vjp = jax.vjp(lambda x: fn(x, rate, **options), x)
    return y, vjp(g)[0]

  if isinstance(rate, float):
    return jax.jit(lambda x: run(x, rate))(x)
  return jax.jit(run)(x, rate)


CASES = {
    "f32": dict(dtype=jnp.float32, rate=0.3, options={}),
    "bf16": dict(dtype=jnp.bfloat16, rate=0.3, options={}),
    "f16": dict(dtype=jnp.float16, rate=0.3, options={}),
    "traced rate": dict(dtype=jnp.float32, rate=jnp.float32(0.3), options={}),
    "bits16": dict(dtype=jnp.float32, rate=0.3, options=dict(bits=16)),
    "broadcast_dims": dict(dtype=jnp.float32, rate=0.5, options=dict(broadcast_dims=(0,))),
    "invalid traced rate": dict(dtype=jnp.float32, rate=jnp.float32(1.5), options={}),
}


@pytest.mark.parametrize("name", CASES)
def test_values_and_gradient_equal_the_composition(name):
  case = CASES[name]
  x = _pre_activation(case["dtype"])
  rate = case["rate"]
  got = _value_and_grad(_fused, x, rate, case["options"])
  want = _value_and_grad(_composition, x, rate, case["options"])
  y, x_bar = (np.asarray(a, np.float32) for a in got)
  np.testing.assert_array_equal(y, np.asarray(want[0], np.float32))
  if name == "invalid traced rate":
    # All NaN; the composition's gradient is NaN only where x > 0, and y,
    # all NaN, cannot tell where that was.
    assert np.all(np.isnan(y)) and np.all(np.isnan(x_bar))
  else:
    np.testing.assert_array_equal(x_bar, np.asarray(want[1], np.float32))
    assert 0 < np.mean(y > 0) < 0.5  # kept positives and zeros both occur


def test_backward_keeps_only_the_output():
  x = _pre_activation(jnp.float32)
  y, vjp = jax.vjp(lambda x: jaxdrop.relu_dropout(KEY, x, 0.3), x)
  large = [leaf for leaf in jax.tree.leaves(vjp) if leaf.size == x.size]
  assert len(large) == 1
  np.testing.assert_array_equal(np.asarray(large[0]), np.asarray(y))
  # The composition keeps more: a relu mask and its own copy of the output.
  _, vjp = jax.vjp(lambda x: _composition(x, 0.3), x)
  assert len([leaf for leaf in jax.tree.leaves(vjp) if leaf.size == x.size]) > 1


def test_static_rates_and_deterministic():
  x = _pre_activation(jnp.float32)
  relu = np.asarray(jax.nn.relu(x))
  np.testing.assert_array_equal(np.asarray(jaxdrop.relu_dropout(None, x, 0.0)), relu)
  np.testing.assert_array_equal(
      np.asarray(jaxdrop.relu_dropout(None, x, 0.7, deterministic=True)), relu)
  np.testing.assert_array_equal(np.asarray(jaxdrop.relu_dropout(None, x, 1.0)), 0)
  grad = jax.grad(lambda x: jnp.sum(jaxdrop.relu_dropout(None, x, 1.0)))(x)
  np.testing.assert_array_equal(np.asarray(grad), 0)


def test_under_vmap_over_keys():
  x = _pre_activation(jnp.float32, (8, 16))
  keys = jax.random.split(KEY, 5)
  for fn in (lambda k, x: jaxdrop.relu_dropout(k, x, 0.5),
             jax.grad(lambda k, x: jnp.sum(jaxdrop.relu_dropout(k, x, 0.5) * 3), argnums=1)):
    got = jax.vmap(fn, in_axes=(0, None))(keys, x)
    want = jnp.stack([fn(k, x) for k in keys])
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  composed = jax.grad(lambda x: jnp.sum(jaxdrop.dropout(keys[0], jax.nn.relu(x), 0.5) * 3))(x)
  np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(composed))


@pytest.mark.parametrize(
    "args, kwargs, error, words",
    [
        ((KEY, jnp.arange(4), 0.5), {}, TypeError, "x.dtype=int32"),
        ((KEY, jnp.ones(4), 1.5), {}, ValueError, "rate=1.5"),
        ((None, jnp.ones(4), 0.5), {}, ValueError, "key"),
        ((KEY, jnp.ones(4), 0.5), dict(bits=8), ValueError, "bits=8"),
        ((KEY, jnp.ones(4), 0.5), dict(broadcast_dims=(3,)), ValueError, "broadcast_dims"),
    ],
)
def test_bad_arguments_are_named(args, kwargs, error, words):
  with pytest.raises(error, match=words):
    jaxdrop.relu_dropout(*args, **kwargs)


def test_forward_mode_is_refused_by_jax():
  x = _pre_activation(jnp.float32)
  with pytest.raises(TypeError, match="custom_vjp"):
    jax.jvp(lambda x: jaxdrop.relu_dropout(KEY, x, 0.3), (x,), (x,))
