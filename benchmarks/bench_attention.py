"""Times attention dropout: jaxdrop's implementations against flax, jax.nn and cuDNN.

Timed with ``common.interleaved`` (its module docstring has the method:
compilation excluded, the variants taking turns, a warm-up call before each
sample, medians). Two tables:

1. attention alone, forward and forward+backward (``grad`` of
   ``sum(out * w)`` for query, key and value), with the compiled temp memory
   of forward+backward (``common.attention_variants``): flax's
   ``dot_product_attention`` with per-head dropout (``broadcast_dropout=False``),
   with its default shared mask, and without dropout;
   ``jax.nn.dot_product_attention`` (no dropout argument); jaxdrop's ``"xla"``
   path at the rate and at 0. On a GPU also cuDNN through ``jax.nn``, cuDNN's
   fused dropout through jax's private module (timed only: its mask cannot be
   reproduced), and jaxdrop's ``"pallas"`` kernels at the rate and at 0;
2. a transformer-block train step (flax ``MultiHeadDotProductAttention`` +
   MLP, dropout on the attention weights, after attention and after the MLP,
   Adam) with flax's default ``attention_fn`` against jaxdrop's.

It measures and records; it judges nothing. A variant that fails to compile
is printed and recorded under ``failures`` (the exit status is then 1), and
the run goes on. A full run writes
``benchmarks/results/bench_attention-<backend>.json`` (or ``--json PATH``).

Usage (from the repository root):
  python benchmarks/bench_attention.py                # CPU: B 1, N 8, T = S = 2048, H 64, f32
  python benchmarks/bench_attention.py --quick        # smoke run (writes nothing)
  python benchmarks/bench_attention.py --platform gpu # B 8, N 16, T = S = 2048, H 64, bf16
  python benchmarks/bench_attention.py --platform gpu --causal --length 4096 --no-block
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import common
import jaxdrop


@dataclasses.dataclass(frozen=True)
class Config:
  platform: str | None = None  # "cpu" or "gpu"; None: JAX's default backend.
  batch: int = 1
  heads: int = 8
  length: int = 2048  # T = S.
  head_dim: int = 64
  dtype: str = "float32"
  rate: float = 0.1
  causal: bool = False
  repeats: int = 5
  min_sample_s: float = 0.3
  # The transformer block: width, heads, sequence length, batch.
  block: bool = True
  block_width: int = 256
  block_heads: int = 4
  block_length: int = 512
  block_batch: int = 4


QUICK = dict(length=256, repeats=2, min_sample_s=0.02, block_length=64, block_batch=2)
# The shape of BENCHMARKS.md's GPU attention table; a GPU run starts from it.
GPU = dict(batch=8, heads=16, length=2048, head_dim=64, dtype="bfloat16", min_sample_s=0.05)


def bench_attention(cfg: Config, failures: list[dict]) -> list[dict]:
  q, k, v, key, w = common.attention_inputs(cfg.batch, cfg.length, cfg.heads, cfg.head_dim,
                                            cfg.dtype)
  variants = common.attention_variants(cfg.rate, jax.default_backend() == "gpu", cfg.causal)
  forward = common.compile_each(variants, (q, k, v, key), failures, "fwd")
  both = common.compile_each(
      {name: common.attention_forward_backward(fn) for name, fn in variants.items()},
      (q, k, v, key, w), failures, "fwd+bwd")
  names = [name for name in variants if name in forward and name in both]
  forward_s = common.interleaved({name: forward[name] for name in names}, (q, k, v, key),
                                 cfg.repeats, cfg.min_sample_s)
  both_s = common.interleaved({name: both[name] for name in names}, (q, k, v, key, w),
                              cfg.repeats, cfg.min_sample_s)
  return [
      dict(variant=name, forward_ms=common.median_ms(forward_s[name]),
           forward_backward_ms=common.median_ms(both_s[name]),
           temp_bytes=int(both[name].memory_analysis().temp_size_in_bytes))
      for name in names
  ]


def bench_block(cfg: Config, failures: list[dict]) -> list[dict]:
  shape = (cfg.block_batch, cfg.block_length, cfg.block_width)
  x = jax.random.normal(jax.random.key(1), shape, cfg.dtype)
  key = jax.random.key(3)
  tx = optax.adam(1e-4)
  calls, temp = {}, {}
  for name, fn in {
      "flax default attention_fn": nn.dot_product_attention,
      "jaxdrop.linen.dot_product_attention": jaxdrop.linen.dot_product_attention,
  }.items():
    with common.attempt(f"block step {name}", failures):
      # Dropout on the attention weights and on both residual branches.
      model = common.Block(cfg.block_heads, cfg.rate, attention_fn=fn, attention_dropout=True,
                           hidden_dropout=False, causal=True)
      params = model.init(jax.random.key(2), x, train=False)["params"]

      def step(params, opt_state, x, key, model=model):
        def loss(params):
          y = model.apply({"params": params}, x, train=True, rngs={"dropout": key})
          return jnp.mean(y.astype(jnp.float32) ** 2)

        grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

      # Each step reads its own parameters: the timed functions take no arguments.
      args = (params, tx.init(params), x, key)
      compiled = jax.jit(step).lower(*args).compile()
      calls[name] = functools.partial(compiled, *args)
      temp[name] = int(compiled.memory_analysis().temp_size_in_bytes)
  samples = common.interleaved(calls, (), cfg.repeats, cfg.min_sample_s)
  return [dict(variant=name, step_ms=common.median_ms(samples[name]), temp_bytes=temp[name])
          for name in calls]


def print_tables(cfg: Config, attention: list[dict], block: list[dict]) -> None:
  print(f"\nAttention, B {cfg.batch}, N {cfg.heads}, T = S = {cfg.length}, H {cfg.head_dim}, "
        f"{cfg.dtype}{', causal' if cfg.causal else ''} ({jax.devices()[0].device_kind})")
  print(f"  {'variant':<58}{'fwd ms':>10}{'fwd+bwd ms':>12}{'temp MB':>10}")
  for row in attention:
    print(f"  {row['variant']:<58}{row['forward_ms']:10.4g}{row['forward_backward_ms']:12.4g}"
          f"{row['temp_bytes'] / 1e6:10.1f}")
  if block:
    print(f"\nTransformer-block train step, batch {cfg.block_batch}, T {cfg.block_length}, "
          f"width {cfg.block_width}, {cfg.block_heads} heads, dropout {cfg.rate}")
    print(f"  {'attention_fn':<58}{'step ms':>10}{'temp MB':>12}")
    for row in block:
      print(f"  {row['variant']:<58}{row['step_ms']:10.4g}{row['temp_bytes'] / 1e6:12.1f}")


def parse_args(argv: list[str] | None = None) -> tuple[Config, str | None, bool]:
  """The run's Config, its ``--json``, and whether it is a full run (which writes by default)."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--platform", help="cpu or gpu (a GPU run starts from the GPU shape)")
  parser.add_argument("--quick", action="store_true", help="small shapes, few repeats")
  parser.add_argument("--causal", action="store_true", help="causal attention")
  parser.add_argument("--batch", type=int)
  parser.add_argument("--heads", type=int)
  parser.add_argument("--length", type=int, help="T = S")
  parser.add_argument("--head-dim", type=int)
  parser.add_argument("--dtype")
  parser.add_argument("--rate", type=float)
  parser.add_argument("--no-block", action="store_true", help="leave out the train step")
  parser.add_argument("--json", help="write the results here (default: a full run writes "
                      "benchmarks/results/bench_attention-<backend>.json; --quick nothing)")
  args = parser.parse_args(argv)
  preset = dict(GPU) if args.platform == "gpu" else {}
  if args.quick:
    preset.update(QUICK)
  overrides = {field: getattr(args, field) for field in
               ("platform", "batch", "heads", "length", "head_dim", "dtype", "rate")
               if getattr(args, field) is not None}
  cfg = Config(**{**preset, **overrides, "causal": args.causal, "block": not args.no_block})
  return cfg, args.json, not args.quick


def main(argv: list[str] | None = None) -> dict:
  cfg, json_arg, full = parse_args(argv)
  if cfg.platform is not None:
    # JAX expands "gpu" to "cuda,rocm" and then fails on the one not installed.
    jax.config.update("jax_platforms", "cuda" if cfg.platform == "gpu" else cfg.platform)
  path = common.results_path(json_arg, "bench_attention", full)
  start = time.perf_counter()
  results = dict(config=dataclasses.asdict(cfg), meta=common.metadata(), failures=[])

  def save() -> None:
    results["meta"]["seconds"] = round(time.perf_counter() - start, 1)
    common.write_json(path, results)

  results["attention"] = bench_attention(cfg, results["failures"])
  save()
  if cfg.block:
    results["block"] = bench_block(cfg, results["failures"])
    save()
  print_tables(cfg, results["attention"], results.get("block", []))
  print(f"\n{results['meta']['seconds']} s, {len(results['failures'])} failed"
        + (f"; results in {path}" if path else ""))
  return results


if __name__ == "__main__":
  sys.exit(1 if main()["failures"] else 0)
