"""Monte Carlo dropout: predictions and uncertainty from stochastic passes.

Keeping dropout on at test time and averaging ``num_samples`` passes
approximates Bayesian model averaging (Gal & Ghahramani 2016). The spread of
the passes measures the model's uncertainty: the mutual information between
the prediction and the sampled sub-network (BALD; Houlsby et al. 2011) is
high where the passes disagree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxdrop import _validate

__all__ = ["Prediction", "expected_calibration_error", "predict", "sample"]


class Prediction(NamedTuple):
  """What :func:`predict` returns; every field has the batch shape of ``fn``.

  Attributes:
    probs: mean of the per-sample softmax probabilities, shape ``(..., C)``.
    entropy: entropy of ``probs`` (total uncertainty), in nats.
    expected_entropy: mean of the per-sample entropies (aleatoric part).
    mutual_information: ``entropy - expected_entropy`` (epistemic part, BALD).
  """

  probs: jax.Array
  entropy: jax.Array
  expected_entropy: jax.Array
  mutual_information: jax.Array


def sample(
    fn: Callable[..., Any],
    key: jax.Array,
    *args: Any,
    num_samples: int,
    chunk_size: int | None = None,
) -> Any:
  """Stacks ``fn(k, *args)`` for ``num_samples`` keys split from ``key``.

  Sample ``i`` uses ``jax.random.split(key, num_samples)[i]``, so the result
  does not depend on ``chunk_size``, which only bounds how many samples run
  at once (and so the memory).

  Args:
    fn: a function of a key and ``args``, returning an array or a pytree.
    key: a PRNG key.
    *args: passed to every call of ``fn``, unbatched.
    num_samples: how many stochastic passes.
    chunk_size: at most this many passes are vmapped together; None for all.

  Returns:
    ``fn``'s outputs stacked on a new leading axis of size ``num_samples``.

  Raises:
    TypeError: ``key`` is not a PRNG key; a count is not an int.
    ValueError: a count below 1; ``key`` is a batch of keys.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxdrop
    >>> fn = lambda k, x: jaxdrop.dropout(k, x, 0.5)
    >>> jaxdrop.mc.sample(fn, jax.random.key(0), jnp.ones(3), num_samples=4).shape
    (4, 3)
  """
  num_samples = _validate.check_int(num_samples, "num_samples", minimum=1)
  if chunk_size is not None:
    chunk_size = _validate.check_int(chunk_size, "chunk_size", minimum=1)
  _validate.typed_key(key)  # A named error for anything that is not one key.
  keys = jax.random.split(key, num_samples)
  one = lambda k: fn(k, *args)  # noqa: E731
  if chunk_size is None or chunk_size >= num_samples:
    return jax.vmap(one)(keys)
  return jax.lax.map(one, keys, batch_size=chunk_size)


def predict(
    fn: Callable[..., jax.Array],
    key: jax.Array,
    *args: Any,
    num_samples: int,
    chunk_size: int | None = None,
) -> Prediction:
  """MC-dropout prediction for a classifier whose ``fn`` returns logits.

  Args:
    fn: ``fn(key, *args)`` returns one array of logits with classes on the
      last axis, using ``key`` for its dropout masks. For a model that returns
      more (a dict, or ``(logits, aux)``), pass a function that picks the
      logits, or use :func:`sample`, which takes any pytree.
    key: a PRNG key.
    *args: passed to ``fn``.
    num_samples: number of stochastic passes to average.
    chunk_size: bounds how many passes run at once; see :func:`sample`.

  Returns:
    A :class:`Prediction`: mean probabilities, their entropy, the expected
    entropy and the mutual information (``entropy - expected_entropy``).

  Raises:
    TypeError: ``fn`` returns something other than one floating array; as
      for :func:`sample`.
    ValueError: ``fn`` returns a scalar (no class axis); as for :func:`sample`.

  With a Flax linen model, pass the key as the dropout stream::

    fn = lambda k, x: model.apply(variables, x, train=True, rngs={"dropout": k})
    pred = jaxdrop.mc.predict(fn, key, x, num_samples=50)

  With an NNX model, forward a per-call key to its dropout layers (they
  accept ``rngs=`` a key at call time)::

    class Net(nnx.Module):
      ...
      def __call__(self, x, *, rngs=None):
        return self.out(self.dropout(self.hidden(x), rngs=rngs))

    model.train()
    pred = jaxdrop.mc.predict(lambda k, x: model(x, rngs=k), key, x, num_samples=50)

  Examples:
    >>> import jax, jax.numpy as jnp, jaxdrop
    >>> logits = jnp.array([[2.0, 0.0, -1.0]])
    >>> fn = lambda k, x: jaxdrop.dropout(k, x, 0.5)
    >>> pred = jaxdrop.mc.predict(fn, jax.random.key(0), logits, num_samples=64)
    >>> pred.probs.shape, bool(pred.mutual_information[0] > 0)
    ((1, 3), True)
  """
  logits = sample(fn, key, *args, num_samples=num_samples, chunk_size=chunk_size)
  _check_logits(logits)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  p = jnp.exp(log_p)
  probs = jnp.mean(p, axis=0)
  # log(probs) as a log-mean-exp shifted by the max: identical samples (a
  # deterministic fn) then give log_mean == log_p exactly, so MI is exactly 0;
  # log(mean(exp(log_p))) left ~1e-7 of exp/log rounding.
  top = jnp.max(log_p, axis=0)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  log_mean = top + jnp.log(jnp.mean(jnp.exp(log_p - top), axis=0))
  entropy = -jnp.sum(jax.scipy.special.xlogy(probs, probs), axis=-1)
  # 0 * log 0 = 0: a class masked with -inf logits must not make it NaN.
  expected_entropy = jnp.mean(
      -jnp.sum(jnp.where(p > 0, p * log_p, 0.0), axis=-1), axis=0
  )
  # MI as the mean KL(p_s || mean p): the same quantity, but without the
  # cancellation of two large entropies. Jensen makes it >= 0; rounding can
  # leave -1e-8, so it is floored at 0.
  kl = jnp.sum(jnp.where(p > 0, p * (log_p - log_mean), 0.0), axis=-1)
  mutual_information = jnp.maximum(jnp.mean(kl, axis=0), 0.0)
  return Prediction(probs, entropy, expected_entropy, mutual_information)


def _check_logits(logits: Any) -> None:
  """Raises unless ``fn`` returned one floating array with a class axis."""
  if not isinstance(logits, jax.Array):
    structure = jax.tree.structure(jax.tree.map(lambda leaf: 0, logits))
    raise TypeError(
        "predict needs fn to return one array of logits (..., num_classes), got "
        f"a pytree {structure}. Pick the logits in fn, e.g. "
        "lambda k, *args: fn(k, *args)['logits'] or fn(k, *args)[0], or use "
        "jaxdrop.mc.sample, which stacks any pytree."
    )
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise TypeError(f"predict needs floating logits from fn, got dtype {logits.dtype}")
  if logits.ndim < 2:
    raise ValueError(
        "predict needs fn to return logits with a class axis (..., num_classes), "
        f"got a scalar of shape {logits.shape[1:]}"
    )


def expected_calibration_error(
    probs: jax.typing.ArrayLike, labels: jax.typing.ArrayLike, num_bins: int = 15
) -> jax.Array:
  """Expected calibration error with ``num_bins`` equal-width confidence bins.

  ECE = sum over bins of (fraction of examples in the bin) ×
  ``|accuracy - mean confidence|`` in the bin (Guo et al. 2017), where confidence
  is the top probability.

  Args:
    probs: probabilities, shape ``(N, C)``.
    labels: integer labels, shape ``(N,)``.
    num_bins: number of bins over (0, 1].

  Returns:
    A scalar in [0, 1].

  Examples:
    >>> import jax.numpy as jnp, jaxdrop
    >>> probs = jnp.array([[0.9, 0.1], [0.6, 0.4]])
    >>> round(float(jaxdrop.mc.expected_calibration_error(probs, jnp.array([0, 1]))), 4)
    0.35
  """
  num_bins = _validate.check_int(num_bins, "num_bins", minimum=1)
  probs = jnp.asarray(probs)
  labels = jnp.asarray(labels)
  if probs.ndim != 2 or labels.shape != probs.shape[:1]:
    raise ValueError(
        f"probs must be (N, C) and labels (N,), got probs.shape={probs.shape}, "
        f"labels.shape={labels.shape}"
    )
  confidence = jnp.max(probs, axis=-1)
  correct = (jnp.argmax(probs, axis=-1) == labels).astype(jnp.float32)
  # Bin b holds confidences in (b/B, (b+1)/B]; confidence 0 goes to bin 0.
  bins = jnp.clip(jnp.ceil(confidence * num_bins).astype(jnp.int32) - 1, 0, num_bins - 1)
  gap = jnp.zeros(num_bins).at[bins].add(correct - confidence)
  return jnp.sum(jnp.abs(gap)) / probs.shape[0]
