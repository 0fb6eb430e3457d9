"""Checks the timer: each variant timed among the others against the same call timed alone.

``common.interleaved`` times functions in turns, as every table does;
``common.alone`` times one function by itself, one waited-for call per sample.
If the harness measures what it claims, the two medians agree for every row. The two
methods alternate, round by round (``_compare``), so the machine's slow and fast
minutes fall on both.
This script times the rows of ``bench.py`` (all variants, fwd and fwd+bwd) and
of ``bench_attention.py`` (attention alone, its CPU shape) both ways and prints the ratio
harness / alone; it records, it does not judge. A full run writes
``benchmarks/results/check_harness-<backend>.json`` (or ``--json PATH``).

Usage (from the repository root):
  python benchmarks/check_harness.py                  # 2^24 float32, rates 0.1 0.5; attention
  python benchmarks/check_harness.py --quick          # small, seconds (writes nothing)
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import common


# Calls per function per round timed alone (after one untimed call).
ALONE_CALLS = 3
# Attention as bench_attention.py times it on CPU, with its repeats and sample length.
ATTENTION = dict(batch=1, heads=8, length=2048, head_dim=64, dtype="float32", rate=0.1,
                 repeats=5, min_sample_s=0.3)
ATTENTION_QUICK = dict(ATTENTION, length=256, repeats=2, min_sample_s=0.02)


def _compare(fns: dict, args: tuple, repeats: int, min_sample_s: float) -> list[dict]:
  """Both methods, in alternating rounds, so that a slow minute of the machine hits both.

  A round is one harness round (every function once, in turns, from a start that rotates
  each round) and then each function alone: ``common.alone``'s untimed call and
  ``ALONE_CALLS`` waited-for calls.
  """
  among = {name: [] for name in fns}
  by_itself = {name: [] for name in fns}
  names = list(fns)
  for round_ in range(repeats):
    rotated = {name: fns[name] for name in names[round_ % len(names):] +
               names[:round_ % len(names)]}
    for name, samples in common.interleaved(rotated, args, 1, min_sample_s).items():
      among[name] += samples
    for name in rotated:
      by_itself[name] += common.alone(fns[name], args, ALONE_CALLS)
  rows = []
  for name in names:
    harness_ms, alone_ms = common.median_ms(among[name]), common.median_ms(by_itself[name])
    rows.append(dict(variant=name, harness_ms=harness_ms, alone_ms=alone_ms,
                     ratio=harness_ms / alone_ms, harness_samples=len(among[name]),
                     alone_samples=len(by_itself[name])))
  return rows


def elementwise(log2_size: int, dtype: str, rates: tuple[float, ...], repeats: int,
                min_sample_s: float) -> list[dict]:
  n = 2**log2_size
  key = jax.random.key(0)
  x = jax.random.normal(jax.random.key(1), (n,), jnp.float32).astype(dtype)
  w = jax.random.normal(jax.random.key(2), (n,), jnp.float32).astype(dtype)
  records = []
  for rate in rates:
    variants = common.elementwise_variants(rate)
    for mode, wrap, args in (("fwd", lambda f: f, (key, x)),
                             ("fwd+bwd", common.forward_backward, (key, x, w))):
      fns = {name: jax.jit(wrap(fn)) for name, fn in variants.items()}
      for row in _compare(fns, args, repeats, min_sample_s):
        records.append(dict(log2_size=log2_size, dtype=dtype, rate=rate, mode=mode, **row))
  return records


def attention(cfg: dict) -> list[dict]:
  """``ATTENTION``'s rows (``cfg``), forward and forward+backward, both ways."""
  q, k, v, key, w = common.attention_inputs(cfg["batch"], cfg["length"], cfg["heads"],
                                            cfg["head_dim"], cfg["dtype"])
  variants = common.attention_variants(cfg["rate"])
  records = []
  for mode, wrap, args in (("fwd", lambda f: f, (q, k, v, key)),
                           ("fwd+bwd", common.attention_forward_backward, (q, k, v, key, w))):
    fns = {name: jax.jit(wrap(fn)) for name, fn in variants.items()}
    records += [dict(mode=mode, **row)
                for row in _compare(fns, args, cfg["repeats"], cfg["min_sample_s"])]
  return records


def _print(title: str, rows: list[dict]) -> None:
  print(f"\n{title}\n  {'variant':<52}{'mode':>8}{'harness ms':>12}{'alone ms':>10}{'ratio':>7}")
  for r in rows:
    print(f"  {r['variant']:<52}{r['mode']:>8}{r['harness_ms']:12.4g}{r['alone_ms']:10.4g}"
          f"{r['ratio']:7.2f}")


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="2^20, rate 0.5, small attention")
  parser.add_argument("--no-attention", action="store_true", help="the elementwise rows only")
  parser.add_argument("--json", help="write the results here (default: a full run writes "
                      "benchmarks/results/check_harness-<backend>.json; --quick nothing)")
  args = parser.parse_args(argv)
  log2, rates, repeats = (20, (0.5,), 3) if args.quick else (24, (0.1, 0.5), 9)
  attention_cfg = ATTENTION_QUICK if args.quick else ATTENTION
  min_sample_s = 0.02 if jax.default_backend() == "cpu" else 0.01
  results = dict(meta=common.metadata(), elementwise=[], attention=[])
  path = common.results_path(args.json, "check_harness", not args.quick)
  results["elementwise"] = elementwise(log2, "float32", rates, repeats, min_sample_s)
  _print(f"Elementwise, 2^{log2} float32 (bench.py's variants)", results["elementwise"])
  common.write_json(path, results)
  if not args.no_attention:
    results["attention_config"] = attention_cfg
    results["attention"] = attention(attention_cfg)
    _print("Attention (bench_attention.py's variants)", results["attention"])
    common.write_json(path, results)
  return results


if __name__ == "__main__":
  main()
