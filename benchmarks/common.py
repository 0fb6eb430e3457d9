"""What the benchmark scripts share: the timer, the train-step models, run metadata, results.

The timer (``interleaved``) is the one method every table uses:

* each function is jitted by the caller, then compiled and run once here
  (compilation is never timed);
* one *sample* of a function is ``calls`` back-to-back calls, where ``calls``
  makes a sample last about ``min_sample_s`` (one call for anything slower),
  and the sample waits for every result (``jax.block_until_ready``); the
  outputs are freed after the clock stops (freeing a large output costs
  milliseconds on CPU) and before the next sample starts;
* before each sample the function runs once untimed, so the sample starts
  from that function's own steady state (its buffers allocated and faulted
  in, its code in cache) and not from whatever its neighbour left behind;
* the functions take turns, one sample each, starting from a rotating
  position, so that a slow phase of a shared machine hits all of them;
* the median of the samples is reported.

``alone`` times one function by itself, one call per sample: the check that
the interleaved timer measures each function as it runs by itself
(``tests/test_bench.py``).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform as platform_lib
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.ad_checkpoint import checkpoint_name

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))  # Run from a checkout without installing.

import jaxdrop  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


# ----------------------------------------------------------------------------
# Timing.


def _sample(fn: Callable, args: tuple, calls: int) -> float:
  """Seconds per call of `calls` calls, after one untimed call.

  The outputs are kept until the clock stops: freeing a large one (unmapping its pages)
  costs milliseconds on CPU, and would be timed for some calls and not others.
  """
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  outs = [fn(*args) for _ in range(calls)]  # Dispatch is asynchronous: calls queue up.
  jax.block_until_ready(outs)
  seconds = time.perf_counter() - start
  del outs  # Freed here, untimed.
  return seconds / calls


def interleaved(fns: dict[str, Callable], args: tuple, repeats: int,
                min_sample_s: float) -> dict[str, list[float]]:
  """Per function: `repeats` samples, in seconds per call, taken in turns (module docstring)."""
  calls = {}
  for name, fn in fns.items():
    once = _sample(fn, args, 1)  # Its first call compiles it.
    calls[name] = max(1, math.ceil(min_sample_s / max(once, 1e-9)))
  names = list(fns)
  samples = {name: [] for name in names}
  for repeat in range(repeats):
    for i in range(len(names)):
      name = names[(repeat + i) % len(names)]
      samples[name].append(_sample(fns[name], args, calls[name]))
  return samples


def alone(fn: Callable, args: tuple, repeats: int) -> list[float]:
  """`repeats` samples of `fn` by itself, one waited-for call each, in seconds."""
  jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    samples.append(time.perf_counter() - start)
    del out  # Freed after the clock stops, as in `interleaved`.
  return samples


def median_ms(samples: list[float]) -> float:
  return float(np.median(samples)) * 1e3


def temp_bytes(fn: Callable, args: tuple) -> int:
  """The compiled temp memory of ``jax.jit(fn)(*args)``."""
  return int(jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes)


# ----------------------------------------------------------------------------
# The train-step models.


def drop(dropout, rate: float, x: jax.Array, train: bool) -> jax.Array:
  """``x`` through ``dropout`` (a linen Dropout class, or None) in the calling module."""
  if dropout is None or not train:
    return x
  return dropout(rate, deterministic=False)(x)


RELU_DROPOUT = "jaxdrop.relu_dropout"


class MLP(nn.Module):
  # A linen Dropout class, RELU_DROPOUT (jaxdrop.relu_dropout in place of relu
  # and dropout), or None.
  dropout: Callable[..., nn.Module] | str | None
  rate: float = 0.1
  widths: tuple[int, ...] = (1024, 1024)
  # A jax.checkpoint policy for the loss, or None for no checkpointing. The
  # dense outputs are named "dense" so that names-based policies can keep them.
  remat_policy: Callable[..., Any] | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for width in self.widths:
      h = checkpoint_name(nn.Dense(width)(x), "dense")
      if self.dropout == RELU_DROPOUT:
        x = jaxdrop.relu_dropout(self.make_rng("dropout") if train else None, h, self.rate,
                                 deterministic=not train)
      else:
        x = drop(self.dropout, self.rate, nn.relu(h), train)
    return nn.Dense(10)(x)


class Block(nn.Module):
  """Pre-LN transformer blocks: attention, then a GELU MLP, each added back through dropout.

  ``bench.py`` varies the elementwise ``dropout``; ``bench_attention.py``
  varies ``attention_fn`` with attention dropout on.
  """

  heads: int
  rate: float = 0.1
  # The elementwise dropout: a linen Dropout class, or None.
  dropout: Callable[..., nn.Module] | None = nn.Dropout
  attention_fn: Callable[..., jax.Array] = nn.dot_product_attention
  attention_dropout: bool = False  # also drop attention weights, one mask per example and head
  hidden_dropout: bool = True  # also drop the MLP's hidden activation
  causal: bool = False
  depth: int = 1
  dtype: Any = None  # the computation dtype; parameters stay float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    width = x.shape[-1]
    attend = train and self.attention_dropout
    mask = nn.make_causal_mask(x[..., 0]) if self.causal else None
    for _ in range(self.depth):
      h = nn.MultiHeadDotProductAttention(
          self.heads, dtype=self.dtype, dropout_rate=self.rate if attend else 0.0,
          broadcast_dropout=False, attention_fn=self.attention_fn, deterministic=not attend,
      )(nn.LayerNorm(dtype=self.dtype)(x), mask=mask)
      x = x + drop(self.dropout, self.rate, h, train)
      h = nn.gelu(nn.Dense(4 * width, dtype=self.dtype)(nn.LayerNorm(dtype=self.dtype)(x)))
      if self.hidden_dropout:
        h = drop(self.dropout, self.rate, h, train)
      x = x + drop(self.dropout, self.rate, nn.Dense(width, dtype=self.dtype)(h), train)
    return x


def classification_loss(model, params, batch, key):
  images, labels = batch
  logits = model.apply({"params": params}, images, train=True, rngs={"dropout": key})
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def regression_loss(model, params, batch, key):
  inputs, targets = batch
  out = model.apply({"params": params}, inputs, train=True, rngs={"dropout": key})
  return jnp.mean(jnp.square(out.astype(jnp.float32) - targets))


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    loss_of: Callable = classification_loss) -> Callable:
  """A donated, jitted Adam step; ``loss_of(model, params, batch, key)`` is the loss."""

  def train_step(params, opt_state, batch, key):
    def loss_fn(params):
      return loss_of(model, params, batch, key)

    if getattr(model, "remat_policy", None) is not None:
      loss_fn = jax.checkpoint(loss_fn, policy=model.remat_policy)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(train_step, donate_argnums=(0, 1))


class DonatedStep:
  """A donated train step as a function of no state: each call feeds the last call's outputs.

  Lets ``interleaved`` time train steps like any other function.
  """

  def __init__(self, step: Callable, params, opt_state, batch, key):
    self.step, self.state, self.rest = step, [params, opt_state], (batch, key)

  def __call__(self):
    self.state[0], self.state[1], loss = self.step(*self.state, *self.rest)
    return loss


# ----------------------------------------------------------------------------
# Run metadata and results.


def _version(dist: str) -> str | None:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return None


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform_lib.processor() or platform_lib.machine()


def _git_commit() -> str | None:
  try:
    out = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                         capture_output=True, text=True, timeout=10)
    return out.stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    return None


def metadata() -> dict[str, Any]:
  """Where and how a run ran: date, command, device, host, versions, commit."""
  return dict(
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      command="python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
      backend=jax.default_backend(),
      device=jax.devices()[0].device_kind,
      device_count=jax.device_count(),
      cpu=_cpu_model(),
      cpu_count=os.cpu_count(),
      load_average=[round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
      python=platform_lib.python_version(),
      versions={d: _version(d) for d in (
          "jax", "jaxlib", "flax", "optax", "equinox", "dm-haiku", "numpy")},
      commit=_git_commit(),
  )


def results_path(json_arg: str | None, name: str, write_default: bool) -> Path | None:
  """Where a run writes its JSON: ``--json``, else ``benchmarks/results/<name>-<backend>.json``
  for a full run (`write_default`), else nowhere."""
  if json_arg:
    return Path(json_arg)
  if write_default:
    return RESULTS / f"{name}-{jax.default_backend()}.json"
  return None


def write_json(path: Path | None, results: dict) -> None:
  """Writes `results` to `path` (if any), whole: written beside, then renamed."""
  if path is None:
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_suffix(".tmp")
  partial.write_text(json.dumps(results, indent=1, default=str) + "\n")
  os.replace(partial, path)
