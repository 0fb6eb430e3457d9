"""The linen models (Greydanus's MNIST-1D CNN and an MLP, on ``jaxdrop.linen.Dropout``),
Adam, and the train state.

Each dropout layer sows its realized keep fraction, which the train step sums
over the run (``TrainState.keep``) for the check against ``1 - rate``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state

import jaxdrop
from train_lib.data import NUM_CLASSES, NUM_FEATURES


class CheckedDropout(nn.Module):
  """``jaxdrop.linen.Dropout`` that also sows what it kept.

  In training it sows, into the "keep_fraction" collection, the fraction of
  the nonzero inputs that survived (``jaxdrop.checks.keep_fraction``) and how
  many there were.
  """

  @nn.compact
  def __call__(self, x: jax.Array, rate: jax.typing.ArrayLike, train: bool) -> jax.Array:
    y = jaxdrop.linen.Dropout(rate, deterministic=not train)(x)
    if train:
      self.sow("keep_fraction", "fraction", jaxdrop.checks.keep_fraction(x, y))
      self.sow("keep_fraction", "count", jnp.sum(x != 0, dtype=jnp.int32))
    return y


class CNN(nn.Module):
  """Three convolutions (kernels 5, 3, 3, stride 2: 40 -> 19 -> 10 -> 5 positions),
  dropout on the flattened features, a linear readout. Greydanus used 25 channels."""

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


@functools.cache
def model_and_optimizer(model: str, width: int, lr: float, lr_schedule: str, steps: int):
  """The model and Adam, with a cosine-decayed or constant learning rate.

  Made once per setting: they are static fields of the train state, which jit
  compares, so every run (and every main() call) with them shares compilations.
  """
  if lr_schedule == "cosine":
    lr = optax.cosine_decay_schedule(lr, steps)
  return {"cnn": CNN, "mlp": MLP}[model](width), optax.adam(lr)


class TrainState(train_state.TrainState):
  """flax's TrainState, plus the dropout rate and the keep-fraction counts.

  Attributes:
    rate: the run's dropout rate, a float32 scalar. It is traced, not static
      (jaxdrop takes a traced rate), so every rate shares one compilation.
    schedule: step -> 1 while dropout is on, 0 when off (static).
    keep: per dropout layer, int32 [kept, counted] summed over the steps with
      dropout on: the statistics check's data, checkpointed with the rest.
  """

  rate: jax.Array
  schedule: Callable[[jax.Array], jax.Array] = struct.field(pytree_node=False)
  keep: dict[str, jax.Array] = struct.field(pytree_node=True)


@functools.cache
def dropout_schedule(kind: str, steps: int, early_fraction: float) -> optax.Schedule:
  """1 while dropout is on: always, or for the first steps ("early"). Cached: it is a
  static field of the state, so one function per setting shares one compilation."""
  if kind == "early":
    return jaxdrop.schedules.early_dropout(1.0, until_step=round(early_fraction * steps))
  return jaxdrop.schedules.constant(1.0)


@functools.partial(jax.jit, static_argnums=(0, 1))
def init_params(model: nn.Module, tx: optax.GradientTransformation, key: jax.Array):
  params = model.init(key, jnp.zeros((1, NUM_FEATURES)), 0.0, train=False)["params"]
  return params, tx.init(params)


def create_state(model: nn.Module, tx, rate: float, schedule, key: jax.Array) -> TrainState:
  """A fresh state: parameters from `key`, Adam's state, zero keep counts."""
  params, opt_state = init_params(model, tx, key)
  sown = jax.eval_shape(lambda: model.apply(
      {"params": params}, jnp.ones((1, NUM_FEATURES)), 0.0, train=True, mutable="keep_fraction"
  )[1])
  return TrainState(
      step=jnp.zeros((), jnp.int32), apply_fn=model.apply, params=params, tx=tx,
      opt_state=opt_state, rate=jnp.asarray(rate, jnp.float32), schedule=schedule,
      keep={name: jnp.zeros(2, jnp.int32) for name in sorted(sown["keep_fraction"])},
  )
