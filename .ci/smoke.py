"""A short smoke suite against an installed jaxdrop (a wheel, not the source tree).

Run from outside the repository by .ci/smoke_wheel.sh: it checks that the installed
package is complete and works (each public entry point once, with properties that a broken
install or a wrong mask would fail), not what the full suite checks.
"""

from __future__ import annotations

import importlib.metadata
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxdrop

here = pathlib.Path(jaxdrop.__file__).resolve()
assert "site-packages" in here.parts, f"jaxdrop imported from {here}, not an installed wheel"
installed = importlib.metadata.version("jaxdrop")
assert jaxdrop.__version__ == installed, (jaxdrop.__version__, installed)

key, other_key = jax.random.key(0), jax.random.key(1)
x = jnp.ones((8, 125))  # 1000 elements.
RATE = 0.5


def check_dropped(y, name):
  """Same shape and dtype, every element 0 or 2 (= 1 / (1 - 0.5)), about half of them 0."""
  y = np.asarray(y)
  assert y.shape == x.shape and y.dtype == x.dtype, (name, y.shape, y.dtype)
  assert set(np.unique(y).tolist()) == {0.0, 2.0}, (name, np.unique(y))
  zeros, n = int(np.sum(y == 0)), y.size
  sigma = (n * RATE * (1 - RATE)) ** 0.5
  assert abs(zeros - n * RATE) <= 4 * sigma, (name, zeros)  # Binomial, 4 sigma.


# Elementwise dropout: eager and jitted agree; the same key, the same mask; another key,
# another mask; deterministic is the identity.
y = jaxdrop.dropout(key, x, RATE)
check_dropped(y, "dropout")
np.testing.assert_array_equal(y, jax.jit(jaxdrop.dropout, static_argnums=2)(key, x, RATE))
np.testing.assert_array_equal(y, jaxdrop.dropout(key, x, RATE))
assert not np.array_equal(y, jaxdrop.dropout(other_key, x, RATE))
np.testing.assert_array_equal(jaxdrop.dropout(key, x, RATE, deterministic=True), x)

# Attention with dropout: the shape, reproducible, and equal to the materialized definition
# out = (softmax(q k / sqrt(H)) * keep * 2) v with keep = attention_keep_mask (docs/attention.md).
b, t, n, h = 2, 16, 4, 8
q, k, v = jax.random.normal(jax.random.key(2), (3, b, t, n, h))
out = jaxdrop.dot_product_attention(q, k, v, dropout_rate=RATE, dropout_key=key)
assert out.shape == (b, t, n, h) and out.dtype == q.dtype, (out.shape, out.dtype)
np.testing.assert_array_equal(
    out, jaxdrop.dot_product_attention(q, k, v, dropout_rate=RATE, dropout_key=key))
keep = jaxdrop.attention_keep_mask(key, (b, n, t, t), RATE)
assert 0.4 < float(keep.mean()) < 0.6, float(keep.mean())
weights = jax.nn.softmax(jnp.einsum("btnh,bsnh->bnts", q, k) / h**0.5, axis=-1)
reference = jnp.einsum("bnts,bsnh->btnh", jnp.where(keep, weights * 2, 0), v)
np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)
assert not np.allclose(out, jaxdrop.dot_product_attention(q, k, v))

# The linen module: the function's mask for the same key; identity when deterministic.
linen_layer = jaxdrop.linen.Dropout(RATE)
linen_y = linen_layer.apply({}, x, deterministic=False, rng=key)
check_dropped(linen_y, "linen.Dropout")
np.testing.assert_array_equal(linen_y, y)
np.testing.assert_array_equal(linen_layer.apply({}, x, deterministic=True), x)

# The nnx module: the function's mask for a given key; from its stream, the same seed gives
# the same masks, and each call draws a fresh one; identity when deterministic.
layer = jaxdrop.nnx.Dropout(RATE, rngs=nnx.Rngs(dropout=3))
np.testing.assert_array_equal(layer(x, rngs=key), y)
first, second = layer(x), layer(x)
check_dropped(first, "nnx.Dropout")
assert not np.array_equal(first, second)
twin = jaxdrop.nnx.Dropout(RATE, rngs=nnx.Rngs(dropout=3))
np.testing.assert_array_equal(twin(x), first)
np.testing.assert_array_equal(layer(x, deterministic=True), x)

print(f"smoke: jaxdrop {jaxdrop.__version__} from {here.parent} ok")
