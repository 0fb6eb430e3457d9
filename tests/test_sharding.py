"""Masks do not depend on the device count, and need no communication."""

from __future__ import annotations

from conftest import run_with_devices

CODE = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import jaxdrop

assert jax.device_count() == 8, jax.devices()
COLLECTIVES = ("all-gather", "all-reduce", "collective-permute", "all-to-all", "reduce-scatter")
mesh = jax.make_mesh((4, 2), ("data", "model"))
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
# 120 elements: the fast mode's last 32-element word is partial.
odd = x[:12, :10]
runs.append(("bits16_partial_word", functions["bits16"], odd, {k: cases[k] for k in ("rows", "both")}))
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
    # Under a byte per element of the whole array: no device materializes the
    # whole array's counters or bits to slice its own (the fast mode's packed
    # words, a bit per element, may fit).
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < x.size, (fname, cname, temp)
    print(fname, cname, "ok")
"""


def test_sharded_equals_unsharded_without_collectives():
  out = run_with_devices(CODE)
  assert out.count("ok") == 6 * 3 + 2, out
