"""Benchmarks attention dropout: jaxdrop's blockwise path against flax and jax.nn.

Timed with ``common.interleaved`` (its module docstring has the method:
compilation excluded, the variants taking turns, a warm-up call before each
sample, medians). Two tables:

1. attention alone, forward and forward+backward (``grad`` of
   ``sum(out * w)`` for query, key and value), with the compiled temp memory
   of forward+backward: flax's ``dot_product_attention`` with per-head dropout
   (``broadcast_dropout=False``), with its default shared mask, and without
   dropout; ``jax.nn.dot_product_attention`` (no dropout argument); jaxdrop's
   ``"xla"`` path at the rate and at 0;
2. a transformer-block train step (flax ``MultiHeadDotProductAttention`` +
   MLP, dropout on the attention weights, after attention and after the MLP,
   Adam) with flax's default ``attention_fn`` against jaxdrop's.

Usage (from the repository root):
  python benchmarks/bench_attention.py                # CPU: B 1, N 8, T = S = 2048, H 64, f32
  python benchmarks/bench_attention.py --quick        # smoke run (writes nothing)
A full run writes ``benchmarks/results/bench_attention-<backend>.json`` (or
``--json PATH``). The GPU measurements (with the Pallas kernel and cuDNN) are
in ``benchmarks/gpu_attention_check.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import common
import jaxdrop


@dataclasses.dataclass(frozen=True)
class Config:
  batch: int = 1
  heads: int = 8
  length: int = 2048  # T = S.
  head_dim: int = 64
  dtype: str = "float32"
  rate: float = 0.1
  repeats: int = 5
  min_sample_s: float = 0.3
  # The transformer block: width, heads, sequence length, batch.
  block_width: int = 256
  block_heads: int = 4
  block_length: int = 512
  block_batch: int = 4


QUICK = dict(length=256, repeats=2, min_sample_s=0.02, block_length=64, block_batch=2)


def attention_variants(rate: float) -> dict[str, Callable]:
  """name -> ``f(q, k, v, key) -> out [B, T, N, H]``."""

  def flax_fn(dropout_rate, broadcast):
    return lambda q, k, v, key: nn.dot_product_attention(
        q, k, v, dropout_rng=key, dropout_rate=dropout_rate,
        broadcast_dropout=broadcast, deterministic=dropout_rate == 0,
    )

  def jaxdrop_fn(dropout_rate):
    return lambda q, k, v, key: jaxdrop.dot_product_attention(
        q, k, v, dropout_rate=dropout_rate, dropout_key=key, implementation="xla"
    )

  return {
      f"flax, per-head dropout {rate}": flax_fn(rate, False),
      f"flax, shared mask (broadcast_dropout=True) {rate}": flax_fn(rate, True),
      "flax, no dropout": flax_fn(0.0, False),
      "jax.nn.dot_product_attention, no dropout": lambda q, k, v, key: jax.nn.dot_product_attention(q, k, v),
      f'jaxdrop "xla", dropout {rate}': jaxdrop_fn(rate),
      'jaxdrop "xla", no dropout': jaxdrop_fn(0.0),
  }


def forward_backward(fn: Callable) -> Callable:
  def loss(q, k, v, key, w):
    return jnp.sum(fn(q, k, v, key).astype(jnp.float32) * w)

  return lambda q, k, v, key, w: jax.grad(loss, argnums=(0, 1, 2))(q, k, v, key, w)


def bench_attention(cfg: Config) -> list[dict]:
  shape = (cfg.batch, cfg.length, cfg.heads, cfg.head_dim)
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=shape), cfg.dtype) for _ in range(3))
  w = jnp.asarray(rng.normal(size=shape), jnp.float32)
  key = jax.random.key(0)
  variants = attention_variants(cfg.rate)
  forward = {name: jax.jit(fn) for name, fn in variants.items()}
  both = {name: jax.jit(forward_backward(fn)) for name, fn in variants.items()}
  forward_s = common.interleaved(forward, (q, k, v, key), cfg.repeats, cfg.min_sample_s)
  both_s = common.interleaved(both, (q, k, v, key, w), cfg.repeats, cfg.min_sample_s)
  return [
      {
          "variant": name,
          "forward_ms": common.median_ms(forward_s[name]),
          "forward_backward_ms": common.median_ms(both_s[name]),
          "temp_bytes": common.temp_bytes(forward_backward(fn), (q, k, v, key, w)),
      }
      for name, fn in variants.items()
  ]


def bench_block(cfg: Config) -> list[dict]:
  shape = (cfg.block_batch, cfg.block_length, cfg.block_width)
  x = jax.random.normal(jax.random.key(1), shape, cfg.dtype)
  tx = optax.adam(1e-4)
  steps, states = {}, {}
  for name, fn in {
      "flax default attention_fn": nn.dot_product_attention,
      "jaxdrop.linen.dot_product_attention": jaxdrop.linen.dot_product_attention,
  }.items():
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

    steps[name] = jax.jit(step)
    states[name] = (params, tx.init(params))
  # Each step reads its own parameters: the timed functions take no arguments.
  calls = {name: functools.partial(steps[name], *states[name], x, jax.random.key(3))
           for name in steps}
  samples = common.interleaved(calls, (), cfg.repeats, cfg.min_sample_s)
  return [
      {
          "variant": name,
          "step_ms": common.median_ms(samples[name]),
          "temp_bytes": common.temp_bytes(steps[name], (*states[name], x, jax.random.key(3))),
      }
      for name in steps
  ]


def print_tables(cfg: Config, attention: list[dict], block: list[dict]) -> None:
  base = attention[0]
  print(
      f"\nAttention, B {cfg.batch}, N {cfg.heads}, T = S = {cfg.length}, H {cfg.head_dim}, "
      f"{cfg.dtype} ({jax.devices()[0].device_kind}); ratios against the first row\n"
  )
  print("| variant | forward | forward+backward | fwd+bwd temp memory |")
  print("|---|---|---|---|")
  for row in attention:
    print(
        f"| {row['variant']} | {row['forward_ms']:.2f} ms | "
        f"{row['forward_backward_ms']:.2f} ms ({row['forward_backward_ms'] / base['forward_backward_ms']:.2f}x) | "
        f"{row['temp_bytes'] / 2**20:.1f} MiB (1/{base['temp_bytes'] / max(row['temp_bytes'], 1):.1f}) |"
    )
  print(
      f"\nTransformer-block train step, batch {cfg.block_batch}, T {cfg.block_length}, "
      f"width {cfg.block_width}, {cfg.block_heads} heads, dropout {cfg.rate} everywhere\n"
  )
  print("| attention_fn | step | temp memory |")
  print("|---|---|---|")
  for row in block:
    print(f"| {row['variant']} | {row['step_ms']:.2f} ms | {row['temp_bytes'] / 2**20:.1f} MiB |")


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="small shapes, few repeats")
  parser.add_argument("--json", help="write the results here (default: a full run writes "
                      "benchmarks/results/bench_attention-<backend>.json; --quick nothing)")
  args = parser.parse_args(argv)
  cfg = Config(**QUICK) if args.quick else Config()
  results = {
      "config": dataclasses.asdict(cfg),
      "meta": common.metadata(),
      "attention": bench_attention(cfg),
      "block": bench_block(cfg),
  }
  print_tables(cfg, results["attention"], results["block"])
  common.write_json(common.results_path(args.json, "bench_attention", not args.quick), results)
  return results


if __name__ == "__main__":
  main()
