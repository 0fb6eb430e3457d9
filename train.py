"""What does dropout do to generalization? A 1-D CNN on MNIST-1D, with and without.

  python train.py                        # CNN, dropout 0.5 beside no dropout
  python train.py --model mlp --seeds 3  # an MLP; mean ± sd over seeds 0, 1, 2
  python train.py --sweep 0.1,0.3,0.5    # test accuracy against the rate
  python train.py --help                 # every flag: the fields of Config below

Every run is paired with a rate-0 baseline: same model, seed, batches and steps.
This file is the training loop, top to bottom: the config, the jitted train
step, one run and main. The parts around it are in train_lib/ (its __init__
lists them); the results are in docs/training.md.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Collection, Sequence
from typing import Annotated, Any, Literal

import chex
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

import jaxdrop
from train_lib import cli, evaluation, report, workdir
from train_lib.checkpoints import Checkpointer, CheckpointError, restore_latest
from train_lib.cli import NonNegativeInt, PositiveFloat, PositiveInt, between
from train_lib.data import NUM_CLASSES, NUM_FEATURES, batch_indices, load_mnist1d
from train_lib.devices import check_device_count, make_mesh, maybe_initialize_distributed, put
from train_lib.evaluation import NonFiniteError, check_finite
from train_lib.interrupt import Interrupted, StopRequest
from train_lib.models import TrainState, create_state, dropout_schedule, model_and_optimizer

# ----------------------------------------------------------------------------
# Config.

# The defaults of --width, --lr and --steps for each model: the best of a small
# search on seeds 0-2 (docs/training.md). Greydanus's CNN has 25 channels and
# his MLP 100 hidden units; with dropout, wider ones generalize better.
MODEL_DEFAULTS = {
    "cnn": {"width": 64, "lr": 1e-2, "steps": 6000},
    "mlp": {"width": 512, "lr": 1e-3, "steps": 20000},
}
KEEP_SIGMAS = 4.0  # jaxdrop.checks' default: a false alarm once in ~16,000 checks.
Rate = Annotated[float, between(0, 1, high_open=True)]


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything a run depends on. Each field is a flag (``--batch-size`` for
  ``batch_size``) whose help is the comment above it."""

  # "cnn": 3 conv layers (Greydanus 2020), dropout on the flattened features;
  # "mlp": 2 hidden layers, each followed by dropout.
  model: Literal["cnn", "mlp"] = "cnn"
  # The dropout rate (probability to drop); rate 0 is always trained too.
  rate: Rate = 0.5
  # Compare these rates (and 0) instead of --rate; adds sweep.png.
  sweep: tuple[Rate, ...] = ()
  # Train seeds 0..N-1 and report mean ± sd, instead of the one --seed.
  seeds: NonNegativeInt = 0
  # The seed of a single-seed run: initialization, batch order, masks.
  seed: NonNegativeInt = 0
  # Conv channels (cnn) or hidden units (mlp). Default: cnn 64, mlp 512.
  width: PositiveInt | None = None
  # Optimizer steps per run. Default: cnn 6000, mlp 20000.
  steps: PositiveInt | None = None
  # Examples per step (the global batch, split over --devices).
  batch_size: PositiveInt = 100
  # Adam's learning rate. Default: cnn 1e-2, mlp 1e-3.
  lr: PositiveFloat | None = None
  # "cosine": decayed to 0 over --steps; "constant".
  lr_schedule: Literal["cosine", "constant"] = "cosine"
  # MC-dropout passes at test time, beside weight scaling (0: off).
  mc_samples: NonNegativeInt = 50
  # "early": dropout for the first --early-fraction of the steps only (Liu et al. 2023).
  rate_schedule: Literal["constant", "early"] = "constant"
  # The fraction of the steps with dropout under --rate-schedule early.
  early_fraction: Annotated[float, between(0, 1, low_open=True)] = 0.5
  # Steps between evaluations (the rows of metrics.jsonl).
  eval_every: PositiveInt = 250
  # Steps between checkpoints (one is also saved at the end, and on Ctrl-C).
  checkpoint_every: PositiveInt = 1000
  # Output directory. Default: a fresh one under runs/ (with --resume: the
  # newest run there with the same config).
  workdir: str = ""
  # Continue every run from its newest intact checkpoint in --workdir.
  resume: bool = False
  # Shard each batch over this many devices (data parallel).
  devices: PositiveInt = 1
  # Use the first N of the 4000 training examples.
  train_size: Annotated[int, between(1, 4000)] = 4000
  # Use the first N of the 1000 test examples.
  test_size: Annotated[int, between(1, 1000)] = 1000
  # A progress bar with the live loss (--no-progress: none).
  progress: bool = True

  @property
  def rates(self) -> tuple[float, ...]:
    """The rates trained: 0 (the baseline) first, then the dropout rates."""
    return tuple(sorted({0.0, *(self.sweep or (self.rate,))}))

  @property
  def seed_list(self) -> tuple[int, ...]:
    return tuple(range(self.seeds)) if self.seeds else (self.seed,)

  def signature(self) -> dict[str, Any]:
    """The fields that decide the results (not where they go or how they show)."""
    ignored = ("workdir", "resume", "devices", "progress")
    return {k: v for k, v in dataclasses.asdict(self).items() if k not in ignored}


def check_config(config: Config, given: Collection[str]) -> Config:
  """Checks between flags, the model's defaults and the workdir (ValueError: a flag error)."""
  for a, b, why in (
      ("seed", "seeds", "--seeds N trains seeds 0..N-1"),
      ("rate", "sweep", "--sweep lists the rates to train"),
  ):
    if a in given and b in given:
      raise ValueError(f"--{a} and --{b} conflict ({why}): give one of them")
  if "early_fraction" in given and config.rate_schedule != "early":
    raise ValueError("--early-fraction applies to --rate-schedule early only")
  repeated = sorted({r for r in config.sweep if config.sweep.count(r) > 1})
  if repeated:
    raise ValueError(f"--sweep lists {', '.join(map(workdir.rate_label, repeated))} twice")
  if config.batch_size > config.train_size:
    raise ValueError(
        f"--batch-size {config.batch_size} is larger than the {config.train_size} training "
        f"examples (--train-size): give at most {config.train_size}"
    )
  check_device_count(config.devices, config.batch_size)
  defaults = MODEL_DEFAULTS[config.model]
  config = dataclasses.replace(
      config, **{k: v for k, v in defaults.items() if getattr(config, k) is None}
  )
  found = workdir.find(config.workdir, config.resume, config.model, config.signature())
  return dataclasses.replace(config, workdir=found)


# ----------------------------------------------------------------------------
# The train step.


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
  step_key = jax.random.fold_in(key, state.step)

  def loss_fn(params):
    logits, sown = state.apply_fn(
        {"params": params}, x, state.rate * dropout_on, train=True,
        rngs={"dropout": step_key}, mutable="keep_fraction",
    )
    chex.assert_shape(logits, (x.shape[0], NUM_CLASSES))
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, sown["keep_fraction"]

  (loss, sown), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  at_rate = (dropout_on == 1).astype(jnp.int32)  # Count only the steps with dropout on.
  keep = {}
  for name, counts in state.keep.items():
    (fraction,), (count,) = sown[name]["fraction"], sown[name]["count"]
    kept = jnp.round(fraction * count).astype(jnp.int32)
    keep[name] = counts + at_rate * jnp.stack([kept, count])
  return state.apply_gradients(grads=grads, keep=keep), {"loss": loss, "grads": grads}


# ----------------------------------------------------------------------------
# One run: a rate and a seed, trained (or resumed) and evaluated.


def train_and_evaluate(config, rate, seed, model, tx, data, mesh, stop) -> dict[str, Any]:
  """Trains one run and returns its row of results.json."""
  name = workdir.run_name(rate, seed)
  init_key, dropout_key, mc_key = jax.random.split(jax.random.key(seed), 3)
  schedule = dropout_schedule(config.rate_schedule, config.steps, config.early_fraction)
  state = create_state(model, tx, rate, schedule, init_key)
  state = jax.device_put(state, NamedSharding(mesh, P()))
  checkpoints = os.path.join(config.workdir, "checkpoints", name)
  metrics = os.path.join(config.workdir, "metrics.jsonl")
  is_writer = jax.process_index() == 0
  if config.resume:
    restored = restore_latest(checkpoints, state)
    state = state if restored is None else restored
    print(f"resumed from step {int(state.step)} ({name})" if restored is not None
          else f"no checkpoint of {name} yet: it starts from step 0", flush=True)
    if is_writer:  # The rows after that step are redone.
      same = lambda row: (row["rate"], row["seed"]) == (rate, seed)  # noqa: E731
      workdir.rewrite_rows(metrics, lambda row: not same(row) or row["step"] <= int(state.step))

  x_train, y_train = data["host"]["x_train"], data["host"]["y_train"]
  checkpointer = Checkpointer(checkpoints)
  bar = tqdm(total=config.steps, initial=int(state.step), desc=name,
             disable=not config.progress, dynamic_ncols=True, leave=False)
  pending = None  # (step, outputs) of the last step: checked while the next one runs.
  try:
    for step in range(int(state.step), config.steps):
      indices = batch_indices(seed, step, config.batch_size, len(x_train))
      batch = (put(x_train[indices], mesh, P("data")), put(y_train[indices], mesh, P("data")))
      state, outputs = train_step(state, batch, dropout_key)
      if pending is not None:
        check_finite(*pending, checkpoints)
      done, pending = step + 1, (step + 1, outputs)
      bar.update(1)
      if done % 100 == 0:
        bar.set_postfix(loss=f"{float(outputs['loss']):.4f}", refresh=False)
      stopping = stop.requested  # Read once: a SIGINT may arrive at any moment.
      is_eval = done % config.eval_every == 0 or done == config.steps
      is_checkpoint = done % config.checkpoint_every == 0 or done == config.steps or stopping
      if is_eval or is_checkpoint:
        check_finite(*pending, checkpoints)  # Before anything is written.
        pending = None
      if is_eval:
        row = {"rate": rate, "seed": seed, "step": done, "loss": float(outputs["loss"])}
        row.update(evaluation.evaluate(state, data))
        fractions = evaluation.keep_fractions(state.keep, rate)
        row["keep_fraction"] = {k: v["fraction"] for k, v in fractions.items()}
        if is_writer:
          with open(metrics, "a") as f:
            f.write(workdir.dumps(row) + "\n")
      if is_checkpoint:
        checkpointer.save(done, state)
      if stopping:
        raise Interrupted(done, name)
  finally:
    bar.close()
    checkpointer.close()

  fractions = evaluation.check_keep_fractions(state.keep, rate, KEEP_SIGMAS, name)
  result = {"rate": rate, "seed": seed, **evaluation.evaluate(state, data), "mc": None}
  if rate > 0 and config.mc_samples:
    result["mc"] = evaluation.mc_evaluate(state, data, mc_key, config.mc_samples)
  result["keep_fraction"] = {k: v["fraction"] for k, v in fractions.items()}
  result["keep_check"] = {k: {"n": v["n"], "sigmas": v["sigmas"]} for k, v in fractions.items()}
  print(f"{name}: train acc {result['train_acc']:.4f}, test acc {result['test_acc']:.4f}, "
        f"test nll {result['test_nll']:.4f}", flush=True)
  return result


# ----------------------------------------------------------------------------
# Main.


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the comparison; returns what it writes to results.json."""
  maybe_initialize_distributed()
  config = cli.parse(Config, argv, __doc__.splitlines()[0], check=check_config)
  if jax.process_index() != 0:
    return train_all(config, is_writer=False)  # Only process 0 writes files.
  with workdir.create(config.workdir, config.signature()):  # Locked until the run ends.
    return train_all(config, is_writer=True)


def train_all(config: Config, is_writer: bool) -> dict[str, Any]:
  """Trains and evaluates every run of `config`; process 0 writes the results."""
  started = time.perf_counter()
  print(f"workdir: {config.workdir}", flush=True)
  mesh = make_mesh(config.devices)
  host = load_mnist1d(config.train_size, config.test_size)
  data = {**{k: put(v, mesh, P()) for k, v in host.items()}, "host": host}
  model, tx = model_and_optimizer(
      config.model, config.width, config.lr, config.lr_schedule, config.steps
  )
  with StopRequest() as stop:
    runs = [
        train_and_evaluate(config, rate, seed, model, tx, data, mesh, stop)
        for rate in config.rates
        for seed in config.seed_list
    ]

  results = {
      "dataset": "mnist1d", "model": config.model, "steps": config.steps,
      "seconds": round(time.perf_counter() - started, 2), "devices": config.devices,
      "config": dataclasses.asdict(config), "runs": runs,
  }
  table = report.format_table(config, runs, KEEP_SIGMAS)
  if is_writer:
    report.write(config, results, table)
  print(table)
  print(f"{results['seconds']:.1f} s; results, metrics, plots and checkpoints in {config.workdir}")
  return workdir.strict(results)


def run(argv: Sequence[str] | None = None) -> int:
  """The command line: main(), ending in a message and an exit status."""
  try:
    main(argv)
  except Interrupted as interrupted:
    print(interrupted, file=sys.stderr)
    return 130
  except (NonFiniteError, CheckpointError, workdir.WorkdirBusy, OSError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(run())
