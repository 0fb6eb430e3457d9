"""Dumps what explains the benchmark numbers: optimized HLO and memory stats.

Writes, under ``--out``: the optimized HLO of the MLP train step of every
``bench.py`` model (with ``memory_analysis()`` in the first line), the HLO of
each elementwise variant at 2^24 float32, and prints a small interleaved
timing of the fast mode against two unpacked layouts. For buffer assignments,
also set ``XLA_FLAGS=--xla_dump_to=DIR``.

The unpacked layouts show why ``bits=16`` packs its decisions into uint32
words first. XLA fuses elementwise code into one loop over the *output*
elements and recomputes every fused producer per element, so a hash shared by
four neighbours is computed four times. Giving the result an ``(n/4, 4)``
shape ("(n/4, 4) out") lets the loop nest share each hash; reshaping it back
to ``x.shape`` ("reshaped") fuses the reshape into the loop and loses that.

Usage: python benchmarks/inspect_hlo.py --out /tmp/hlo [--platform gpu]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import common
from jaxdrop import _masks, _threefry

_LANES = _masks.LANES_16


def unpacked_dropout(key: jax.Array, x: jax.Array, rate: float, lanes_axis: bool = False):
  """``jaxdrop.dropout(key, x, rate, bits=16)`` without packing (x.size % 4 == 0).

  Hashes counter ``i`` once per row of an (n/4, 4) array and takes lane
  ``L % 4`` of it, most significant first: the same mask as the library. With
  ``lanes_axis`` the result keeps the (n/4, 4) shape.
  """
  resolved = _masks.resolve_rate(rate, jnp.float32, bits=16)
  key_data = jax.random.key_data(key)
  shape = (x.size // _LANES, _LANES)
  counter = jax.lax.broadcasted_iota(jnp.uint32, shape, 0)
  lane = jax.lax.broadcasted_iota(jnp.uint32, shape, 1)
  hi, lo = _threefry.threefry2x32(key_data[0], key_data[1], jnp.zeros((), jnp.uint32), counter)
  half = jnp.where(lane < 2, hi, lo)
  bits = jnp.where(lane % 2 == 0, half >> np.uint32(16), half & np.uint32(0xFFFF))
  y = x.reshape(shape).astype(jnp.float32) * resolved.scale
  y = jnp.where(bits >= resolved.threshold, y, 0).astype(x.dtype)
  return y if lanes_axis else y.reshape(x.shape)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--platform", default=None)
  args = parser.parse_args()
  if args.platform is not None:
    jax.config.update("jax_platforms", "cuda" if args.platform == "gpu" else args.platform)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  batch = (jnp.ones((256, 784)), jnp.zeros((256,), jnp.int32))
  key, tx = jax.random.key(5), optax.adam(1e-3)
  for name, model in common.mlp_models(0.1, (1024, 1024)).items():
    params = model.init(jax.random.key(6), batch[0], train=False)["params"]
    compiled = common.make_train_step(model, tx).lower(
        params, tx.init(params), batch, key).compile()
    stats = compiled.memory_analysis()
    print(f"{name}: temp {stats.temp_size_in_bytes:,} bytes")
    slug = re.sub(r"[^A-Za-z0-9]+", "_", name)
    (out / f"train_step_{slug}.hlo.txt").write_text(f"// {stats}\n" + compiled.as_text())

  x = jnp.ones(2**24, jnp.float32)
  variants = common.elementwise_variants(0.1)
  variants["bits=16 unpacked, (n/4, 4) out"] = (
      lambda k, x: unpacked_dropout(k, x, 0.1, lanes_axis=True))
  variants["bits=16 unpacked, reshaped"] = lambda k, x: unpacked_dropout(k, x, 0.1)
  for name, fn in variants.items():
    slug = re.sub(r"[^A-Za-z0-9]+", "_", name)
    text = jax.jit(fn).lower(key, x).compile().as_text()
    (out / f"fwd_{slug}.hlo.txt").write_text(text)
  for dtype in (jnp.float32, jnp.bfloat16):
    x = jnp.ones(2**24, dtype)
    fns = {name: jax.jit(variants[name]) for name in (
        common.FLOOR, "jaxdrop.dropout", common.FAST,
        "bits=16 unpacked, (n/4, 4) out", "bits=16 unpacked, reshaped")}
    samples = common.interleaved(fns, (key, x), 9, 0.01)
    floor = min(samples[common.FLOOR])
    print(f"\n2^24 {jnp.dtype(dtype).name}: min ms, x floor")
    for name, s in samples.items():
      print(f"  {name:<36}{min(s) * 1e3:8.3f}{min(s) / floor:7.2f}")


if __name__ == "__main__":
  main()
