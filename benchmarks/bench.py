"""Benchmarks jaxdrop against flax, equinox and haiku dropout, and the memory floor.

Everything runs in one process, jitted, with compilation excluded; the
variants are interleaved (each repeat times every variant once, starting from
a rotating position) and the median of the repeats is reported:

1. forward ``f(key, x)`` and forward+backward ``grad_x sum(f(key, x) * w)``
   for every variant, size, dtype and rate. ``x * 2.0`` is the floor: one read
   and one write, what any elementwise op must pay (its backward, ``2 * w``,
   is one read and one write too);
2. temp bytes (``memory_analysis()``) of a donated, jitted MLP train step
   (784-1024-1024-10, batch 256 unless --mlp-* say otherwise; Adam, dropout
   after each hidden relu, or relu_dropout in place of both);
3. the time of that train step;
4. the same two for a bf16 transformer train step (``--block-shape``).

Usage (from the repository root):
  python benchmarks/bench.py                          # CPU, a few minutes
  python benchmarks/bench.py --quick                  # a short run, seconds
  python benchmarks/bench.py --smoke                  # a GPU run's rows at toy shapes
  python benchmarks/bench.py --platform gpu --json gpu.json

equinox and dm-haiku (``pip install -e .[bench]``) are optional: their rows
are skipped when they are not installed. The ``bits=16`` rows are jaxdrop's
fast mode (four 16-bit decisions per hash); ``--no-fast`` leaves them out.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
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
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))  # Run from a checkout without installing.

import jaxdrop  # noqa: E402
import pallas_dropout as _pallas_dropout  # noqa: E402  (benchmarks/pallas_dropout.py)

try:
  import equinox as eqx
except ImportError:
  eqx = None
try:
  import haiku as hk
except ImportError:
  hk = None

FLOOR = "x * 2.0 (floor)"
FLAX = "flax.linen.Dropout"
FAST = "jaxdrop.dropout bits=16"
FAST_LINEN = "jaxdrop.linen.Dropout bits=16"
REMAT_POLICY = "remat policy"  # save_any_names_but_these(jaxdrop.CHECKPOINT_NAME)
REMAT = "jaxdrop.linen.Dropout + " + REMAT_POLICY
RELU_DROPOUT = "jaxdrop.relu_dropout"
PALLAS_FAST = "pallas kernel bits=16"


@dataclasses.dataclass(frozen=True)
class Config:
  platform: str | None = None  # "cpu" or "gpu"; None: JAX's default backend.
  # Elements: 2**24, 2**22, 2**20; largest first, so that a run cut short by a
  # time limit has the headline numbers (and writes them: --json is updated
  # after every configuration).
  log2_sizes: tuple[int, ...] = (24, 22, 20)
  dtypes: tuple[str, ...] = ("float32", "bfloat16")
  rates: tuple[float, ...] = (0.1, 0.5)
  repeats: int = 7  # samples per timing; the median is reported.
  # Each sample repeats the call until it lasts this long (None: 20 ms on CPU,
  # 10 ms elsewhere), so that small arrays are not timed at the clock's grain.
  min_sample_s: float | None = None
  train_rate: float = 0.1  # dropout rate in the MLP.
  # The MLP: input width, hidden widths (each Dense, relu, dropout) and batch.
  # Issue 10's GPU step is --mlp-inputs 4096 --mlp-widths 4096 4096 4096 --mlp-batch 8192.
  mlp_inputs: int = 784
  mlp_widths: tuple[int, ...] = (1024, 1024)
  mlp_batch: int = 256
  # A bf16 transformer block step (2 pre-LN blocks; dropout after attention,
  # in the MLP and after it): batch, sequence, width, heads. Issue 10's GPU
  # step is --block-shape 16 1024 1024 16.
  block_shape: tuple[int, int, int, int] = (4, 128, 256, 4)
  train_repeats: int = 15
  train_min_sample_s: float = 0.1
  fast: bool = True  # also time the fast mode (bits=16).
  # With the fast mode, also time it as one Pallas kernel (a GPU prototype), and
  # hold the GPU targets. None: on a GPU backend. --smoke turns both on, with the
  # kernel in the Pallas interpreter, so that the device call's code runs on CPU.
  gpu_rows: bool | None = None
  interpret: bool = False  # run the Pallas kernel in the interpreter (any backend)
  json: str | None = None  # also write the results here.


QUICK = dict(log2_sizes=(20,), rates=(0.5,), repeats=3, train_repeats=3,
             train_min_sample_s=0.02)
# Every row of a GPU run, at toy shapes, on any backend: a test that the script runs.
SMOKE = dict(log2_sizes=(10,), rates=(0.1,), repeats=2, min_sample_s=1e-4, mlp_inputs=32,
             mlp_widths=(64, 64), mlp_batch=8, block_shape=(2, 8, 32, 2), train_repeats=2,
             train_min_sample_s=1e-4, gpu_rows=True, interpret=True)


# ----------------------------------------------------------------------------
# The variants: each maps a static rate to f(key, x).


def _linen(module: nn.Module) -> Callable:
  return lambda key, x: module.apply({}, x, rngs={"dropout": key})


def gpu_rows(cfg: Config) -> bool:
  """Whether the run adds the Pallas kernel's rows and holds the GPU targets."""
  return jax.default_backend() == "gpu" if cfg.gpu_rows is None else cfg.gpu_rows


class PallasFastDropout(nn.Module):
  """The fast mode as one Pallas kernel (``benchmarks/pallas_dropout.py``) in a linen Dropout's place."""

  rate: float
  deterministic: bool = False
  interpret: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return _pallas_dropout.dropout16(self.make_rng("dropout") if not self.deterministic else None,
                                     x, self.rate, self.deterministic, interpret=self.interpret)


def variants(rate: float, cfg: Config) -> dict[str, Callable]:
  fns = {
      FLOOR: lambda key, x: x * 2.0,
      "jaxdrop.dropout": lambda key, x: jaxdrop.dropout(key, x, rate),
      FAST: lambda key, x: jaxdrop.dropout(key, x, rate, bits=16),
      "jaxdrop.linen.Dropout": _linen(jaxdrop.linen.Dropout(rate, deterministic=False)),
      "jaxdrop.nnx.Dropout": lambda key, x: jaxdrop.nnx.Dropout(rate)(x, rngs=key),
      FLAX: _linen(nn.Dropout(rate, deterministic=False)),
      "flax.nnx.Dropout": lambda key, x: nnx.Dropout(rate, deterministic=False)(x, rngs=key),
  }
  if eqx is not None:
    fns["equinox.nn.Dropout"] = lambda key, x: eqx.nn.Dropout(rate)(x, key=key, inference=False)
  if hk is not None:
    fns["haiku.dropout"] = lambda key, x: hk.dropout(key, rate, x)
  if not cfg.fast:
    del fns[FAST]
  elif gpu_rows(cfg):  # The fast mode as one Pallas (Triton) kernel: a prototype to measure.
    fns[PALLAS_FAST] = lambda key, x: _pallas_dropout.dropout16(key, x, rate,
                                                                interpret=cfg.interpret)
  return fns


def forward_backward(fn: Callable) -> Callable:
  """``(key, x, w) -> grad_x sum(fn(key, x) * w)``."""
  return lambda key, x, w: jax.grad(lambda x: jnp.sum(fn(key, x) * w))(x)


# ----------------------------------------------------------------------------
# Timing.


def _seconds_per_call(fn: Callable, args: tuple, calls: int) -> float:
  start = time.perf_counter()
  for _ in range(calls):
    out = fn(*args)  # Dispatch is asynchronous: calls queue back to back.
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / calls


def interleaved(fns: dict[str, Callable], args: tuple, repeats: int, min_sample_s: float):
  """Per variant: the samples, in seconds per call, taken round-robin."""
  calls = {}
  for name, fn in fns.items():
    jax.block_until_ready(fn(*args))  # Compile (and warm up) first.
    once = _seconds_per_call(fn, args, 1)
    calls[name] = max(1, math.ceil(min_sample_s / max(once, 1e-9)))
  names = list(fns)
  samples = {name: [] for name in names}
  for repeat in range(repeats):
    for i in range(len(names)):
      name = names[(repeat + i) % len(names)]
      samples[name].append(_seconds_per_call(fns[name], args, calls[name]))
  return samples


def bench_elementwise(
    cfg: Config, min_sample_s: float, records: list[dict], save: Callable[[], None]
) -> None:
  key = jax.random.key(0)
  for log2 in cfg.log2_sizes:
    for dtype in cfg.dtypes:
      n = 2**log2
      x = jax.random.normal(jax.random.key(1), (n,), jnp.float32).astype(dtype)
      w = jax.random.normal(jax.random.key(2), (n,), jnp.float32).astype(dtype)
      for rate in cfg.rates:
        fns = variants(rate, cfg)
        for mode, wrap, args in (
            ("fwd", lambda f: f, (key, x)),
            ("fwd+bwd", forward_backward, (key, x, w)),
        ):
          jitted = {name: jax.jit(wrap(fn)) for name, fn in fns.items()}
          samples = interleaved(jitted, args, cfg.repeats, min_sample_s)
          median = {name: float(np.median(s)) for name, s in samples.items()}
          for name in fns:
            records.append(dict(
                log2_size=log2, dtype=dtype, rate=rate, mode=mode, variant=name,
                ms=median[name] * 1e3,
                x_floor=median[name] / median[FLOOR],
                speedup_vs_flax=median[FLAX] / median[name],
                samples_ms=[s * 1e3 for s in samples[name]],
            ))
        print_elementwise([r for r in records if r["log2_size"] == log2
                           and r["dtype"] == dtype and r["rate"] == rate])
        save()


def print_elementwise(records: list[dict]) -> None:
  first = records[0]
  print(f"\nn = 2^{first['log2_size']}, {first['dtype']}, rate {first['rate']}"
        "   (x floor: time / floor's time; vs flax: flax.linen's time / time)")
  print(f"  {'variant':<31}{'fwd ms':>9}{'x floor':>9}{'vs flax':>9}"
        f"{'f+b ms':>10}{'x floor':>9}{'vs flax':>9}")
  by = {(r["variant"], r["mode"]): r for r in records}
  for name in dict.fromkeys(r["variant"] for r in records):
    f, b = by[name, "fwd"], by[name, "fwd+bwd"]
    print(f"  {name:<31}{f['ms']:9.4g}{f['x_floor']:9.2f}{f['speedup_vs_flax']:9.2f}"
          f"{b['ms']:10.4g}{b['x_floor']:9.2f}{b['speedup_vs_flax']:9.2f}")
  sys.stdout.flush()


# ----------------------------------------------------------------------------
# The MLP train step: memory and time.


def _drop(dropout, rate: float, x: jax.Array, train: bool) -> jax.Array:
  """``x`` through ``dropout`` (a linen Dropout class, or None) in the calling module."""
  if dropout is None or not train:
    return x
  return dropout(rate, deterministic=False)(x)


class MLP(nn.Module):
  # A linen Dropout class (PallasFastDropout among them), RELU_DROPOUT
  # (jaxdrop.relu_dropout in place of relu and dropout), or None.
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
        x = _drop(self.dropout, self.rate, nn.relu(h), train)
    return nn.Dense(10)(x)


class Block(nn.Module):
  """Pre-LN transformer blocks: attention, then a GELU MLP, each added back through dropout.

  ``bench_block_step`` varies the elementwise ``dropout``;
  ``bench_attention.py`` varies ``attention_fn`` with attention dropout on.
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

  def _drop(self, x: jax.Array, train: bool) -> jax.Array:
    return _drop(self.dropout, self.rate, x, train)

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
      x = x + self._drop(h, train)
      h = nn.gelu(nn.Dense(4 * width, dtype=self.dtype)(nn.LayerNorm(dtype=self.dtype)(x)))
      if self.hidden_dropout:
        h = self._drop(h, train)
      x = x + self._drop(nn.Dense(width, dtype=self.dtype)(h), train)
    return x


def train_models(cfg: Config) -> dict[str, nn.Module]:
  """The MLP step's variants; ``gpu_rows(cfg)`` adds the Pallas kernel's."""
  mlp = functools.partial(MLP, rate=cfg.train_rate, widths=cfg.mlp_widths)
  models = {
      "no dropout": mlp(None),
      "jaxdrop.linen.Dropout": mlp(jaxdrop.linen.Dropout),
      FLAX: mlp(nn.Dropout),
  }
  if cfg.fast:
    models[FAST_LINEN] = mlp(functools.partial(jaxdrop.linen.Dropout, bits=16))
  models[RELU_DROPOUT] = mlp(RELU_DROPOUT)
  if cfg.fast and gpu_rows(cfg):
    models[PALLAS_FAST] = mlp(functools.partial(PallasFastDropout, interpret=cfg.interpret))
  # Recomputing the dropout outputs under jax.checkpoint (docs/semantics.md).
  policy = jax.checkpoint_policies.save_any_names_but_these(jaxdrop.CHECKPOINT_NAME)
  models[REMAT] = mlp(jaxdrop.linen.Dropout, remat_policy=policy)
  models["no dropout + " + REMAT_POLICY] = mlp(None, remat_policy=policy)
  return models


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


def bench_train_step(cfg: Config) -> dict:
  batch = (
      jax.random.normal(jax.random.key(3), (cfg.mlp_batch, cfg.mlp_inputs), jnp.float32),
      jax.random.randint(jax.random.key(4), (cfg.mlp_batch,), 0, 10),
  )
  widths = "-".join(str(w) for w in (cfg.mlp_inputs, *cfg.mlp_widths, 10))
  title = (f"MLP train step {widths}, batch {cfg.mlp_batch}, Adam, donated; "
           f"dropout rate {cfg.train_rate} after each hidden relu")
  return bench_steps(cfg, train_models(cfg), batch, classification_loss, title)


def bench_block_step(cfg: Config) -> dict:
  batch_size, seq, width, heads = cfg.block_shape
  shape = (batch_size, seq, width)
  batch = (
      jax.random.normal(jax.random.key(3), shape, jnp.float32).astype(jnp.bfloat16),
      jax.random.normal(jax.random.key(4), shape, jnp.float32),
  )
  title = (f"bf16 transformer train step: 2 pre-LN blocks, batch {batch_size}, T {seq}, "
           f"width {width}, {heads} heads, Adam, donated; dropout rate {cfg.train_rate} "
           "after attention, in the MLP and after it")
  return bench_steps(cfg, block_models(cfg), batch, regression_loss, title)


def block_models(cfg: Config) -> dict[str, nn.Module]:
  """The transformer step's variants: 2 bf16 blocks, ``cfg.block_shape``'s heads."""
  block = functools.partial(Block, cfg.block_shape[3], cfg.train_rate, depth=2,
                            dtype=jnp.bfloat16)
  models = {"no dropout": block(dropout=None),
            "jaxdrop.linen.Dropout": block(dropout=jaxdrop.linen.Dropout),
            FLAX: block(dropout=nn.Dropout)}
  if cfg.fast:
    models[FAST_LINEN] = block(dropout=functools.partial(jaxdrop.linen.Dropout, bits=16))
    if gpu_rows(cfg):
      models[PALLAS_FAST] = block(
          dropout=functools.partial(PallasFastDropout, interpret=cfg.interpret))
  return models


def bench_steps(cfg: Config, models: dict[str, nn.Module], batch, loss_of: Callable,
                title: str) -> dict:
  """Temp memory and interleaved step times of each model's donated train step."""
  # One fixed key: the masks do not change the cost, and a per-step fold_in
  # would add a dispatch to every timed call.
  key = jax.random.key(5)
  tx = optax.adam(1e-3)
  memory, states, steps = {}, {}, {}
  for name, model in models.items():
    params = model.init(jax.random.key(6), batch[0], train=False)["params"]
    opt_state = tx.init(params)
    step = make_train_step(model, tx, loss_of)
    stats = step.lower(params, opt_state, batch, key).compile().memory_analysis()
    memory[name] = dict(
        temp_bytes=int(stats.temp_size_in_bytes),
        argument_bytes=int(stats.argument_size_in_bytes),
        output_bytes=int(stats.output_size_in_bytes),
        alias_bytes=int(stats.alias_size_in_bytes),
    )
    states[name], steps[name] = [params, opt_state], step
  base = memory["no dropout"]["temp_bytes"]
  for m in memory.values():
    m["temp_bytes_over_no_dropout"] = m["temp_bytes"] - base

  def run(name: str, count: int) -> float:
    state, step = states[name], steps[name]
    start = time.perf_counter()
    for _ in range(count):
      state[0], state[1], loss = step(state[0], state[1], batch, key)
    jax.block_until_ready(loss)
    return (time.perf_counter() - start) / count

  calls = {}
  for name in steps:
    run(name, 2)  # Compile and warm up.
    calls[name] = max(1, math.ceil(cfg.train_min_sample_s / run(name, 1)))
  names = list(steps)
  samples = {name: [] for name in names}
  for repeat in range(cfg.train_repeats):
    for i in range(len(names)):
      name = names[(repeat + i) % len(names)]
      samples[name].append(run(name, calls[name]))
  median = {name: float(np.median(s)) for name, s in samples.items()}
  timing = {
      name: dict(ms=median[name] * 1e3,
                 x_no_dropout=median[name] / median["no dropout"],
                 samples_ms=[s * 1e3 for s in samples[name]])
      for name in names
  }
  print(f"\n{title}")
  print(f"  {'variant':<38}{'temp bytes':>14}{'vs none':>13}{'step ms':>10}{'x none':>8}")
  for name in names:
    m, t = memory[name], timing[name]
    print(f"  {name:<38}{m['temp_bytes']:14,d}{m['temp_bytes_over_no_dropout']:+13,d}"
          f"{t['ms']:10.4g}{t['x_no_dropout']:8.3f}")
  return dict(memory=memory, time=timing)


# ----------------------------------------------------------------------------
# Targets and metadata.


def check_targets(cfg: Config, records: list[dict], train: dict, gpu: bool) -> list[dict]:
  """The issue's targets, evaluated at the largest size measured.

  Each target is checked for the default mode and, when measured, for the
  fast mode (``bits=16``); the stretch targets are the fast mode's own.
  """
  log2 = max(cfg.log2_sizes)
  by = {(r["variant"], r["dtype"], r["rate"], r["mode"]): r
        for r in records if r["log2_size"] == log2}
  modes = {"jaxdrop.dropout": "jaxdrop.linen.Dropout"}
  if cfg.fast:
    modes[FAST] = FAST_LINEN
  targets = []

  def add(what: str, value: float, bound: float, at_most: bool, stretch=False):
    met = value <= bound if at_most else value >= bound
    targets.append(dict(target=what, value=value, bound=bound, met=bool(met), stretch=stretch))

  fb_bound, flax_bound = (1.1, 3.0) if gpu else (1.5, 6.0)
  for rate in cfg.rates:
    at = f"2^{log2} rate {rate}"
    for name in modes:
      if "float32" in cfg.dtypes:
        fwd = by[name, "float32", rate, "fwd"]
        fb = by[name, "float32", rate, "fwd+bwd"]
        add(f"{name}, fwd f32 {at}: x floor <= 1.5", fwd["x_floor"], 1.5, True)
        add(f"{name}, fwd+bwd f32 {at}: x floor <= {fb_bound}", fb["x_floor"], fb_bound, True)
        add(f"{name}, fwd f32 {at}: speedup vs flax.linen >= {flax_bound:g}",
            fwd["speedup_vs_flax"], flax_bound, False)
        add(f"{name}, fwd+bwd f32 {at}: speedup vs flax.linen >= {flax_bound:g}",
            fb["speedup_vs_flax"], flax_bound, False)
        if name == FAST:
          add(f"stretch, {name}, fwd f32 {at}: x floor <= 1.2", fwd["x_floor"], 1.2,
              True, stretch=True)
          add(f"stretch, {name}, fwd f32 {at}: speedup vs flax.linen >= 8",
              fwd["speedup_vs_flax"], 8.0, False, stretch=True)
      if "bfloat16" in cfg.dtypes:
        bf = by[name, "bfloat16", rate, "fwd"]
        add(f"{name}, fwd bf16 {at}: x floor <= 2.0", bf["x_floor"], 2.0, True)
  for linen in modes.values():
    extra = train["memory"][linen]["temp_bytes_over_no_dropout"]
    add(f"{linen}, MLP step temp bytes added <= 1024", extra, 1024, True)
    ratio = train["time"][linen]["x_no_dropout"]
    add(f"{linen}, MLP step time: x no dropout <= 1.05", ratio, 1.05, True)
  if gpu:
    issue10_targets(cfg, by, log2, train, add)
  print("\nTargets" + (" (GPU bounds)" if gpu else " (CPU bounds)"))
  for t in targets:
    print(f"  {'met    ' if t['met'] else 'NOT MET'}  {t['target']}: {t['value']:.3g}")
  return targets


def issue10_targets(cfg: Config, by: dict, log2: int, train: dict, add: Callable) -> None:
  """Issue 10's GPU targets: flax's time and step memory as bounds, the floor for the fast mode."""
  at = f"2^{log2}"
  for rate in cfg.rates:
    for dtype, mode in (("float32", "fwd+bwd"), ("float32", "fwd"), ("bfloat16", "fwd")):
      if dtype in cfg.dtypes:
        add(f"issue 10, jaxdrop.dropout, {mode} {dtype} {at} rate {rate}: speedup vs flax >= 1",
            by["jaxdrop.dropout", dtype, rate, mode]["speedup_vs_flax"], 1.0, False)
    for name in (FAST, PALLAS_FAST):
      for dtype in ("bfloat16", "float32"):
        if (name, dtype, rate, "fwd") in by:
          add(f"issue 10, {name}, fwd {dtype} {at} rate {rate}: x floor <= 1.1",
              by[name, dtype, rate, "fwd"]["x_floor"], 1.1, True)
  memory, times = train["memory"], train["time"]
  add("issue 10, jaxdrop.linen.Dropout, MLP step temp bytes: x flax <= 1",
      memory["jaxdrop.linen.Dropout"]["temp_bytes"] / memory[FLAX]["temp_bytes"], 1.0, True)
  add(f"issue 10, {REMAT}, MLP step temp bytes: x no dropout <= 1.02",
      memory[REMAT]["temp_bytes"] / memory["no dropout"]["temp_bytes"], 1.02, True)
  add(f"issue 10, {REMAT}, MLP step time: x no dropout <= 1.03",
      times[REMAT]["x_no_dropout"], 1.03, True)


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
    out = subprocess.run(["git", "-C", str(_ROOT), "describe", "--always", "--dirty"],
                         capture_output=True, text=True, timeout=10)
    return out.stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    return None


def metadata() -> dict[str, Any]:
  device = jax.devices()[0]
  return dict(
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      command="python " + " ".join(sys.argv),
      backend=jax.default_backend(),
      device=device.device_kind,
      device_count=jax.device_count(),
      cpu=_cpu_model(),
      cpu_count=os.cpu_count(),
      python=platform_lib.python_version(),
      versions={d: _version(d) for d in (
          "jax", "jaxlib", "flax", "optax", "equinox", "dm-haiku", "numpy")},
      jaxdrop_commit=_git_commit(),
      skipped=[name for name, mod in (("equinox", eqx), ("haiku", hk)) if mod is None],
  )


def parse_args(argv: list[str] | None = None) -> Config:
  defaults = Config()
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--platform", default=defaults.platform, help="cpu or gpu")
  parser.add_argument("--quick", action="store_true", help="a short run: 2^20, rate 0.5")
  parser.add_argument("--smoke", action="store_true",
                      help="every row of a GPU run at toy shapes, on any backend, the Pallas "
                      "kernel in its interpreter (what the tests run; the times mean nothing)")
  parser.add_argument("--log2-sizes", type=int, nargs="+")
  parser.add_argument("--dtypes", nargs="+")
  parser.add_argument("--rates", type=float, nargs="+")
  parser.add_argument("--repeats", type=int)
  parser.add_argument("--no-fast", action="store_true", help="leave out the bits=16 rows")
  parser.add_argument("--mlp-inputs", type=int, help="the MLP's input width")
  parser.add_argument("--mlp-widths", type=int, nargs="+", help="its hidden widths")
  parser.add_argument("--mlp-batch", type=int, help="its batch size")
  parser.add_argument("--block-shape", type=int, nargs=4, metavar=("B", "T", "D", "N"),
                      help="the transformer step's batch, sequence, width and heads")
  parser.add_argument("--json", default=None, help="write the results to this path")
  args = parser.parse_args(argv)
  if args.quick and args.smoke:
    parser.error("--quick and --smoke are two different runs; pass one")
  preset = SMOKE if args.smoke else QUICK if args.quick else {}
  cfg = dataclasses.replace(defaults, **preset)
  overrides = dict(platform=args.platform, json=args.json,
                   fast=cfg.fast and not args.no_fast)
  for field in ("log2_sizes", "dtypes", "rates", "repeats", "mlp_inputs", "mlp_widths",
                "mlp_batch", "block_shape"):
    value = getattr(args, field)
    if value is not None:
      overrides[field] = tuple(value) if isinstance(value, list) else value
  return dataclasses.replace(cfg, **overrides)


def main(argv: list[str] | None = None) -> dict:
  cfg = parse_args(argv)
  if cfg.platform is not None:
    # JAX expands "gpu" to "cuda,rocm" and then fails on the one not installed.
    jax.config.update("jax_platforms", "cuda" if cfg.platform == "gpu" else cfg.platform)
  meta = metadata()
  print(f"jaxdrop benchmark on {meta['device']} ({meta['backend']}; {meta['cpu']}, "
        f"{meta['cpu_count']} cores), jax {meta['versions']['jax']}, "
        f"flax {meta['versions']['flax']}")
  if meta["skipped"]:
    print(f"skipped (not installed): {', '.join(meta['skipped'])}")
  gpu = gpu_rows(cfg)
  min_sample_s = cfg.min_sample_s or (0.02 if meta["backend"] == "cpu" else 0.01)
  start = time.perf_counter()
  results = dict(meta=meta, config=dataclasses.asdict(cfg), elementwise=[])

  def save() -> None:
    meta["seconds"] = round(time.perf_counter() - start, 1)
    if cfg.json:
      Path(cfg.json).write_text(json.dumps(results, indent=1))

  bench_elementwise(cfg, min_sample_s, results["elementwise"], save)
  results["train_step"] = bench_train_step(cfg)
  save()
  results["block_step"] = bench_block_step(cfg)
  save()
  results["targets"] = check_targets(cfg, results["elementwise"], results["train_step"], gpu)
  save()
  print(f"\n{meta['seconds']} s")
  return results


if __name__ == "__main__":
  main()
