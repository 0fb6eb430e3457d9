"""Times jaxdrop's elementwise dropout against flax, equinox and haiku, and the memory floor.

Timed with ``common.interleaved`` (see its module docstring: compilation
excluded, functions taking turns, a warm-up call before each sample, medians):

1. forward ``f(key, x)`` and forward+backward ``grad_x sum(f(key, x) * w)``
   for every variant, size, dtype and rate. ``x * 2.0`` is the floor: one read
   and one write, what any elementwise op must pay (its backward, ``2 * w``,
   is one read and one write too);
2. temp bytes (``memory_analysis()``) of a donated, jitted MLP train step
   (784-1024-1024-10, batch 256 unless --mlp-* say otherwise; Adam, dropout
   after each hidden relu, or relu_dropout in place of both), and its time;
3. the same two for a bf16 transformer train step (``--block-shape``).

It measures and records; it judges nothing. A full run writes
``benchmarks/results/bench-<backend>.json`` (or ``--json PATH``), with the
device, versions, commit and command; ``benchmarks/report.py`` makes
BENCHMARKS.md's tables from it.

Usage (from the repository root):
  python benchmarks/bench.py                          # CPU, a few minutes
  python benchmarks/bench.py --quick                  # a short run, seconds (writes nothing)
  python benchmarks/bench.py --smoke                  # every GPU row at toy shapes (writes nothing)
  python benchmarks/bench.py --platform gpu --log2-sizes 28 --rates 0.1

equinox and dm-haiku (``pip install -e .[bench]``) are optional: their rows
are skipped when they are not installed. The ``bits=16`` rows are jaxdrop's
fast mode (four 16-bit decisions per hash); ``--no-fast`` leaves them out. On
a GPU (or with ``--smoke``) the fast mode also runs as one Pallas kernel
(``pallas_dropout.py``), a prototype that nothing in the library chooses.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import common
import jaxdrop
import pallas_dropout

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
PALLAS_FAST = "pallas kernel bits=16"


@dataclasses.dataclass(frozen=True)
class Config:
  platform: str | None = None  # "cpu" or "gpu"; None: JAX's default backend.
  # Elements: 2**24, 2**22, 2**20; largest first, so that a run cut short by a
  # time limit has the headline numbers (the JSON is written after each).
  log2_sizes: tuple[int, ...] = (24, 22, 20)
  dtypes: tuple[str, ...] = ("float32", "bfloat16")
  rates: tuple[float, ...] = (0.1, 0.5)
  repeats: int = 7  # samples per timing; the median is reported.
  # A sample repeats the call until it lasts this long (None: 20 ms on CPU,
  # 10 ms elsewhere), so that small arrays are not timed at the clock's grain.
  min_sample_s: float | None = None
  train_rate: float = 0.1  # dropout rate in the train steps.
  # The MLP: input width, hidden widths (each Dense, relu, dropout) and batch.
  mlp_inputs: int = 784
  mlp_widths: tuple[int, ...] = (1024, 1024)
  mlp_batch: int = 256
  # A bf16 transformer step (2 pre-LN blocks; dropout after attention, in the
  # MLP and after it): batch, sequence, width, heads.
  block_shape: tuple[int, int, int, int] = (4, 128, 256, 4)
  train_repeats: int = 15
  train_min_sample_s: float = 0.1
  fast: bool = True  # also time the fast mode (bits=16).
  # With the fast mode, also time it as one Pallas kernel (a GPU prototype).
  # None: on a GPU backend. --smoke turns it on with the kernel in the Pallas
  # interpreter, so that a GPU run's code runs on CPU.
  gpu_rows: bool | None = None
  interpret: bool = False  # run the Pallas kernel in the interpreter (any backend)
  json: str | None = None  # write the results here (a full run: benchmarks/results/)


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
  """Whether the run adds the Pallas kernel's rows."""
  return jax.default_backend() == "gpu" if cfg.gpu_rows is None else cfg.gpu_rows


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
  elif gpu_rows(cfg):
    fns[PALLAS_FAST] = lambda key, x: pallas_dropout.dropout16(key, x, rate,
                                                               interpret=cfg.interpret)
  return fns


def forward_backward(fn: Callable) -> Callable:
  """``(key, x, w) -> grad_x sum(fn(key, x) * w)``."""
  return lambda key, x, w: jax.grad(lambda x: jnp.sum(fn(key, x) * w))(x)


def bench_elementwise(cfg: Config, min_sample_s: float, records: list[dict],
                      save: Callable[[], None]) -> None:
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
          samples = common.interleaved(jitted, args, cfg.repeats, min_sample_s)
          median = {name: common.median_ms(s) for name, s in samples.items()}
          for name in fns:
            records.append(dict(
                log2_size=log2, dtype=dtype, rate=rate, mode=mode, variant=name,
                ms=median[name],
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
# The train steps: memory and time.


def train_models(cfg: Config) -> dict[str, nn.Module]:
  """The MLP step's variants; ``gpu_rows(cfg)`` adds the Pallas kernel's."""
  mlp = functools.partial(common.MLP, rate=cfg.train_rate, widths=cfg.mlp_widths)
  models = {
      "no dropout": mlp(None),
      "jaxdrop.linen.Dropout": mlp(jaxdrop.linen.Dropout),
      FLAX: mlp(nn.Dropout),
  }
  if cfg.fast:
    models[FAST_LINEN] = mlp(functools.partial(jaxdrop.linen.Dropout, bits=16))
  models[common.RELU_DROPOUT] = mlp(common.RELU_DROPOUT)
  if cfg.fast and gpu_rows(cfg):
    models[PALLAS_FAST] = mlp(functools.partial(pallas_dropout.Dropout, interpret=cfg.interpret))
  # Recomputing the dropout outputs under jax.checkpoint (docs/semantics.md).
  policy = jax.checkpoint_policies.save_any_names_but_these(jaxdrop.CHECKPOINT_NAME)
  models[REMAT] = mlp(jaxdrop.linen.Dropout, remat_policy=policy)
  models["no dropout + " + REMAT_POLICY] = mlp(None, remat_policy=policy)
  return models


def block_models(cfg: Config) -> dict[str, nn.Module]:
  """The transformer step's variants: 2 bf16 blocks, ``cfg.block_shape``'s heads."""
  block = functools.partial(common.Block, cfg.block_shape[3], cfg.train_rate, depth=2,
                            dtype=jnp.bfloat16)
  models = {"no dropout": block(dropout=None),
            "jaxdrop.linen.Dropout": block(dropout=jaxdrop.linen.Dropout),
            FLAX: block(dropout=nn.Dropout)}
  if cfg.fast:
    models[FAST_LINEN] = block(dropout=functools.partial(jaxdrop.linen.Dropout, bits=16))
    if gpu_rows(cfg):
      models[PALLAS_FAST] = block(
          dropout=functools.partial(pallas_dropout.Dropout, interpret=cfg.interpret))
  return models


def bench_train_step(cfg: Config) -> dict:
  batch = (
      jax.random.normal(jax.random.key(3), (cfg.mlp_batch, cfg.mlp_inputs), jnp.float32),
      jax.random.randint(jax.random.key(4), (cfg.mlp_batch,), 0, 10),
  )
  widths = "-".join(str(w) for w in (cfg.mlp_inputs, *cfg.mlp_widths, 10))
  title = (f"MLP train step {widths}, batch {cfg.mlp_batch}, Adam, donated; "
           f"dropout rate {cfg.train_rate} after each hidden relu")
  return bench_steps(cfg, train_models(cfg), batch, common.classification_loss, title)


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
  return bench_steps(cfg, block_models(cfg), batch, common.regression_loss, title)


def bench_steps(cfg: Config, models: dict[str, nn.Module], batch, loss_of: Callable,
                title: str) -> dict:
  """Temp memory and interleaved step times of each model's donated train step."""
  # One fixed key: the masks do not change the cost, and a per-step fold_in
  # would add a dispatch to every timed call.
  key = jax.random.key(5)
  tx = optax.adam(1e-3)
  memory, steps = {}, {}
  for name, model in models.items():
    params = model.init(jax.random.key(6), batch[0], train=False)["params"]
    opt_state = tx.init(params)
    step = common.make_train_step(model, tx, loss_of)
    stats = step.lower(params, opt_state, batch, key).compile().memory_analysis()
    memory[name] = dict(
        temp_bytes=int(stats.temp_size_in_bytes),
        argument_bytes=int(stats.argument_size_in_bytes),
        output_bytes=int(stats.output_size_in_bytes),
        alias_bytes=int(stats.alias_size_in_bytes),
    )
    steps[name] = common.DonatedStep(step, params, opt_state, batch, key)
  base = memory["no dropout"]["temp_bytes"]
  for m in memory.values():
    m["temp_bytes_over_no_dropout"] = m["temp_bytes"] - base
  samples = common.interleaved(steps, (), cfg.train_repeats, cfg.train_min_sample_s)
  median = {name: common.median_ms(s) for name, s in samples.items()}
  timing = {
      name: dict(ms=median[name], x_no_dropout=median[name] / median["no dropout"],
                 samples_ms=[s * 1e3 for s in samples[name]])
      for name in steps
  }
  print(f"\n{title}")
  print(f"  {'variant':<38}{'temp bytes':>14}{'vs none':>13}{'step ms':>10}{'x none':>8}")
  for name in steps:
    m, t = memory[name], timing[name]
    print(f"  {name:<38}{m['temp_bytes']:14,d}{m['temp_bytes_over_no_dropout']:+13,d}"
          f"{t['ms']:10.4g}{t['x_no_dropout']:8.3f}")
  return dict(title=title, memory=memory, time=timing)


# ----------------------------------------------------------------------------
# The command line.


def parse_args(argv: list[str] | None = None) -> tuple[Config, bool]:
  """The run's Config, and whether it is a full run (which writes its JSON by default)."""
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
  parser.add_argument("--json", default=None,
                      help="write the results here (default: a full run writes "
                      "benchmarks/results/bench-<backend>.json; --quick and --smoke nothing)")
  args = parser.parse_args(argv)
  if args.quick and args.smoke:
    parser.error("--quick and --smoke are two different runs; pass one")
  preset = SMOKE if args.smoke else QUICK if args.quick else {}
  cfg = dataclasses.replace(defaults, **preset)
  overrides = dict(platform=args.platform, json=args.json, fast=cfg.fast and not args.no_fast)
  for field in ("log2_sizes", "dtypes", "rates", "repeats", "mlp_inputs", "mlp_widths",
                "mlp_batch", "block_shape"):
    value = getattr(args, field)
    if value is not None:
      overrides[field] = tuple(value) if isinstance(value, list) else value
  return dataclasses.replace(cfg, **overrides), not preset


def main(argv: list[str] | None = None) -> dict:
  cfg, full = parse_args(argv)
  if cfg.platform is not None:
    # JAX expands "gpu" to "cuda,rocm" and then fails on the one not installed.
    jax.config.update("jax_platforms", "cuda" if cfg.platform == "gpu" else cfg.platform)
  meta = common.metadata()
  meta["skipped"] = [name for name, mod in (("equinox", eqx), ("haiku", hk)) if mod is None]
  print(f"jaxdrop benchmark on {meta['device']} ({meta['backend']}; {meta['cpu']}, "
        f"{meta['cpu_count']} cores), jax {meta['versions']['jax']}, "
        f"flax {meta['versions']['flax']}")
  if meta["skipped"]:
    print(f"skipped (not installed): {', '.join(meta['skipped'])}")
  min_sample_s = cfg.min_sample_s or (0.02 if meta["backend"] == "cpu" else 0.01)
  path = common.results_path(cfg.json, "bench", full)
  start = time.perf_counter()
  results = dict(meta=meta, config=dataclasses.asdict(cfg), elementwise=[])

  def save() -> None:
    meta["seconds"] = round(time.perf_counter() - start, 1)
    common.write_json(path, results)

  bench_elementwise(cfg, min_sample_s, results["elementwise"], save)
  results["train_step"] = bench_train_step(cfg)
  save()
  results["block_step"] = bench_block_step(cfg)
  save()
  print(f"\n{meta['seconds']} s" + (f"; results in {path}" if path else ""))
  return results


if __name__ == "__main__":
  main()
