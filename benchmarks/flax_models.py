"""Attention in flax models: flax's own ``attention_fn`` against jaxdrop's drop-ins.

Two small models written here in the style of flax's examples (their code is not copied): a
causal language model like ``examples/lm1b`` (token embedding, pre-LN blocks of
``nn.MultiHeadDotProductAttention`` with per-head attention dropout and a ReLU MLP, a causal
mask from ``nn.make_causal_mask``) and a ViT encoder (patch embedding, a class token, so
T = patches + 1, no mask). Each is timed, with attention dropout at the given rate and at 0,
as a train step (Adam, donated) and as an evaluation forward pass, with:

- ``flax``: flax's default ``attention_fn``;
- ``jaxdrop drop-in``: ``attention_fn=jaxdrop.linen.dot_product_attention``, the model
  otherwise unchanged (the language model still passes its materialized causal mask);
- ``jaxdrop is_causal`` (language model only): ``attention_fn=jaxdrop.linen.attention_fn(
  is_causal=True)`` and no mask, the pattern docs/attention.md recommends.

Rows record the median time (``common.interleaved``: the variants of one model, length and
rate take turns), the compiled temp memory and the compile time of each function.

Usage (from the repository root):
  python benchmarks/flax_models.py            # CPU: B 2, T 1024, 1025 and 2048
  python benchmarks/flax_models.py --quick    # smoke run (writes nothing)
A full run writes ``benchmarks/results/flax_models-<backend>.json`` (or ``--json PATH``).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
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
  batch: int = 2
  lengths: tuple[int, ...] = (1024, 1025, 2048)
  rates: tuple[float, ...] = (0.1, 0.0)
  width: int = 256
  heads: int = 4
  depth: int = 2
  vocab: int = 1024
  patch_dim: int = 48  # 4 x 4 patches of 3 channels.
  classes: int = 10
  repeats: int = 5
  min_sample_s: float = 0.3


QUICK = dict(lengths=(33,), rates=(0.1,), width=32, heads=2, depth=1, vocab=64, repeats=2,
             min_sample_s=0.01)


class _EncoderBlock(nn.Module):
  """Pre-LN: attention, then a ReLU MLP, each added back through dropout."""

  heads: int
  attention_rate: float
  attention_fn: Callable[..., jax.Array]
  rate: float = 0.1

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None, train: bool) -> jax.Array:
    h = nn.MultiHeadDotProductAttention(
        self.heads, dropout_rate=self.attention_rate, broadcast_dropout=False,
        deterministic=not train, attention_fn=self.attention_fn,
    )(nn.LayerNorm()(x), mask=mask)
    x = x + nn.Dropout(self.rate, deterministic=not train)(h)
    h = nn.relu(nn.Dense(4 * x.shape[-1])(nn.LayerNorm()(x)))
    h = nn.Dense(x.shape[-1])(nn.Dropout(self.rate, deterministic=not train)(h))
    return x + nn.Dropout(self.rate, deterministic=not train)(h)


class LanguageModel(nn.Module):
  """A decoder-only language model; causal through a mask, or through ``attention_fn``."""

  vocab: int
  width: int
  heads: int
  depth: int
  attention_rate: float
  attention_fn: Callable[..., jax.Array] = nn.dot_product_attention
  causal_mask: bool = True  # False: ``attention_fn`` is causal itself.

  @nn.compact
  def __call__(self, tokens: jax.Array, train: bool) -> jax.Array:
    x = nn.Embed(self.vocab, self.width)(tokens)
    x = x + self.param("position", nn.initializers.normal(0.02), x.shape[1:])
    mask = nn.make_causal_mask(tokens) if self.causal_mask else None
    for _ in range(self.depth):
      x = _EncoderBlock(self.heads, self.attention_rate, self.attention_fn)(x, mask, train)
    return nn.Dense(self.vocab)(nn.LayerNorm()(x))


class VisionTransformer(nn.Module):
  """A ViT encoder over flattened patches, classifying from a prepended class token."""

  classes: int
  width: int
  heads: int
  depth: int
  attention_rate: float
  attention_fn: Callable[..., jax.Array] = nn.dot_product_attention

  @nn.compact
  def __call__(self, patches: jax.Array, train: bool) -> jax.Array:
    x = nn.Dense(self.width)(patches)
    token = self.param("class_token", nn.initializers.zeros, (1, 1, self.width))
    x = jnp.concatenate([jnp.broadcast_to(token, (x.shape[0], 1, self.width)), x], axis=1)
    x = x + self.param("position", nn.initializers.normal(0.02), x.shape[1:])
    for _ in range(self.depth):
      x = _EncoderBlock(self.heads, self.attention_rate, self.attention_fn)(x, None, train)
    return nn.Dense(self.classes)(nn.LayerNorm()(x[:, 0]))


def _models(cfg: Config, rate: float) -> dict[str, dict[str, nn.Module]]:
  """model name -> variant -> module."""
  shared = dict(width=cfg.width, heads=cfg.heads, depth=cfg.depth, attention_rate=rate)
  drop_in = jaxdrop.linen.dot_product_attention
  return {
      "language model": {
          "flax": LanguageModel(cfg.vocab, **shared),
          "jaxdrop drop-in": LanguageModel(cfg.vocab, attention_fn=drop_in, **shared),
          "jaxdrop is_causal": LanguageModel(
              cfg.vocab, attention_fn=jaxdrop.linen.attention_fn(is_causal=True),
              causal_mask=False, **shared),
      },
      "ViT": {
          "flax": VisionTransformer(cfg.classes, **shared),
          "jaxdrop drop-in": VisionTransformer(cfg.classes, attention_fn=drop_in, **shared),
      },
  }


def _batch(cfg: Config, model_name: str, length: int):
  rng = np.random.default_rng(length)
  if model_name == "language model":
    tokens = jnp.asarray(rng.integers(0, cfg.vocab, (cfg.batch, length)), jnp.int32)
    return tokens, jnp.roll(tokens, -1, axis=1)
  # ViT: ``length - 1`` patches and the class token.
  patches = jnp.asarray(rng.normal(size=(cfg.batch, length - 1, cfg.patch_dim)), jnp.float32)
  return patches, jnp.asarray(rng.integers(0, cfg.classes, (cfg.batch,)), jnp.int32)


def _loss(model, params, batch, key):
  inputs, labels = batch
  logits = model.apply({"params": params}, inputs, train=True, rngs={"dropout": key})
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _compiled(jitted: Callable, args: tuple):
  """``jitted`` compiled for ``args``, and the seconds that took (tracing included)."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def _bench_one(cfg: Config, model_name: str, length: int, rate: float) -> list[dict]:
  """Every variant of one model at one length and rate: train step, then eval forward."""
  variants = _models(cfg, rate)[model_name]
  batch = _batch(cfg, model_name, length)
  tx = optax.adam(1e-4)
  key = jax.random.key(3)
  rows, steps, evals = {}, {}, {}
  for name, model in variants.items():
    params = model.init(jax.random.key(2), batch[0], train=False)["params"]
    step_args = (params, tx.init(params), batch, key)
    compiled_step, step_compile_s = _compiled(common.make_train_step(model, tx, _loss),
                                              step_args)
    forward = jax.jit(lambda params, inputs, model=model: model.apply(
        {"params": params}, inputs, train=False))
    eval_params = jax.tree.map(jnp.copy, params)  # The train step donates ``params``.
    compiled_eval, eval_compile_s = _compiled(forward, (eval_params, batch[0]))
    rows[name] = {
        "model": model_name, "length": length, "rate": rate, "variant": name,
        "train_temp_bytes": int(compiled_step.memory_analysis().temp_size_in_bytes),
        "train_compile_s": step_compile_s,
        "eval_temp_bytes": int(compiled_eval.memory_analysis().temp_size_in_bytes),
        "eval_compile_s": eval_compile_s,
    }
    steps[name] = common.DonatedStep(compiled_step, *step_args)
    evals[name] = lambda compiled=compiled_eval, params=eval_params: compiled(params, batch[0])
  for label, calls in (("train_ms", steps), ("eval_ms", evals)):
    samples = common.interleaved(calls, (), cfg.repeats, cfg.min_sample_s)
    for name in calls:
      rows[name][label] = common.median_ms(samples[name])
  return list(rows.values())


def bench_flax_models(cfg: Config) -> list[dict]:
  return [
      row
      for model_name in ("language model", "ViT")
      for length in cfg.lengths
      for rate in cfg.rates
      for row in _bench_one(cfg, model_name, length, rate)
  ]


def print_table(rows: list[dict]) -> None:
  """Each row against flax's at the same model, length and rate."""
  flax = {(r["model"], r["length"], r["rate"]): r for r in rows if r["variant"] == "flax"}
  print("\n| model | T | rate | variant | train ms (× flax) | train temp (× flax) "
        "| eval ms (× flax) | eval temp (× flax) | compile s, train |")
  print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
  for r in rows:
    ref = flax[r["model"], r["length"], r["rate"]]
    ratio = lambda field: r[field] / max(ref[field], 1e-12)
    print(
        f"| {r['model']} | {r['length']} | {r['rate']} | {r['variant']} "
        f"| {r['train_ms']:.1f} ({ratio('train_ms'):.2f}) "
        f"| {r['train_temp_bytes'] / 1e6:.1f} MB ({ratio('train_temp_bytes'):.2f}) "
        f"| {r['eval_ms']:.1f} ({ratio('eval_ms'):.2f}) "
        f"| {r['eval_temp_bytes'] / 1e6:.1f} MB ({ratio('eval_temp_bytes'):.2f}) "
        f"| {r['train_compile_s']:.2f} ({ratio('train_compile_s'):.2f}) |"
    )


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="small shapes, few repeats")
  parser.add_argument("--json", help="write the results here (default: a full run writes "
                      "benchmarks/results/flax_models-<backend>.json; --quick nothing)")
  args = parser.parse_args(argv)
  cfg = Config(**QUICK) if args.quick else Config()
  results = {"config": dataclasses.asdict(cfg), "meta": common.metadata(),
             "flax_models": bench_flax_models(cfg)}
  print_table(results["flax_models"])
  common.write_json(common.results_path(args.json, "flax_models", not args.quick), results)
  return results


if __name__ == "__main__":
  main()
