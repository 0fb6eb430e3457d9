"""Tests of jaxdrop.mc: Monte Carlo dropout sampling and uncertainty."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdrop

KEY = jax.random.key(0)
# Test data from NumPy's generator: jax.random would compile for each shape.
RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.standard_normal((6, 8), np.float32))
W = jnp.asarray(RNG.standard_normal((8, 5), np.float32))


def noisy_logits(key, x):
  """A small stochastic classifier: dropout, then a fixed linear map."""
  return jaxdrop.dropout(key, x, 0.5) @ W


# Jitted once per (fn, num_samples, chunk_size): compiling the whole program is
# much cheaper than running dozens of ops eagerly, each compiled on its own.
STATIC = {"static_argnums": (0,), "static_argnames": ("num_samples", "chunk_size")}
sample = jax.jit(jaxdrop.mc.sample, **STATIC)
predict = jax.jit(jaxdrop.mc.predict, **STATIC)
ece = jax.jit(jaxdrop.mc.expected_calibration_error, static_argnames=("num_bins",))


def reference(logits):
  """The four quantities of Prediction in float64 NumPy, from the samples."""
  logits = np.asarray(logits, np.float64)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  probs = p.mean(0)
  entropy = -(probs * np.log(probs)).sum(-1)
  expected_entropy = (-(p * np.log(p)).sum(-1)).mean(0)
  return probs, entropy, expected_entropy, entropy - expected_entropy


def test_sample_stacks_one_call_per_split_key():
  samples = sample(noisy_logits, KEY, X, num_samples=4)
  chex.assert_shape(samples, (4, 6, 5))
  keys = jax.random.split(KEY, 4)
  for i in range(4):
    np.testing.assert_allclose(samples[i], noisy_logits(keys[i], X), rtol=1e-6, atol=1e-6)
  masks = sample(lambda k, x: jaxdrop.dropout(k, x, 0.5), KEY, X, num_samples=4)
  np.testing.assert_array_equal(masks[2], jaxdrop.dropout(keys[2], X, 0.5))


def test_predict_matches_a_float64_reference_and_its_inequalities():
  pred = predict(noisy_logits, KEY, X, num_samples=16)
  chex.assert_shape(pred.probs, (6, 5))
  chex.assert_shape([pred.entropy, pred.expected_entropy, pred.mutual_information], (6,))
  chex.assert_type(list(pred), jnp.float32)
  logits = sample(noisy_logits, KEY, X, num_samples=16)
  for got, want in zip(pred, reference(logits)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(pred.probs.sum(-1), 1.0, rtol=1e-6)
  tol = 1e-6  # float32 rounding of quantities of order log(5)
  assert np.all(pred.expected_entropy >= 0)
  assert np.all(pred.mutual_information >= 0)
  assert np.all(pred.entropy >= pred.expected_entropy - tol)
  assert np.all(pred.entropy <= np.log(5) + tol)
  np.testing.assert_allclose(
      pred.mutual_information, pred.entropy - pred.expected_entropy, atol=1e-5
  )
  assert np.all(pred.mutual_information > 0)  # the passes disagree


@pytest.mark.parametrize("chunk_size", [4, 5, 50])
def test_chunked_equals_unchunked(chunk_size):
  # 12 samples: 4 divides it, 5 does not, 50 exceeds it.
  full = sample(noisy_logits, KEY, X, num_samples=12)
  chunked = sample(noisy_logits, KEY, X, num_samples=12, chunk_size=chunk_size)
  np.testing.assert_allclose(chunked, full, rtol=1e-6, atol=1e-6)


def test_predict_with_a_chunk_size_not_dividing_num_samples():
  a = predict(noisy_logits, KEY, X, num_samples=12)
  b = predict(noisy_logits, KEY, X, num_samples=12, chunk_size=5)
  chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-6)


def test_deterministic_fn_has_zero_mutual_information():
  for num_samples in (1, 7):
    pred = predict(lambda k, x: x @ W, KEY, X, num_samples=num_samples)
    np.testing.assert_array_equal(pred.mutual_information, 0.0)
    np.testing.assert_allclose(pred.entropy, pred.expected_entropy, atol=1e-6)
    np.testing.assert_allclose(pred.probs, jax.nn.softmax(X @ W), rtol=1e-6)


def test_masked_class_with_minus_infinity_logits():
  logits = lambda k, x: noisy_logits(k, x).at[:, 0].set(-jnp.inf)  # noqa: E731
  pred = predict(logits, KEY, X, num_samples=8)
  np.testing.assert_array_equal(pred.probs[:, 0], 0.0)
  assert all(np.all(np.isfinite(field)) for field in pred)


def test_predict_works_under_jit():
  fn = jax.jit(lambda key, x: jaxdrop.mc.predict(noisy_logits, key, x, num_samples=8))
  eager = jaxdrop.mc.predict(noisy_logits, KEY, X, num_samples=8)
  chex.assert_trees_all_close(fn(KEY, X), eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"num_samples": 0}, ValueError),
        ({"num_samples": -3}, ValueError),
        ({"num_samples": 2.0}, TypeError),
        ({"num_samples": True}, TypeError),
        ({"num_samples": 4, "chunk_size": 0}, ValueError),
        ({"num_samples": 4, "chunk_size": 1.5}, TypeError),
    ],
)
def test_bad_num_samples_or_chunk_size(kwargs, error):
  with pytest.raises(error, match="num_samples|chunk_size"):
    jaxdrop.mc.sample(noisy_logits, KEY, X, **kwargs)
  with pytest.raises(error, match="num_samples|chunk_size"):
    jaxdrop.mc.predict(noisy_logits, KEY, X, **kwargs)


@pytest.mark.parametrize(
    "fn, error, match",
    [
        (lambda k, x: {"logits": noisy_logits(k, x)}, TypeError, r"one array of logits.*\['logits'\]"),
        (lambda k, x: (noisy_logits(k, x), x), TypeError, r"one array of logits.*\[0\]"),
        (lambda k, x: noisy_logits(k, x).sum(), ValueError, "class axis"),
        (lambda k, x: jnp.argmax(noisy_logits(k, x), -1, keepdims=True), TypeError, "floating"),
    ],
    ids=["dict", "tuple", "scalar", "integer"],
)
def test_predict_says_what_fn_must_return(fn, error, match):
  with pytest.raises(error, match=match):
    jaxdrop.mc.predict(fn, KEY, X, num_samples=2)
  # sample takes any pytree.
  jax.tree.map(lambda leaf: chex.assert_axis_dimension(leaf, 0, 2), jaxdrop.mc.sample(fn, KEY, X, num_samples=2))


@pytest.mark.parametrize(
    "key, error", [(0, TypeError), (None, ValueError), (jax.random.split(KEY, 2), ValueError)],
    ids=["int", "None", "batch"],
)
def test_key_that_is_not_one_key_is_a_named_error(key, error):
  for fn in (jaxdrop.mc.sample, jaxdrop.mc.predict):
    with pytest.raises(error, match="key"):
      fn(noisy_logits, key, X, num_samples=2)


def test_expected_calibration_error_hand_computed():
  # Confidences 0.9, 0.55, 0.7, 0.51 in 5 bins of width 0.2:
  #   (0.8, 1]: 0.9, correct         -> |1 - 0.9|   = 0.1, 1 example
  #   (0.6, 0.8]: 0.7, correct       -> |1 - 0.7|   = 0.3, 1 example
  #   (0.4, 0.6]: 0.55 wrong, 0.51 correct -> |0.5 - 0.53| = 0.03, 2 examples
  # ECE = (0.1 + 0.3 + 2 * 0.03) / 4 = 0.115.
  probs = jnp.array([[0.9, 0.1], [0.55, 0.45], [0.3, 0.7], [0.51, 0.49]])
  labels = jnp.array([0, 1, 1, 0])
  np.testing.assert_allclose(ece(probs, labels, num_bins=5), 0.115, rtol=1e-5)
  # Perfectly confident and right: 0.
  exact = ece(jnp.eye(3), jnp.arange(3))
  np.testing.assert_allclose(exact, 0.0, atol=1e-7)


def test_expected_calibration_error_matches_a_loop_over_bins():
  probs = jax.nn.softmax(3 * jnp.asarray(RNG.standard_normal((200, 4), np.float32)))
  labels = jnp.asarray(RNG.integers(0, 4, 200))
  conf = np.asarray(probs, np.float64).max(-1)
  correct = np.asarray(probs).argmax(-1) == np.asarray(labels)
  edges = np.linspace(0, 1, 16)
  want = 0.0
  for lo, hi in zip(edges[:-1], edges[1:]):
    in_bin = (conf > lo) & (conf <= hi)
    if in_bin.any():
      want += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
  got = ece(probs, labels)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_expected_calibration_error_errors():
  with pytest.raises(ValueError, match="probs"):
    jaxdrop.mc.expected_calibration_error(jnp.ones(3), jnp.zeros(3, int))
  with pytest.raises(ValueError, match="labels"):
    jaxdrop.mc.expected_calibration_error(jnp.ones((3, 2)), jnp.zeros(4, int))
  with pytest.raises(ValueError, match="num_bins"):
    jaxdrop.mc.expected_calibration_error(jnp.ones((3, 2)), jnp.zeros(3, int), num_bins=0)
  with pytest.raises(TypeError, match="num_bins"):
    jaxdrop.mc.expected_calibration_error(jnp.ones((3, 2)), jnp.zeros(3, int), num_bins=2.0)


def test_linen_model_with_a_dropout_stream():
  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
      x = nn.relu(nn.Dense(16)(x))
      x = jaxdrop.linen.Dropout(0.5, deterministic=not train)(x)
      return nn.Dense(3)(x)

  model = MLP()
  variables = model.init(jax.random.key(3), X, train=False)
  fn = lambda k, x: model.apply(variables, x, train=True, rngs={"dropout": k})  # noqa: E731
  pred = predict(fn, KEY, X, num_samples=10, chunk_size=4)
  chex.assert_shape(pred.probs, (6, 3))
  np.testing.assert_allclose(pred.probs.sum(-1), 1.0, rtol=1e-6)
  assert np.all(pred.mutual_information > 0)
  # In evaluation mode every pass is the same: no epistemic uncertainty.
  eval_fn = lambda k, x: model.apply(variables, x, train=False)  # noqa: E731
  pred = predict(eval_fn, KEY, X, num_samples=4)
  np.testing.assert_array_equal(pred.mutual_information, 0.0)
