"""Times each Pallas attention kernel alone: where the time goes, and what the tiles change.

The kernels are jaxdrop's own (``jaxdrop._attention.pallas_triton``, private):
the forward, the dq and the dk/dv kernel, each compiled alone on the padded
operands, the backward kernels given the forward's residuals (XLA drops a
kernel whose outputs are unused, so "dq" and "dk/dv" are one kernel each).
The kernels of one table take turns under ``common.interleaved``.

1. The profile: each kernel at the default tiles, B 8, N 16, T = S = 2048,
   H 64, bfloat16, at rates 0 and 0.1. The rate-0.1 / rate-0 ratio is what the
   mask (hash and select) costs a kernel; TFLOP/s counts the kernel's own
   matmuls, recomputation included: forward 4, dq 6, dk/dv 8 times B N T S H
   (H as padded for the kernels).
2. The tiles (``--tiles``, minutes on an H100): each kernel under each
   candidate of ``FORWARD_TILES`` and ``BACKWARD_TILES`` (the first of each is
   the default), at H 64 and H 128 and causal T = S = 4096, rates 0 and 0.1
   (the backward kernels at rate 0 at H 64 only). Each row records the largest
   difference of its outputs from the default tiles' outputs: the mask does
   not depend on the tiles, so that is bfloat16 rounding.

It measures and records; it picks nothing. An item that fails is printed and
recorded under ``failures`` (the exit status is then 1), and the run goes on;
the JSON is written after each item. A full run writes
``benchmarks/results/tune_attention-<backend>.json`` (or ``--json PATH``);
``python benchmarks/report.py FILE`` prints its tables.

Usage (from the repository root, on an NVIDIA GPU):
  python benchmarks/tune_attention.py            # the profile
  python benchmarks/tune_attention.py --tiles    # the profile, then the tile candidates
  python benchmarks/tune_attention.py --smoke --tiles   # tiny shapes in the Pallas
                                                        # interpreter, any backend (no file)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import common
from jaxdrop._attention import base
from jaxdrop._attention import pallas_triton as pt


@dataclasses.dataclass(frozen=True)
class Settings:
  batch: int = 8
  heads: int = 16
  length: int = 2048  # T = S of the profile and of the non-causal tile cases
  head_dim: int = 64
  causal_length: int = 4096  # T = S of the causal tile case
  rates: tuple[float, ...] = (0.0, 0.1)
  repeats: int = 7
  min_sample_s: float = 0.01
  interpret: bool = False  # the Pallas interpreter (any backend; slow)
  blocks: pt.BlockSizes | None = None  # the tiles of the profile; None: the kernels' defaults
  candidates: int | None = None  # only the first this many tile candidates of each kind


# H 24 runs the kernels zero-padded to 32, through the same code as a GPU run's H 64.
SMOKE = Settings(batch=1, heads=2, length=64, head_dim=24, causal_length=64, repeats=2,
                 min_sample_s=1e-4, interpret=True,
                 blocks=pt.BlockSizes(q=16, k=16, q_dkv=16, k_dkv=16, q_dq=16, k_dq=16),
                 candidates=2)

# Tile candidates: (q, k, warps, stages) of the forward kernel, and (q_dkv, k_dkv,
# q_dq, k_dq, warps, stages) of the two backward kernels. The first of each is
# the default (None: the kernels pick); docs/performance.md has their history.
FORWARD_TILES = (
    (64, 64, None, None), (64, 64, None, 2), (64, 64, 8, 2), (128, 64, None, 2),
    (128, 64, 4, 2), (128, 64, 4, 3), (64, 128, 4, 2), (128, 128, 8, 2), (128, 32, 4, 2),
    (64, 32, 4, 2), (32, 64, 4, 2),
)
BACKWARD_TILES = (
    (64, 64, 64, 64, None, None), (64, 64, 64, 64, None, 2), (64, 64, 64, 64, 8, 2),
    (32, 64, 64, 32, 4, 2), (64, 128, 128, 64, 8, 2), (32, 128, 128, 32, 4, 2),
    (128, 64, 64, 128, 8, 2), (32, 32, 32, 32, 4, 2),
)
# Matmul FLOPs per B N T S H of each kernel, recomputation included.
WORK = {"forward": 4, "dq": 6, "dk/dv": 8}


def inputs(settings: Settings, length: int, head_dim: int) -> tuple[jax.Array, ...]:
  """q, k, v and the output's cotangent, ``[B, T, N, H]`` bfloat16."""
  keys = jax.random.split(jax.random.key(2), 4)
  shape = (settings.batch, length, settings.heads, head_dim)
  return tuple(jax.random.normal(key, shape, jnp.bfloat16) for key in keys)


def attention_config(settings: Settings, head_dim: int, causal: bool, rate: float
                     ) -> base.Config:
  return base.Config(scale=1 / math.sqrt(head_dim), is_causal=causal,
                     dropout_heads=(settings.batch, settings.heads), fixed_rate=rate)


def kernels_alone(settings: Settings, qkvd: tuple[jax.Array, ...], config: base.Config,
                  blocks: pt.BlockSizes | None, names: tuple[str, ...]
                  ) -> tuple[int, dict[str, tuple[Callable, tuple]]]:
  """The padded head dim, and ``{name: (kernel, its arguments)}`` for ``names``."""
  q, k, v, d_out = qkvd
  key_data = jax.random.key_data(jax.random.key(1234))
  st, operands = pt.prepare(q, k, v, None, None, key_data, None, config, blocks,
                            settings.interpret)
  forward = functools.partial(pt._forward, st)
  kernels = {"forward": (forward, operands)}
  if set(names) - {"forward"}:
    residuals = (*operands, *jax.jit(forward)(*operands))
    d_out = base.pad_axis(base.pad_axis(d_out, 1, st.rows_p), 3, st.head_dim)
    kernels["dq"] = (lambda r, d: pt._backward(st, r, d)[0], (residuals, d_out))
    kernels["dk/dv"] = (lambda r, d: pt._backward(st, r, d)[1:3], (residuals, d_out))
  return st.head_dim, {name: kernels[name] for name in names}


def compiled_calls(kernels: dict[str, tuple[Callable, tuple]]) -> dict[str, Callable]:
  """Each kernel compiled for its arguments, as a function of none (``interleaved``'s form)."""
  return {name: functools.partial(jax.jit(fn).lower(*args).compile(), *args)
          for name, (fn, args) in kernels.items()}


def profile(settings: Settings, rows: list[dict], failures: list[dict],
            save: Callable[[], None]) -> None:
  b, n, t, h = settings.batch, settings.heads, settings.length, settings.head_dim
  qkvd = inputs(settings, t, h)
  for rate in settings.rates:
    with common.attempt(f"profile, rate {rate}", failures):
      head_dim, kernels = kernels_alone(settings, qkvd, attention_config(settings, h, False, rate),
                                        settings.blocks, tuple(WORK))
      calls = compiled_calls(kernels)
      samples = common.interleaved(calls, (), settings.repeats, settings.min_sample_s)
      for name, s in samples.items():
        seconds = float(np.median(s))
        tflops = WORK[name] * b * n * t * t * head_dim / seconds / 1e12
        rows.append(dict(kernel=name, rate=rate, ms=seconds * 1e3, tflops=round(tflops)))
        print(f"  {name:<8} rate {rate:<4} {seconds * 1e3:9.3f} ms {tflops:7.1f} TFLOP/s",
              flush=True)
    save()


def candidates(settings: Settings, part: str) -> list[pt.BlockSizes]:
  """The tile candidates of ``part`` ("forward" or "backward"), the default first."""
  if part == "forward":
    tiles = [pt.BlockSizes(q=q, k=k, num_warps=w, num_stages=s) for q, k, w, s in FORWARD_TILES]
  else:
    tiles = [pt.BlockSizes(q_dkv=a, k_dkv=b, q_dq=c, k_dq=d, num_warps=w, num_stages=s)
             for a, b, c, d, w, s in BACKWARD_TILES]
  tiles = tiles[:settings.candidates]
  if settings.blocks is not None:  # a smoke run: its own tiles, each candidate's launch options
    tiles = [settings.blocks._replace(num_warps=c.num_warps, num_stages=c.num_stages)
             for c in tiles]
  return tiles


def label(part: str, blocks: pt.BlockSizes) -> str:
  tiles = (f"fwd {blocks.q}x{blocks.k}" if part == "forward" else
           f"dkv {blocks.q_dkv}x{blocks.k_dkv} dq {blocks.q_dq}x{blocks.k_dq}")
  return f"{tiles} warps {blocks.num_warps} stages {blocks.num_stages}"


def max_difference(got, want) -> float:
  return max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
             for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


def tiles(settings: Settings, rows: list[dict], failures: list[dict],
          save: Callable[[], None]) -> None:
  h = settings.head_dim
  cases = [(h, settings.length, False), (2 * h, settings.length, False),
           (h, settings.causal_length, True)]
  rates = settings.rates
  if settings.interpret:  # a smoke run: one case, one rate
    cases, rates = cases[:1], rates[-1:]
  for head_dim, t, causal in cases:
    case = f"{'causal ' if causal else ''}T = S = {t}, H {head_dim}"
    qkvd = inputs(settings, t, head_dim)
    for rate in rates:
      config = attention_config(settings, head_dim, causal, rate)
      parts = ["forward"]
      if rate or (head_dim == h and not causal):
        parts.append("backward")
      for part in parts:
        names = ("forward",) if part == "forward" else ("dq", "dk/dv")
        candidate_tiles = candidates(settings, part)
        calls, outputs = {}, {}
        for blocks in candidate_tiles:
          tile = label(part, blocks)
          with common.attempt(f"tiles: {case}, rate {rate}, {tile}", failures):
            _, kernels = kernels_alone(settings, qkvd, config, blocks, names)
            for name, call in compiled_calls(kernels).items():
              calls[name, tile] = call
              outputs[name, tile] = call()
        if not calls:
          continue
        samples = common.interleaved(calls, (), settings.repeats, settings.min_sample_s)
        default = label(part, candidate_tiles[0])
        for (name, tile), s in samples.items():
          ms = common.median_ms(s)
          # None where the default tiles failed: there is nothing to compare with.
          difference = (max_difference(outputs[name, tile], outputs[name, default])
                        if (name, default) in outputs else None)
          rows.append(dict(case=case, kernel=name, tiles=tile, rate=rate, ms=ms,
                           max_abs_difference=difference))
          print(f"  {case:<26} {name:<6} {tile:<44} rate {rate:<4} {ms:9.3f} ms", flush=True)
        save()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiles", action="store_true", help="also time the tile candidates")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny shapes in the Pallas interpreter, on any backend (what the "
                      "tests run; the times mean nothing)")
  parser.add_argument("--json", help="write the results here (default: a full run writes "
                      "benchmarks/results/tune_attention-<backend>.json; --smoke nothing)")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  settings = SMOKE if args.smoke else Settings()
  if not args.smoke and jax.default_backend() != "gpu":
    sys.exit(f"the kernels compile for NVIDIA GPUs; on {jax.default_backend()} use --smoke")
  path = common.results_path(args.json, "tune_attention", not args.smoke)
  start = time.perf_counter()
  config = dict(batch=settings.batch, heads=settings.heads, length=settings.length,
                head_dim=settings.head_dim, dtype="bfloat16",
                tflops="the kernel's matmuls, recomputation included")
  results = dict(meta=common.metadata(), failures=[],
                 attention_kernels=dict(config=config, rows=[]))

  def save() -> None:
    results["meta"]["seconds"] = round(time.perf_counter() - start, 1)
    common.write_json(path, results)

  print("The profile: each kernel alone, default tiles", flush=True)
  profile(settings, results["attention_kernels"]["rows"], results["failures"], save)
  if args.tiles:
    print("\nThe tiles: each kernel alone under each candidate", flush=True)
    results["tiles"] = dict(config=dict(config, causal_length=settings.causal_length), rows=[])
    tiles(settings, results["tiles"]["rows"], results["failures"], save)
  save()
  print(f"\n{results['meta']['seconds']} s, {len(results['failures'])} failed"
        + (f"; results in {path}" if path else ""))
  return results


if __name__ == "__main__":
  sys.exit(1 if main()["failures"] else 0)
