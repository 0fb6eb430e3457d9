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

It measures and records; it judges nothing. A row that fails to build or
compile is printed and recorded under ``failures`` (the exit status is then 1),
and the run goes on. A full run writes
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
import sys
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import common
from common import FLAX, FLOOR, NO_DROPOUT


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
# The elementwise rows.


def gpu_rows(cfg: Config) -> bool:
  """Whether the run adds the Pallas kernel's rows."""
  return jax.default_backend() == "gpu" if cfg.gpu_rows is None else cfg.gpu_rows


def bench_elementwise(cfg: Config, min_sample_s: float, records: list[dict],
                      failures: list[dict], save: Callable[[], None]) -> None:
  key = jax.random.key(0)
  for log2 in cfg.log2_sizes:
    for dtype in cfg.dtypes:
      n = 2**log2
      x = jax.random.normal(jax.random.key(1), (n,), jnp.float32).astype(dtype)
      w = jax.random.normal(jax.random.key(2), (n,), jnp.float32).astype(dtype)
      for rate in cfg.rates:
        fns = common.elementwise_variants(rate, cfg.fast, gpu_rows(cfg), cfg.interpret)
        for mode, wrap, args in (
            ("fwd", lambda f: f, (key, x)),
            ("fwd+bwd", common.forward_backward, (key, x, w)),
        ):
          compiled = common.compile_each({name: wrap(fn) for name, fn in fns.items()}, args,
                                         failures, f"2^{log2} {dtype} rate {rate} {mode}")
          samples = common.interleaved(compiled, args, cfg.repeats, min_sample_s)
          for name, s in samples.items():
            records.append(dict(log2_size=log2, dtype=dtype, rate=rate, mode=mode, variant=name,
                                ms=common.median_ms(s), samples_ms=[t * 1e3 for t in s]))
        print_elementwise([r for r in records if r["log2_size"] == log2
                           and r["dtype"] == dtype and r["rate"] == rate])
        save()


def print_elementwise(records: list[dict]) -> None:
  if not records:  # Every variant failed (printed above).
    return
  first = records[0]
  print(f"\nn = 2^{first['log2_size']}, {first['dtype']}, rate {first['rate']}"
        "   (x floor: time / floor's time; vs flax: flax.linen's time / time)")
  print(f"  {'variant':<31}{'fwd ms':>9}{'x floor':>9}{'vs flax':>9}"
        f"{'f+b ms':>10}{'x floor':>9}{'vs flax':>9}")
  ms = {(r["variant"], r["mode"]): r["ms"] for r in records}
  nan = float("nan")
  for name in dict.fromkeys(r["variant"] for r in records):
    cells = ""
    for mode, width in (("fwd", 9), ("fwd+bwd", 10)):
      t = ms.get((name, mode), nan)
      floor, flax = ms.get((FLOOR, mode), nan), ms.get((FLAX, mode), nan)
      cells += f"{t:{width}.4g}{t / floor:9.2f}{flax / t:9.2f}"
    print(f"  {name:<31}{cells}")
  sys.stdout.flush()


# ----------------------------------------------------------------------------
# The train steps: memory and time.


def bench_train_step(cfg: Config, failures: list[dict]) -> dict:
  batch = (
      jax.random.normal(jax.random.key(3), (cfg.mlp_batch, cfg.mlp_inputs), jnp.float32),
      jax.random.randint(jax.random.key(4), (cfg.mlp_batch,), 0, 10),
  )
  widths = "-".join(str(w) for w in (cfg.mlp_inputs, *cfg.mlp_widths, 10))
  title = (f"MLP train step {widths}, batch {cfg.mlp_batch}, Adam, donated; "
           f"dropout rate {cfg.train_rate} after each hidden relu")
  models = common.mlp_models(cfg.train_rate, cfg.mlp_widths, cfg.fast, gpu_rows(cfg),
                             cfg.interpret)
  return bench_steps(cfg, models, batch, common.classification_loss, title, failures)


def bench_block_step(cfg: Config, failures: list[dict]) -> dict:
  batch_size, seq, width, heads = cfg.block_shape
  shape = (batch_size, seq, width)
  batch = (
      jax.random.normal(jax.random.key(3), shape, jnp.float32).astype(jnp.bfloat16),
      jax.random.normal(jax.random.key(4), shape, jnp.float32),
  )
  title = (f"bf16 transformer train step: 2 pre-LN blocks, batch {batch_size}, T {seq}, "
           f"width {width}, {heads} heads, Adam, donated; dropout rate {cfg.train_rate} "
           "after attention, in the MLP and after it")
  models = common.block_models(heads, cfg.train_rate, cfg.fast, gpu_rows(cfg), cfg.interpret)
  return bench_steps(cfg, models, batch, common.regression_loss, title, failures)


def bench_steps(cfg: Config, models: dict[str, nn.Module], batch, loss_of: Callable,
                title: str, failures: list[dict]) -> dict:
  """Temp memory and interleaved step times of each model's donated train step."""
  # One fixed key: the masks do not change the cost, and a per-step fold_in
  # would add a dispatch to every timed call.
  key = jax.random.key(5)
  tx = optax.adam(1e-3)
  memory, steps = {}, {}
  for name, model in models.items():
    with common.attempt(f"train step {name}", failures):
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
  samples = common.interleaved(steps, (), cfg.train_repeats, cfg.train_min_sample_s)
  timing = {name: dict(ms=common.median_ms(s), samples_ms=[t * 1e3 for t in s])
            for name, s in samples.items()}
  base = memory.get(NO_DROPOUT, {}).get("temp_bytes")
  base_ms = timing.get(NO_DROPOUT, {}).get("ms", float("nan"))
  print(f"\n{title}")
  print(f"  {'variant':<38}{'temp bytes':>14}{'vs none':>13}{'step ms':>10}{'x none':>8}")
  for name in steps:
    m, t = memory[name], timing[name]
    over = f"{m['temp_bytes'] - base:+13,d}" if base is not None else f"{'?':>13}"
    print(f"  {name:<38}{m['temp_bytes']:14,d}{over}{t['ms']:10.4g}{t['ms'] / base_ms:8.3f}")
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
  meta["skipped"] = common.missing_competitors()
  print(f"jaxdrop benchmark on {meta['device']} ({meta['backend']}; {meta['cpu']}, "
        f"{meta['cpu_count']} cores), jax {meta['versions']['jax']}, "
        f"flax {meta['versions']['flax']}")
  if meta["skipped"]:
    print(f"skipped (not installed): {', '.join(meta['skipped'])}")
  min_sample_s = cfg.min_sample_s or (0.02 if meta["backend"] == "cpu" else 0.01)
  path = common.results_path(cfg.json, "bench", full)
  start = time.perf_counter()
  results = dict(meta=meta, config=dataclasses.asdict(cfg), elementwise=[], failures=[])

  def save() -> None:
    meta["seconds"] = round(time.perf_counter() - start, 1)
    common.write_json(path, results)

  failures = results["failures"]
  bench_elementwise(cfg, min_sample_s, results["elementwise"], failures, save)
  results["train_step"] = bench_train_step(cfg, failures)
  save()
  results["block_step"] = bench_block_step(cfg, failures)
  save()
  print(f"\n{meta['seconds']} s, {len(failures)} failed" + (f"; results in {path}" if path else ""))
  return results


if __name__ == "__main__":
  sys.exit(1 if main()["failures"] else 0)
