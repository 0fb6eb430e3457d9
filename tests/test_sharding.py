"""Masks do not depend on the device count, and need no communication."""

from __future__ import annotations

from conftest import run_with_devices

CODE = """
import math
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import jaxdrop

assert jax.device_count() == 8, jax.devices()
COLLECTIVES = ("all-gather", "all-reduce", "collective-permute", "all-to-all", "reduce-scatter")
mesh = jax.make_mesh((4, 2), ("data", "model"),
                     axis_types=(jax.sharding.AxisType.Explicit,) * 2)
key = jax.random.key(5)
x = jax.random.normal(jax.random.key(0), (64, 24)) + 3.0
cases = {
    "rows": P("data", None),
    "both": P("data", "model"),
    "cols": P(None, ("data", "model")),
}
functions = {
    "dropout": lambda k, x: jaxdrop.dropout(k, x, 0.3),
    "traced_rate": lambda k, x: jaxdrop.dropout(k, x, jnp.float32(0.3)),
    "broadcast": lambda k, x: jaxdrop.dropout(k, x, 0.3, broadcast_dims=(0,)),
    "grad": jax.grad(lambda k, x: jnp.sum(jaxdrop.dropout(k, x, 0.3) * x), argnums=1),
    "linen": lambda k, x: jaxdrop.linen.Dropout(0.3).apply({}, x, deterministic=False, rng=k),
    "bits16": lambda k, x: jaxdrop.dropout(k, x, 0.3, bits=16),
}
runs = [(fname, fn, x, cases) for fname, fn in functions.items()]
# Two more fast-mode runs. 120 elements: the last 32-element word is partial.
odd = x[:12, :10]
runs.append(("bits16_partial_word", functions["bits16"], odd, {k: cases[k] for k in ("rows", "both")}))
# Rows of whole words, and so each device's columns: packed in rows, sharded like x.
wide = jax.random.normal(jax.random.key(1), (16, 256)) + 3.0
runs.append(("bits16_whole_words", functions["bits16"], wide, cases))
# Not the broadcast mask (smaller than x: a device needs its columns' entries
# whatever its rows), nor the fast mode where rows do not hold whole words (its
# words then span rows, and a device with a slice of the columns hashes all of
# its rows' words).
HASHES_ITS_OWN_ELEMENTS = ("dropout", "traced_rate", "grad", "linen", "bits16_whole_words")


def flops(compiled):
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)["flops"]


for fname, fn, x, cases in runs:
  f = jax.jit(fn)
  expected = np.asarray(f(key, x))
  for cname, spec in cases.items():
    xs = jax.device_put(x, NamedSharding(mesh, spec))
    out = f(key, xs)
    np.testing.assert_array_equal(np.asarray(out), expected, err_msg=f"{fname}/{cname}")
    assert len(out.sharding.device_set) == 8, (fname, cname, out.sharding)
    compiled = f.lower(key, xs).compile()
    found = [c for c in COLLECTIVES if c in compiled.as_text()]
    assert not found, (fname, cname, found)
    if fname in HASHES_ITS_OWN_ELEMENTS:
      # Each device hashes its own elements, not the whole array's to slice.
      ratio = flops(compiled) / flops(f.lower(key, x).compile())
      share = math.prod(xs.sharding.shard_shape(x.shape)) / x.size
      assert ratio < 1.5 * share, (fname, cname, ratio, share)
    print(fname, cname, "ok")
"""


def test_sharded_equals_unsharded_without_collectives():
  out = run_with_devices(CODE)
  assert out.count("ok") == 6 * 3 + 2 + 3, out
