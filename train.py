"""What does dropout do to generalization? A 1-D CNN on MNIST-1D, with and without.

  python train.py                        # CNN, dropout 0.5 beside no dropout
  python train.py --model mlp --seeds 3  # an MLP; mean ± sd over seeds 0, 1, 2
  python train.py --sweep 0.1,0.3,0.5    # test accuracy against the rate
  python train.py --help

Every invocation also trains the rate-0 baseline: same model, seed, batches and
steps; only the dropout rate differs. It ends with a table (train and test
accuracy, the generalization gap, test NLL and ECE, MC dropout beside weight
scaling, the realized keep fraction of every dropout layer) and writes
metrics.jsonl, results.json, plots and Orbax checkpoints to --workdir.

The file reads top to bottom: config, data, model, train state and steps,
evaluation, checkpoints, the training loop, the report, main.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # Before anything imports pyplot (mnist1d does).

import chex  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from flax import struct  # noqa: E402
from flax.training import train_state  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from mnist1d.data import get_dataset_args, make_dataset  # noqa: E402
from tqdm import tqdm  # noqa: E402

import jaxdrop  # noqa: E402

NUM_FEATURES = 40
NUM_CLASSES = 10
ECE_BINS = 15
KEEP_SIGMAS = 4.0  # jaxdrop.checks' default: a false alarm once in ~16,000 checks.


# ----------------------------------------------------------------------------
# Config.


# The defaults of --width, --lr and --steps for each model: the best of a
# small search on seeds 0-2 (README). Greydanus's CNN has 25 channels and his
# MLP 100 hidden units; with dropout, wider ones generalize better.
MODEL_DEFAULTS = {
    "cnn": {"width": 64, "lr": 1e-2, "steps": 6000},
    "mlp": {"width": 512, "lr": 1e-3, "steps": 20000},
}


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything a run depends on; each field is also a command-line flag.

  ``None`` for `width`, `lr` and `steps` means the model's default
  (MODEL_DEFAULTS); ``resolve()`` fills them in.
  """

  # "cnn": 3 conv layers (Greydanus 2020), dropout on the flattened features;
  # "mlp": 2 hidden layers, each followed by dropout.
  model: str = "cnn"
  # Probability to drop, for the dropout runs. Rate 0 is always trained too.
  rate: float = 0.5
  # Channels of each conv layer (cnn) or units of each hidden layer (mlp).
  width: int | None = None
  # Rates to compare instead of `rate`, e.g. (0.1, 0.3, 0.5); 0 is added.
  sweep: tuple[float, ...] = ()
  # Train seeds 0..seeds-1 and report mean ± sd; 0 means just `seed`.
  seeds: int = 0
  # The seed of a single-seed run: initialization, batch order, masks.
  seed: int = 0
  # Optimizer steps per run.
  steps: int | None = None
  # Examples per step (the global batch, split over --devices).
  batch_size: int = 100
  # Adam's learning rate.
  lr: float | None = None
  # "cosine": decayed to 0 over `steps`; "constant".
  lr_schedule: str = "cosine"
  # MC-dropout passes at test time, beside weight scaling (0: off).
  mc_samples: int = 50
  # "constant", or "early": dropout only for the first `early_fraction` of the
  # steps (Liu et al. 2023), then none.
  rate_schedule: str = "constant"
  early_fraction: float = 0.5
  # Evaluate (train and test set, weight scaling) every this many steps.
  eval_every: int = 250
  # Save an Orbax checkpoint every this many steps (and at the end).
  checkpoint_every: int = 1000
  # Output directory; "" makes a fresh one under runs/.
  workdir: str = ""
  # Continue every run from its last checkpoint in `workdir` (default: the
  # newest run directory under runs/ with the same config).
  resume: bool = False
  # Shard each batch over a mesh of this many devices (data parallel).
  devices: int = 1
  # Use the first N training / test examples (the full set is 4000 / 1000).
  train_size: int = 4000
  test_size: int = 1000
  # Show a progress bar with the live loss.
  progress: bool = True

  def resolve(self) -> Config:
    """This config with the model's defaults in place of None."""
    defaults = MODEL_DEFAULTS[self.model]
    filled = {k: v for k, v in defaults.items() if getattr(self, k) is None}
    return dataclasses.replace(self, **filled)

  @property
  def rates(self) -> tuple[float, ...]:
    """The rates trained: 0 (the baseline) first, then the dropout rates."""
    return tuple(sorted({0.0, *(self.sweep or (self.rate,))}))

  @property
  def seed_list(self) -> tuple[int, ...]:
    return tuple(range(self.seeds)) if self.seeds else (self.seed,)

  def validate(self) -> None:
    def need(ok: bool, message: str) -> None:
      if not ok:
        raise ValueError(message)

    need(self.model in ("cnn", "mlp"), f"model must be 'cnn' or 'mlp', got {self.model!r}")
    need(
        self.lr_schedule in ("cosine", "constant"),
        f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}",
    )
    need(
        self.rate_schedule in ("constant", "early"),
        f"rate_schedule must be 'constant' or 'early', got {self.rate_schedule!r}",
    )
    for rate in (self.rate, *self.sweep):
      need(0.0 <= rate < 1.0, f"dropout rates must be in [0, 1), got {rate}")
    need(
        0.0 < self.early_fraction <= 1.0,
        f"early_fraction must be in (0, 1], got {self.early_fraction}",
    )
    for name in ("steps", "batch_size", "eval_every", "checkpoint_every", "devices"):
      need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
    need(self.seeds >= 0 and self.mc_samples >= 0, "seeds and mc_samples must be >= 0")
    need(self.lr > 0, f"lr must be positive, got {self.lr}")
    need(self.width >= 1, f"width must be >= 1, got {self.width}")
    need(
        self.batch_size % self.devices == 0,
        f"batch_size={self.batch_size} must be divisible by devices={self.devices}",
    )
    need(1 <= self.train_size <= 4000, f"train_size must be in [1, 4000], got {self.train_size}")
    need(1 <= self.test_size <= 1000, f"test_size must be in [1, 1000], got {self.test_size}")

  def signature(self) -> dict[str, Any]:
    """The fields that decide the results (not where they go or how shown)."""
    ignored = ("workdir", "resume", "devices", "progress")
    return {k: v for k, v in dataclasses.asdict(self).items() if k not in ignored}


def parse_args(argv: Sequence[str] | None) -> Config:
  d = Config()
  p = argparse.ArgumentParser(
      description="Train on MNIST-1D with and without dropout; compare generalization.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  model_default = argparse.SUPPRESS  # None in Config: MODEL_DEFAULTS decides.
  rates = lambda s: tuple(float(r) for r in s.split(",") if r.strip())  # noqa: E731
  add = p.add_argument
  add("--model", choices=("mlp", "cnn"), default=d.model, help="architecture")
  add("--rate", type=float, default=d.rate,
      help="dropout rate (probability to drop); rate 0 is always trained too")
  add("--width", type=int, default=model_default,
      help="conv channels (cnn) or hidden units (mlp) (default: cnn 64, mlp 512)")
  add("--sweep", type=rates, default=d.sweep, metavar="R1,R2,...",
      help="compare these rates (and 0) instead of --rate")
  add("--seeds", type=int, default=d.seeds, metavar="N",
      help="train seeds 0..N-1 and report mean ± sd (0: just --seed)")
  add("--seed", type=int, default=d.seed, help="seed of a single-seed run")
  add("--steps", type=int, default=model_default,
      help="optimizer steps per run (default: cnn 6000, mlp 20000)")
  add("--batch-size", type=int, default=d.batch_size, help="global batch size")
  add("--lr", type=float, default=model_default,
      help="Adam learning rate (default: cnn 1e-2, mlp 1e-3)")
  add("--lr-schedule", choices=("cosine", "constant"), default=d.lr_schedule,
      help="'cosine': decayed to 0 over --steps")
  add("--mc-samples", type=int, default=d.mc_samples, metavar="K",
      help="MC-dropout passes at test time, beside weight scaling (0: off)")
  add("--rate-schedule", choices=("constant", "early"), default=d.rate_schedule,
      help="'early': dropout only for the first --early-fraction of the steps")
  add("--early-fraction", type=float, default=d.early_fraction,
      help="fraction of the steps with dropout under --rate-schedule early")
  add("--eval-every", type=int, default=d.eval_every,
      help="steps between evaluations (rows of metrics.jsonl)")
  add("--checkpoint-every", type=int, default=d.checkpoint_every,
      help="steps between Orbax checkpoints")
  add("--workdir", default=d.workdir, help="output directory (default: a fresh one under runs/)")
  add("--resume", action="store_true",
      help="continue from the last checkpoints in --workdir (default: the newest "
      "run under runs/ with the same config)")
  add("--devices", type=int, default=d.devices, metavar="N",
      help="shard each batch over N devices")
  add("--train-size", type=int, default=d.train_size, help="use the first N training examples")
  add("--test-size", type=int, default=d.test_size, help="use the first N test examples")
  add("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
  config = Config(**vars(p.parse_args(argv))).resolve()
  try:
    config.validate()
  except ValueError as error:
    p.error(str(error))
  return config


# ----------------------------------------------------------------------------
# Data.


def generate_mnist1d() -> dict[str, np.ndarray]:
  """MNIST-1D (Greydanus 2020), generated locally: the published 4000/1000 split.

  ``make_dataset`` seeds numpy's and Python's global generators (with the
  dataset's own seed, 42) to be reproducible; their states are restored so
  that generating the data has no effect on the caller.
  """
  numpy_state, python_state = np.random.get_state(), random.getstate()
  try:
    data = make_dataset(get_dataset_args())
  finally:
    np.random.set_state(numpy_state)
    random.setstate(python_state)
  return {
      "x_train": data["x"].astype(np.float32),
      "y_train": data["y"].astype(np.int32),
      "x_test": data["x_test"].astype(np.float32),
      "y_test": data["y_test"].astype(np.int32),
  }


@functools.cache
def _mnist1d() -> dict[str, np.ndarray]:
  return generate_mnist1d()


def load_mnist1d(train_size: int, test_size: int) -> dict[str, np.ndarray]:
  """The first `train_size` training and `test_size` test examples."""
  data = _mnist1d()  # Generated once per process (about a second).
  return {
      "x_train": data["x_train"][:train_size],
      "y_train": data["y_train"][:train_size],
      "x_test": data["x_test"][:test_size],
      "y_test": data["y_test"][:test_size],
  }


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(seed: int, step: int, batch_size: int, n: int) -> np.ndarray:
  """The examples of `step`: epochs are permutations seeded by (seed, epoch).

  A batch depends on the step alone, so a resumed run sees the same batches.
  """
  positions = np.arange(step * batch_size, (step + 1) * batch_size)
  epochs = positions // n
  indices = np.empty(batch_size, np.int64)
  for epoch in np.unique(epochs):
    here = epochs == epoch
    indices[here] = epoch_order(seed, int(epoch), n)[positions[here] % n]
  return indices


# ----------------------------------------------------------------------------
# Model.


class CheckedDropout(nn.Module):
  """``jaxdrop.linen.Dropout`` that also sows its realized keep fraction.

  In training it sows, into the "keep_fraction" collection, the fraction of
  the nonzero inputs that survived (``jaxdrop.checks.keep_fraction``) and how
  many there were, for the statistics check.
  """

  @nn.compact
  def __call__(self, x: jax.Array, rate: jax.typing.ArrayLike, train: bool) -> jax.Array:
    y = jaxdrop.linen.Dropout(rate, deterministic=not train)(x)
    if train:
      self.sow("keep_fraction", "fraction", jaxdrop.checks.keep_fraction(x, y))
      self.sow("keep_fraction", "count", jnp.sum(x != 0, dtype=jnp.int32))
    return y


class CNN(nn.Module):
  """Greydanus's MNIST-1D CNN with dropout on the flattened features.

  Three convolutions (kernels 5, 3, 3, stride 2: 40 -> 19 -> 10 -> 5
  positions; Greydanus used 25 channels) and a linear readout of the
  5 × channels features.
  """

  channels: int

  @nn.compact
  def __call__(self, x: jax.Array, rate: jax.typing.ArrayLike, train: bool) -> jax.Array:
    x = x[:, :, None]  # (batch, positions, 1 channel)
    for kernel in (5, 3, 3):
      x = nn.relu(nn.Conv(self.channels, (kernel,), strides=2, padding=1)(x))
    x = x.reshape(x.shape[0], -1)
    x = CheckedDropout(name="features")(x, rate, train)
    return nn.Dense(NUM_CLASSES)(x)


class MLP(nn.Module):
  """Two hidden layers of ReLUs, each followed by dropout."""

  hidden: int

  @nn.compact
  def __call__(self, x: jax.Array, rate: jax.typing.ArrayLike, train: bool) -> jax.Array:
    for i in range(2):
      x = nn.relu(nn.Dense(self.hidden)(x))
      x = CheckedDropout(name=f"hidden{i + 1}")(x, rate, train)
    return nn.Dense(NUM_CLASSES)(x)


MODELS = {"cnn": CNN, "mlp": MLP}


@functools.cache
def model_and_optimizer(model: str, width: int, lr: float, lr_schedule: str, steps: int):
  """The model and Adam, with a cosine-decayed or constant learning rate.

  Made once per setting: they are static fields of the train state, which jit
  compares, so every run (and main() call) with them shares compilations.
  """
  if lr_schedule == "cosine":
    lr = optax.cosine_decay_schedule(lr, steps)
  return MODELS[model](width), optax.adam(lr)


# ----------------------------------------------------------------------------
# Train state and steps.


class TrainState(train_state.TrainState):
  """flax's TrainState, plus the dropout rate and the keep-fraction counts.

  Attributes:
    rate: the run's dropout rate, a float32 scalar. It is traced, not static
      (jaxdrop takes a traced rate), so every rate shares one compilation.
    schedule: step -> 1 while dropout is on, 0 when off (static): a jaxdrop
      schedule at rate 1, scaled by `rate`.
    keep: per dropout layer, int32 [kept, counted] summed over the steps with
      dropout on: the statistics check's data, checkpointed with the rest.
  """

  rate: jax.Array
  schedule: Callable[[jax.Array], jax.Array] = struct.field(pytree_node=False)
  keep: dict[str, jax.Array] = struct.field(pytree_node=True)


@functools.cache
def dropout_schedule(kind: str, steps: int, early_fraction: float) -> optax.Schedule:
  """1 while dropout is on: always, or for the first steps ("early")."""
  if kind == "early":
    return jaxdrop.schedules.early_dropout(1.0, until_step=round(early_fraction * steps))
  return jaxdrop.schedules.constant(1.0)


@functools.partial(jax.jit, static_argnums=(0, 1))
def init_params(model: nn.Module, tx: optax.GradientTransformation, key: jax.Array):
  params = model.init(key, jnp.zeros((1, NUM_FEATURES)), 0.0, train=False)["params"]
  return params, tx.init(params)


def create_state(config: Config, model: nn.Module, tx, rate: float, key: jax.Array) -> TrainState:
  params, opt_state = init_params(model, tx, key)
  sown = jax.eval_shape(
      lambda: model.apply(
          {"params": params}, jnp.ones((1, NUM_FEATURES)), 0.0, train=True,
          mutable="keep_fraction",
      )[1]
  )
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      apply_fn=model.apply,
      params=params,
      tx=tx,
      opt_state=opt_state,
      rate=jnp.asarray(rate, jnp.float32),
      schedule=dropout_schedule(config.rate_schedule, config.steps, config.early_fraction),
      keep={name: jnp.zeros(2, jnp.int32) for name in sorted(sown["keep_fraction"])},
  )


@jax.jit
def train_step(state: TrainState, batch: tuple[jax.Array, jax.Array], key: jax.Array):
  """One Adam step; dropout masks come from ``fold_in(key, state.step)``.

  The step is the only random state: the same state, batch and key give the
  same result, which is what makes resuming exact.

  Returns:
    The new state, and the loss and gradients (checked on the host by
    ``check_finite`` while the next step runs).
  """
  x, y = batch
  chex.assert_shape(x, (None, NUM_FEATURES))
  chex.assert_shape(y, (x.shape[0],))
  dropout_on = state.schedule(state.step)
  rate = state.rate * dropout_on
  step_key = jax.random.fold_in(key, state.step)

  def loss_fn(params):
    logits, sown = state.apply_fn(
        {"params": params}, x, rate, train=True,
        rngs={"dropout": step_key}, mutable="keep_fraction",
    )
    chex.assert_shape(logits, (x.shape[0], NUM_CLASSES))
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, sown["keep_fraction"]

  (loss, sown), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  # Count only the steps with dropout on (an early schedule turns it off).
  at_rate = (dropout_on == 1).astype(jnp.int32)
  keep = {}
  for name, counts in state.keep.items():
    (fraction,), (count,) = sown[name]["fraction"], sown[name]["count"]
    kept = jnp.round(fraction * count).astype(jnp.int32)
    keep[name] = counts + at_rate * jnp.stack([kept, count])
  state = state.apply_gradients(grads=grads, keep=keep)
  return state, {"loss": loss, "grads": grads}


class NonFiniteError(RuntimeError):
  """The loss or the gradients stopped being finite."""


def check_finite(step: int, outputs: dict[str, Any], checkpoints: str) -> None:
  """chex.assert_tree_all_finite on a step's loss and gradients.

  It runs on the host, one step behind, so that it overlaps the next step's
  compute: chex's value assertions need concrete values, and ``chex.chexify``
  (which allows them inside jit) re-traces the step on every call, which made
  this training loop several times slower.
  """
  try:
    chex.assert_tree_all_finite(outputs)
  except AssertionError as error:
    raise NonFiniteError(
        f"step {step}: the loss or the gradients are NaN or Inf, so training "
        f"stopped. No checkpoint was written after it; the last good one is in "
        f"{checkpoints}. Try a smaller --lr.\n{error}"
    ) from None


# ----------------------------------------------------------------------------
# Evaluation.


def classification_metrics(log_probs: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
  """Correct count, negative log-likelihood and ECE (15 bins) of class log-probabilities."""
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


def evaluate(state: TrainState, data: dict[str, jax.Array]) -> dict[str, float]:
  train = eval_step(state.apply_fn, state.params, data["x_train"], data["y_train"])
  test = eval_step(state.apply_fn, state.params, data["x_test"], data["y_test"])
  return {
      "train_acc": to_floats(train, "train", len(data["y_train"]))["train_acc"],
      **to_floats(test, "test", len(data["y_test"])),
  }


def keep_fractions(state: TrainState, rate: float) -> dict[str, dict[str, float]]:
  """Per layer: the realized keep fraction, its count and its distance in σ."""
  out = {}
  for name, counts in state.keep.items():
    kept, counted = (int(c) for c in np.asarray(counts))
    fraction = kept / counted if counted else float("nan")
    sigma = math.sqrt(rate * (1 - rate) / counted) if counted else 0.0
    off = abs(fraction - (1 - rate)) / sigma if sigma else 0.0
    out[name] = {"fraction": fraction, "n": counted, "sigmas": off}
  return out


def check_keep_fractions(state: TrainState, rate: float) -> dict[str, dict[str, float]]:
  """jaxdrop.checks.assert_keep_fraction for every layer, over the whole run."""
  fractions = keep_fractions(state, rate)
  for name, f in fractions.items():
    if f["n"]:
      try:
        jaxdrop.checks.assert_keep_fraction(f["fraction"], rate, f["n"], k=KEEP_SIGMAS)
      except AssertionError as error:
        raise AssertionError(f"dropout layer {name!r}: {error}") from None
  return fractions


# ----------------------------------------------------------------------------
# Devices and checkpoints.


def maybe_initialize_distributed() -> None:
  """jax.distributed.initialize() when the multi-host environment is set.

  Set JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID
  on every host (or only JAX_COORDINATOR_ADDRESS on a cluster that JAX
  detects, such as SLURM or Open MPI). Each process generates the same data
  and feeds its devices' shards of every batch.
  """
  if not os.environ.get("JAX_COORDINATOR_ADDRESS") or jax.distributed.is_initialized():
    return
  env = {
      "num_processes": os.environ.get("JAX_NUM_PROCESSES"),
      "process_id": os.environ.get("JAX_PROCESS_ID"),
  }
  jax.distributed.initialize(**{k: int(v) for k, v in env.items() if v is not None})


def make_mesh(devices: int) -> jax.sharding.Mesh:
  available = jax.devices()
  if devices > len(available):
    raise ValueError(
        f"--devices {devices} asks for more devices than the {len(available)} "
        f"available ({available[0].platform}). On CPU, simulate more with "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={devices}."
    )
  return jax.sharding.Mesh(np.array(available[:devices]), ("data",))


def put(x: np.ndarray, mesh: jax.sharding.Mesh, spec: P) -> jax.Array:
  """A global array from a host array that every process holds in full."""
  sharding = NamedSharding(mesh, spec)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def checkpoint_manager(directory: str) -> ocp.CheckpointManager:
  # Synchronous saves, so a checkpoint that exists is complete whenever the
  # process is killed (Orbax writes a temporary directory, then renames it).
  options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


# ----------------------------------------------------------------------------
# Training.


def run_name(rate: float, seed: int) -> str:
  return f"rate{rate:g}-seed{seed}"


def train_and_evaluate(
    config: Config,
    rate: float,
    seed: int,
    model: nn.Module,
    tx: optax.GradientTransformation,
    data: dict[str, Any],
    mesh: jax.sharding.Mesh,
    workdir: str,
) -> dict[str, Any]:
  """Trains one run (resuming it if asked) and returns its results.json row."""
  name = run_name(rate, seed)
  init_key, dropout_key, mc_key = jax.random.split(jax.random.key(seed), 3)
  state = create_state(config, model, tx, rate, init_key)
  state = jax.device_put(state, NamedSharding(mesh, P()))
  checkpoints = os.path.join(workdir, "checkpoints", name)
  manager = checkpoint_manager(checkpoints)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  is_writer = jax.process_index() == 0

  if config.resume and manager.latest_step() is not None:
    step = manager.latest_step()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    print(f"resumed from step {step} ({name})", flush=True)

  start = int(state.step)
  x_train, y_train = data["host"]["x_train"], data["host"]["y_train"]
  bar = tqdm(
      total=config.steps, initial=start, desc=name, disable=not config.progress,
      dynamic_ncols=True, leave=False,
  )
  status = {}
  pending = None  # (step, outputs) of the last step: checked while the next runs
  for step in range(start, config.steps):
    indices = batch_indices(seed, step, config.batch_size, len(x_train))
    batch = (
        put(x_train[indices], mesh, P("data")),
        put(y_train[indices], mesh, P("data")),
    )
    state, outputs = train_step(state, batch, dropout_key)
    if pending is not None:
      check_finite(*pending, checkpoints)
    done = step + 1  # == state.step
    pending = (done, outputs)
    bar.update(1)
    if done % 100 == 0:
      status["loss"] = f"{float(outputs['loss']):.4f}"
      bar.set_postfix(status, refresh=False)
    is_eval = done % config.eval_every == 0 or done == config.steps
    is_checkpoint = done % config.checkpoint_every == 0 or done == config.steps
    if is_eval or is_checkpoint:
      check_finite(*pending, checkpoints)  # Before anything is written.
      pending = None
    if is_eval:
      row = {"rate": rate, "seed": seed, "step": done, "loss": float(outputs["loss"])}
      row.update(evaluate(state, data))
      row["keep_fraction"] = {k: v["fraction"] for k, v in keep_fractions(state, rate).items()}
      if is_writer:
        with open(metrics_path, "a") as f:
          f.write(json.dumps(row) + "\n")
      status["test_acc"] = f"{row['test_acc']:.3f}"
    if is_checkpoint:
      manager.save(done, args=ocp.args.StandardSave(state))
  bar.close()
  manager.wait_until_finished()
  manager.close()

  fractions = check_keep_fractions(state, rate)
  result = {"rate": rate, "seed": seed, **evaluate(state, data), "mc": None}
  if rate > 0 and config.mc_samples:
    mc = mc_eval_step(state, data["x_test"], data["y_test"], mc_key, config.mc_samples)
    result["mc"] = {"samples": config.mc_samples, **to_floats(mc, "test", len(data["y_test"]))}
  result["keep_fraction"] = {k: v["fraction"] for k, v in fractions.items()}
  result["keep_check"] = {k: {"n": v["n"], "sigmas": v["sigmas"]} for k, v in fractions.items()}
  print(
      f"{name}: train acc {result['train_acc']:.4f}, test acc {result['test_acc']:.4f}, "
      f"test nll {result['test_nll']:.4f}",
      flush=True,
  )
  return result


# ----------------------------------------------------------------------------
# Workdir and report.


def prepare_workdir(config: Config) -> str:
  """The workdir: given, found again for --resume, or a fresh one under runs/."""
  workdir = config.workdir
  if not workdir and config.resume:
    workdir = latest_matching_run(config)
    if not workdir:
      print("--resume: no run under runs/ has this config; starting a new one")
  if not workdir:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir = os.path.join("runs", f"{config.model}-{stamp}")
    suffix = 1
    while os.path.exists(workdir):
      suffix += 1
      workdir = os.path.join("runs", f"{config.model}-{stamp}-{suffix}")
  config_path = os.path.join(workdir, "config.json")
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(config_path):
    with open(config_path) as f:
      saved = json.load(f)
    if not config.resume:
      raise SystemExit(f"{workdir} already holds a run: pass --resume, or another --workdir")
    if saved != json.loads(json.dumps(config.signature())):
      raise SystemExit(f"{workdir} holds a run with another config: {saved}")
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(config_path, "w") as f:
      json.dump(config.signature(), f, indent=1)
    if config.resume:
      truncate_metrics(metrics_path, workdir)
  print(f"workdir: {workdir}", flush=True)
  return workdir


def latest_matching_run(config: Config) -> str:
  candidates = []
  if os.path.isdir("runs"):
    for entry in os.listdir("runs"):
      path = os.path.join("runs", entry, "config.json")
      if os.path.exists(path):
        with open(path) as f:
          if json.load(f) == json.loads(json.dumps(config.signature())):
            candidates.append((os.path.getmtime(path), os.path.join("runs", entry)))
  return max(candidates)[1] if candidates else ""


def truncate_metrics(metrics_path: str, workdir: str) -> None:
  """Keeps the rows of each run up to its last checkpoint: the rest is redone."""
  if not os.path.exists(metrics_path):
    return

  @functools.cache
  def last_checkpoint(name: str) -> int:
    directory = os.path.abspath(os.path.join(workdir, "checkpoints", name))
    if not os.path.isdir(directory):
      return -1
    with ocp.CheckpointManager(directory) as manager:
      step = manager.latest_step()
    return -1 if step is None else step

  kept = []
  with open(metrics_path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:  # A line cut short by the kill.
        continue
      if row["step"] <= last_checkpoint(run_name(row["rate"], row["seed"])):
        kept.append(json.dumps(row) + "\n")
  with open(metrics_path, "w") as f:
    f.writelines(kept)


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def format_table(config: Config, runs: list[dict[str, Any]]) -> str:
  """Metrics as rows, rates as columns; mean ± sd when there are seeds."""
  rates = config.rates
  by_rate = {r: [run for run in runs if run["rate"] == r] for r in rates}
  seeds = len(config.seed_list)

  def cell(rate, get, percent=True):
    values = [get(run) for run in by_rate[rate]]
    if any(v is None for v in values):
      return "-"
    scale, digits = (100.0, 2) if percent else (1.0, 4)
    mean, sd = mean_sd([scale * v for v in values])
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if seeds > 1 else "")

  mc = lambda key: lambda run: run["mc"] and run["mc"][key]  # noqa: E731
  rows = [
      ("train accuracy (%)", lambda run: run["train_acc"], True),
      ("test accuracy (%)", lambda run: run["test_acc"], True),
      ("generalization gap (points)", lambda run: run["train_acc"] - run["test_acc"], True),
      ("test NLL", lambda run: run["test_nll"], False),
      ("test ECE (%)", lambda run: run["test_ece"], True),
  ]
  if config.mc_samples:
    rows += [
        (f"MC dropout K={config.mc_samples}: test accuracy (%)", mc("test_acc"), True),
        (f"MC dropout K={config.mc_samples}: test NLL", mc("test_nll"), False),
        (f"MC dropout K={config.mc_samples}: test ECE (%)", mc("test_ece"), True),
    ]
  layers = sorted(runs[0]["keep_fraction"])
  for name in layers:
    rows.append((f"keep fraction '{name}'", lambda run, n=name: run["keep_fraction"][n], False))
  header = ["", *("no dropout" if r == 0 else f"dropout {r:g}" for r in rates)]
  body = [[label, *(cell(r, get, pct) for r in rates)] for label, get, pct in rows]
  widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
  line = lambda row: "  ".join(  # noqa: E731
      c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
  )
  seed_text = f"seeds 0-{seeds - 1}, mean ± sd" if seeds > 1 else f"seed {config.seed_list[0]}"
  schedule = "" if config.rate_schedule == "constant" else f", {config.rate_schedule} dropout"
  lr = f"lr {config.lr:g}" + (" cosine" if config.lr_schedule == "cosine" else " constant")
  title = (
      f"MNIST-1D ({config.train_size} train / {config.test_size} test), "
      f"{config.model} width {config.width}, {config.steps} steps, {lr}{schedule}, {seed_text}"
  )
  lines = [title, line(header), "  ".join("-" * w for w in widths), *map(line, body)]
  worst = max(c["sigmas"] for run in runs for c in run["keep_check"].values())
  lines.append(
      f"keep fractions: every layer within {worst:.2f}σ of 1 - rate "
      f"(checked with jaxdrop.checks.assert_keep_fraction, k={KEEP_SIGMAS:g})"
  )
  test_acc = lambda rs: 100 * mean_sd([r["test_acc"] for r in rs])[0]  # noqa: E731
  gap = lambda rs: 100 * mean_sd([r["train_acc"] - r["test_acc"] for r in rs])[0]  # noqa: E731
  base = by_rate[0.0]
  for rate in rates[1:]:
    lines.append(
        f"dropout {rate:g} vs none: test accuracy {test_acc(by_rate[rate]) - test_acc(base):+.2f} "
        f"points, generalization gap {gap(base):.2f} -> {gap(by_rate[rate]):.2f} points"
    )
  return "\n".join(lines)


def save_plots(config: Config, workdir: str, runs: list[dict[str, Any]]) -> None:
  import matplotlib.pyplot as plt

  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  fig, (ax, ax_nll) = plt.subplots(1, 2, figsize=(9.6, 3.8))
  for i, rate in enumerate(config.rates):
    steps = sorted({r["step"] for r in rows if r["rate"] == rate})
    label = "no dropout" if rate == 0 else f"dropout {rate:g}"
    mean = lambda key: [  # noqa: E731
        np.mean([r[key] for r in rows if r["rate"] == rate and r["step"] == s]) for s in steps
    ]
    ax.plot(steps, 100 * np.array(mean("train_acc")), "--", color=f"C{i}", label=f"{label}, train")
    ax.plot(steps, 100 * np.array(mean("test_acc")), "-", color=f"C{i}", label=f"{label}, test")
    ax_nll.plot(steps, mean("test_nll"), "-", color=f"C{i}", label=label)
  seeds = len(config.seed_list)
  mean_of = f", mean of {seeds} seeds" if seeds > 1 else ""
  ax.set_title(f"MNIST-1D {config.model}: accuracy{mean_of}")
  ax.set_xlabel("step")
  ax.set_ylabel("accuracy (%)")
  ax.legend(fontsize="small")
  ax_nll.set_title("test NLL (weight scaling)")
  ax_nll.set_xlabel("step")
  ax_nll.set_yscale("log")
  ax_nll.legend(fontsize="small")
  for a in (ax, ax_nll):
    a.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "accuracy.png"), dpi=90)
  plt.close(fig)

  if len(config.rates) > 2 or config.sweep:
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    for key, label in (("train_acc", "train"), ("test_acc", "test")):
      stats = [mean_sd([100 * r[key] for r in runs if r["rate"] == rate]) for rate in config.rates]
      means, sds = zip(*stats)
      ax.errorbar(config.rates, means, yerr=sds, marker="o", capsize=3, label=label)
    ax.set_xlabel("dropout rate")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"MNIST-1D, {config.model}, {len(config.seed_list)} seed(s)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "sweep.png"), dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------
# Main.


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the comparison; returns what it writes to results.json."""
  config = parse_args(argv)
  maybe_initialize_distributed()
  started = time.perf_counter()
  mesh = make_mesh(config.devices)
  workdir = prepare_workdir(config)
  config = dataclasses.replace(config, workdir=workdir)

  host = load_mnist1d(config.train_size, config.test_size)
  data = {k: put(v, mesh, P()) for k, v in host.items()}
  data["host"] = host
  model, tx = model_and_optimizer(
      config.model, config.width, config.lr, config.lr_schedule, config.steps
  )

  runs = []
  for rate in config.rates:
    for seed in config.seed_list:
      runs.append(train_and_evaluate(config, rate, seed, model, tx, data, mesh, workdir))

  results = {
      "dataset": "mnist1d",
      "model": config.model,
      "steps": config.steps,
      "seconds": round(time.perf_counter() - started, 2),
      "devices": config.devices,
      "config": dataclasses.asdict(config),
      "runs": runs,
  }
  table = format_table(config, runs)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=1)
    with open(os.path.join(workdir, "table.txt"), "w") as f:
      f.write(table + "\n")
    save_plots(config, workdir, runs)
  print(table)
  print(f"{results['seconds']:.1f} s; results, metrics, plots and checkpoints in {workdir}")
  return results


if __name__ == "__main__":
  try:
    main()
  except NonFiniteError as error:
    sys.exit(f"error: {error}")
