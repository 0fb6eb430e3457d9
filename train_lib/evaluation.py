"""Evaluation and the run's checks: weight scaling (dropout off) and MC dropout, each
jitted, giving accuracy, NLL and ECE; the keep fractions of the dropout layers, checked with
jaxdrop.checks; and the finiteness of every step's loss and gradients, checked with chex."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

import jaxdrop
from train_lib.checkpoints import saved_steps

ECE_BINS = 15


def classification_metrics(log_probs: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
  """Correct count, negative log-likelihood and ECE of class log-probabilities."""
  nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=1).mean()
  return {
      "correct": jnp.sum(jnp.argmax(log_probs, -1) == labels),
      "nll": nll,
      "ece": jaxdrop.mc.expected_calibration_error(jnp.exp(log_probs), labels, ECE_BINS),
  }


def to_floats(metrics: dict[str, jax.Array], prefix: str, n: int) -> dict[str, float]:
  """Host floats; accuracy as an exact fraction of the `n` examples."""
  return {
      f"{prefix}_acc": int(metrics["correct"]) / n,
      f"{prefix}_nll": float(metrics["nll"]),
      f"{prefix}_ece": float(metrics["ece"]),
  }


@functools.partial(jax.jit, static_argnums=0)
def eval_step(apply_fn: Callable, params, x: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
  """Weight scaling: dropout off (deterministic), the usual test-time rule."""
  logits = apply_fn({"params": params}, x, 0.0, train=False)
  return classification_metrics(jax.nn.log_softmax(logits), y)


@functools.partial(jax.jit, static_argnames="num_samples")
def mc_eval_step(state, x, y, key, num_samples: int) -> dict[str, jax.Array]:
  """MC dropout: the mean of `num_samples` passes with dropout on at `state.rate`.

  (With the early schedule too: the rate that training started with.)
  """
  fn = lambda k, x: state.apply_fn(  # noqa: E731
      {"params": state.params}, x, state.rate, train=True, rngs={"dropout": k}
  )
  prediction = jaxdrop.mc.predict(fn, key, x, num_samples=num_samples, chunk_size=10)
  log_probs = jnp.log(jnp.maximum(prediction.probs, jnp.finfo(jnp.float32).tiny))
  return classification_metrics(log_probs, y)


def evaluate(state, data: dict[str, Any]) -> dict[str, float]:
  """Train accuracy, and test accuracy, NLL and ECE, with weight scaling."""
  train = eval_step(state.apply_fn, state.params, data["x_train"], data["y_train"])
  test = eval_step(state.apply_fn, state.params, data["x_test"], data["y_test"])
  return {
      "train_acc": to_floats(train, "train", len(data["y_train"]))["train_acc"],
      **to_floats(test, "test", len(data["y_test"])),
  }


def mc_evaluate(state, data: dict[str, Any], key: jax.Array, num_samples: int) -> dict[str, Any]:
  mc = mc_eval_step(state, data["x_test"], data["y_test"], key, num_samples)
  return {"samples": num_samples, **to_floats(mc, "test", len(data["y_test"]))}


def keep_fractions(keep: dict[str, jax.Array], rate: float) -> dict[str, dict[str, Any]]:
  """Per dropout layer, from its [kept, counted] totals: the fraction kept (None if
  no step had dropout on), the count, and the distance from 1 - rate in σ."""
  out = {}
  for name, counts in keep.items():
    kept, n = (int(c) for c in np.asarray(counts))
    fraction = kept / n if n else None
    sigma = jaxdrop.checks.keep_fraction_bound(rate, n, k=1.0) if n else 0.0
    sigmas = abs(fraction - (1 - rate)) / sigma if sigma else (0.0 if n else None)
    out[name] = {"fraction": fraction, "n": n, "sigmas": sigmas}
  return out


def check_keep_fractions(keep: dict[str, jax.Array], rate: float, k: float, run: str):
  """``jaxdrop.checks.assert_keep_fraction`` on every layer's totals: within k σ of
  the binomial. Returns ``keep_fractions``."""
  fractions = keep_fractions(keep, rate)
  for layer, f in fractions.items():
    if f["n"]:
      try:
        jaxdrop.checks.assert_keep_fraction(f["fraction"], rate, f["n"], k=k)
      except AssertionError as error:
        raise AssertionError(f"{run}, dropout layer {layer!r}: {error}") from None
  return fractions


class NonFiniteError(RuntimeError):
  """The loss or the gradients stopped being finite."""


def check_finite(step: int, outputs: dict[str, Any], checkpoints: str) -> None:
  """chex.assert_tree_all_finite on a step's loss and gradients, on the host one step
  behind, overlapping the next step (``chex.chexify`` would retrace every call)."""
  try:
    chex.assert_tree_all_finite(outputs)
  except AssertionError as error:
    steps = saved_steps(checkpoints)
    last = (f"the last good one, step {steps[-1]}, is in {checkpoints}" if steps
            else "this run had saved none yet")
    raise NonFiniteError(
        f"step {step}: the loss or the gradients are NaN or Inf, so training stopped. "
        f"No checkpoint was written after it; {last}. Try a smaller --lr.\n{error}"
    ) from None
