"""A short smoke suite against an installed jaxdrop (a wheel, not the source tree).

Run from outside the repository by .ci/smoke_wheel.sh: it checks that the installed
package is complete and works, not that the tests pass (the full suite does that).
"""

from __future__ import annotations

import importlib.metadata
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

import jaxdrop
from flax import nnx

here = pathlib.Path(jaxdrop.__file__).resolve()
assert "site-packages" in here.parts, f"jaxdrop imported from {here}, not an installed wheel"
assert jaxdrop.__version__ == importlib.metadata.version("jaxdrop"), jaxdrop.__version__

key = jax.random.key(0)
x = jnp.ones((1000,))

# Elementwise dropout: zeros and survivors scaled by 1 / (1 - rate); the same key, the same mask.
y = jaxdrop.dropout(key, x, 0.5)
values = set(np.unique(np.asarray(y)).tolist())
assert values == {0.0, 2.0}, values
assert 400 < int(jnp.sum(y == 0)) < 600
np.testing.assert_array_equal(np.asarray(y), np.asarray(jax.jit(jaxdrop.dropout,
                                                                static_argnums=2)(key, x, 0.5)))

# Attention with dropout: the output's shape, and dropout changes it reproducibly.
q = jax.random.normal(jax.random.key(1), (2, 16, 4, 8))
out = jaxdrop.dot_product_attention(q, q, q, dropout_rate=0.3, dropout_key=key)
again = jaxdrop.dot_product_attention(q, q, q, dropout_rate=0.3, dropout_key=key)
plain = jaxdrop.dot_product_attention(q, q, q)
assert out.shape == q.shape
np.testing.assert_array_equal(np.asarray(out), np.asarray(again))
assert not np.allclose(np.asarray(out), np.asarray(plain))

# The linen and nnx modules: the same mask as the function for the same key.
linen_y = jaxdrop.linen.Dropout(0.5).apply({}, x, deterministic=False, rng=key)
assert set(np.unique(np.asarray(linen_y)).tolist()) == {0.0, 2.0}
layer = jaxdrop.nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=1))
nnx_y = layer(x)
assert set(np.unique(np.asarray(nnx_y)).tolist()) == {0.0, 2.0}
np.testing.assert_array_equal(np.asarray(layer(x, deterministic=True)), np.asarray(x))

print(f"smoke: jaxdrop {jaxdrop.__version__} from {here.parent} ok")
