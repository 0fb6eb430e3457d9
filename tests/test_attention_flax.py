"""jaxdrop.linen/nnx.dot_product_attention drop into flax's attention modules."""

from __future__ import annotations

import functools
import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxdrop

KEY = jax.random.key(3)


def qkv(batch_shape=(2,), rows=6, heads=2, head_dim=8, dtype=jnp.float32):
  rng = np.random.default_rng(0)
  shape = batch_shape + (rows, heads, head_dim)
  return tuple(jnp.asarray(rng.normal(size=shape), dtype) for _ in range(3))


def test_function_equals_the_core_function():
  q, k, v = qkv()
  out = jaxdrop.linen.dot_product_attention(
      q, k, v, dropout_rng=KEY, dropout_rate=0.3, broadcast_dropout=False
  )
  expected = jaxdrop.dot_product_attention(q, k, v, dropout_key=KEY, dropout_rate=0.3)
  np.testing.assert_array_equal(out, expected)


def test_broadcast_dropout_shares_one_mask_across_batch_and_heads():
  batch, rows, heads, cols = 2, 5, 3, 8
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(batch, rows, heads, cols)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(batch, cols, heads, cols)), jnp.float32)
  v = jnp.broadcast_to(jnp.eye(cols)[None, :, None, :], (batch, cols, heads, cols))
  out = jaxdrop.linen.dot_product_attention(q, k, v, dropout_rng=KEY, dropout_rate=0.5)
  keep = np.asarray(jaxdrop.attention_keep_mask(KEY, (1, 1, rows, cols), 0.5))[0, 0]
  for b in range(batch):
    for n in range(heads):
      np.testing.assert_array_equal(np.asarray(out[b, :, n]) != 0, keep)


def test_several_batch_dimensions_equal_one():
  q, k, v = qkv(batch_shape=(2, 3))
  mask = jnp.asarray(np.random.default_rng(2).random((2, 1, 1, 6, 6)) > 0.2) | jnp.eye(6, dtype=bool)
  out = jaxdrop.linen.dot_product_attention(
      q, k, v, mask=mask, dropout_rng=KEY, dropout_rate=0.2, broadcast_dropout=False
  )
  flat = jaxdrop.dot_product_attention(
      *(x.reshape(6, 6, 2, 8) for x in (q, k, v)),
      mask=jnp.broadcast_to(mask, (2, 3, 1, 6, 6)).reshape(6, 1, 6, 6),
      dropout_key=KEY, dropout_rate=0.2,
  )
  np.testing.assert_array_equal(out, flat.reshape(out.shape))


def test_dtype_promotes_as_flax():
  q, k, v = qkv(dtype=jnp.bfloat16)
  assert jaxdrop.linen.dot_product_attention(q, k, v, deterministic=True).dtype == jnp.bfloat16
  out = jaxdrop.linen.dot_product_attention(q, k, v, deterministic=True, dtype=jnp.float32)
  assert out.dtype == jnp.float32


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(module=object()),
        dict(einsum_dot_general=jax.lax.dot_general),
        dict(qk_attn_weights_einsum=jnp.einsum),
        dict(attn_weights_value_einsum=jnp.einsum),
    ],
)
def test_what_needs_materialized_weights_is_a_clear_error(kwargs):
  q, k, v = qkv()
  with pytest.raises(ValueError, match="never materializes"):
    jaxdrop.linen.dot_product_attention(q, k, v, **kwargs)


def test_linen_module_without_dropout_equals_flax_default():
  x = jax.random.normal(jax.random.key(0), (2, 6, 8))
  mask = nn.make_causal_mask(jnp.ones((2, 6)))
  make = lambda fn: nn.MultiHeadDotProductAttention(
      num_heads=2, qkv_features=8, dropout_rate=0.1, broadcast_dropout=False, attention_fn=fn
  )
  variables = make(nn.dot_product_attention).init(jax.random.key(1), x, deterministic=True)
  expected = make(nn.dot_product_attention).apply(variables, x, mask=mask, deterministic=True)
  out = make(jaxdrop.linen.dot_product_attention).apply(variables, x, mask=mask, deterministic=True)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  dropped = make(jaxdrop.linen.dot_product_attention).apply(
      variables, x, mask=mask, deterministic=False, rngs={"dropout": jax.random.key(2)}
  )
  again = make(jaxdrop.linen.dot_product_attention).apply(
      variables, x, mask=mask, deterministic=False, rngs={"dropout": jax.random.key(2)}
  )
  np.testing.assert_array_equal(dropped, again)
  assert not np.allclose(dropped, expected)


def test_linen_module_sowing_weights_names_the_alternative():
  x = jnp.ones((1, 4, 8))
  layer = nn.MultiHeadDotProductAttention(
      num_heads=2, qkv_features=8, attention_fn=jaxdrop.linen.dot_product_attention
  )
  variables = layer.init(jax.random.key(0), x, deterministic=True)
  with pytest.raises(ValueError, match="sow_weights=False"):
    layer.apply(variables, x, deterministic=True, sow_weights=True)


def test_nnx_module_without_dropout_equals_flax_default():
  x = jax.random.normal(jax.random.key(0), (2, 6, 8))
  make = lambda fn: nnx.MultiHeadAttention(
      num_heads=2, in_features=8, dropout_rate=0.1, broadcast_dropout=False, decode=False,
      attention_fn=fn, rngs=nnx.Rngs(0),
  )
  ours, theirs = make(jaxdrop.nnx.dot_product_attention), make(nnx.dot_product_attention)
  ours.eval()
  theirs.eval()
  np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
  ours.train()
  first, second = ours(x), ours(x)  # The module's dropout stream advances.
  assert not np.allclose(first, second)
  assert not np.allclose(first, theirs(x))


def test_linen_attention_fn_is_causal_without_a_mask_and_picks_the_implementation():
  # Issue 23: options through attention_fn=, inside flax's own module.
  x = jax.random.normal(jax.random.key(0), (2, 6, 8))
  causal = nn.make_causal_mask(jnp.ones((2, 6)))
  make = lambda fn: nn.MultiHeadDotProductAttention(
      num_heads=2, qkv_features=8, dropout_rate=0.1, broadcast_dropout=False, attention_fn=fn
  )
  variables = make(nn.dot_product_attention).init(jax.random.key(1), x, deterministic=True)
  expected = make(nn.dot_product_attention).apply(variables, x, mask=causal, deterministic=True)
  run = lambda fn, **kw: make(fn).apply(variables, x, rngs={"dropout": jax.random.key(2)}, **kw)
  for implementation in ("xla", "reference", None):
    fn = jaxdrop.linen.attention_fn(is_causal=True, implementation=implementation)
    np.testing.assert_allclose(run(fn, deterministic=True), expected, rtol=1e-5, atol=1e-6)
    # With dropout: the same weights dropped as with flax's causal mask instead.
    with_mask = run(jaxdrop.linen.dot_product_attention, mask=causal, deterministic=False)
    np.testing.assert_allclose(run(fn, deterministic=False), with_mask, rtol=1e-5, atol=1e-6)
  # A plain partial works too, now that the adapter takes both options.
  fn = functools.partial(jaxdrop.linen.dot_product_attention, is_causal=True,
                         implementation="reference")
  np.testing.assert_allclose(run(fn, deterministic=True), expected, rtol=1e-5, atol=1e-6)


def test_nnx_attention_fn_is_causal_without_a_mask_and_picks_the_implementation():
  x = jax.random.normal(jax.random.key(0), (2, 6, 8))
  causal = nnx.make_causal_mask(jnp.ones((2, 6)))
  make = lambda fn: nnx.MultiHeadAttention(
      num_heads=2, in_features=8, dropout_rate=0.1, broadcast_dropout=False, decode=False,
      attention_fn=fn, rngs=nnx.Rngs(0),
  )
  expected = make(nnx.dot_product_attention)(x, mask=causal, deterministic=True)
  for implementation in ("xla", "reference"):
    layer = make(jaxdrop.nnx.attention_fn(is_causal=True, implementation=implementation))
    np.testing.assert_allclose(layer(x, deterministic=True), expected, rtol=1e-5, atol=1e-6)
    if "is_causal" not in inspect.signature(nnx.MultiHeadAttention.__call__).parameters:
      continue  # Older flax (0.12.5) has no is_causal on the module's calls.
    # nnx's own is_causal= reaches the adapter too (either one makes the call causal).
    layer = make(jaxdrop.nnx.attention_fn(implementation=implementation))
    np.testing.assert_allclose(layer(x, deterministic=True, is_causal=True), expected,
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(layer(x, deterministic=True), expected)


@pytest.mark.parametrize("flavour", ["linen", "nnx"])
def test_attention_fn_checks_its_options_when_made(flavour):
  make = getattr(jaxdrop, flavour).attention_fn
  with pytest.raises(ValueError, match="implementation must be None .* got implementation='cuda'"):
    make(implementation="cuda")
  with pytest.raises(TypeError, match="is_causal must be a bool, got is_causal=1"):
    make(is_causal=1)


ATTENTION_FNS = {
    "linen": (jaxdrop.linen.dot_product_attention, nn.dot_product_attention),
    "nnx": (jaxdrop.nnx.dot_product_attention, nnx.dot_product_attention),
}


@pytest.mark.parametrize("flavour", sorted(ATTENTION_FNS))
@pytest.mark.parametrize(
    "query_batch, kv_batch",
    [((2, 3), (3, 2)), ((2, 1), (1, 1)), ((2,), (1,)), ((2, 3), (6,))],
)
def test_query_key_value_batch_dims_must_match_exactly_as_in_flax(flavour, query_batch, kv_batch):
  ours, flax_fn = ATTENTION_FNS[flavour]
  q, _, _ = qkv(batch_shape=query_batch)
  _, k, v = qkv(batch_shape=kv_batch)
  # linen asserts, nnx raises ValueError.
  with pytest.raises((AssertionError, ValueError), match="batch dims must match|same rank"):
    flax_fn(q, k, v, deterministic=True)
  with pytest.raises(ValueError, match=r"same batch dimensions.*query.shape=.*key.shape="):
    ours(q, k, v, deterministic=True)


@pytest.mark.parametrize("flavour", sorted(ATTENTION_FNS))
@pytest.mark.parametrize(
    "name, shape",
    [
        ("mask", (3, 1, 1, 6, 6)),  # batch (2, 3) read from the wrong end
        ("mask", (2, 2, 1, 6, 6)),
        ("bias", (2, 3, 2, 5, 6)),
        ("bias", (1, 2, 3, 2, 6, 6)),  # more dimensions than [batch..., N, T, S]
    ],
)
def test_mask_or_bias_that_does_not_broadcast_is_named(flavour, name, shape):
  ours, _ = ATTENTION_FNS[flavour]
  q, k, v = qkv(batch_shape=(2, 3))
  value = jnp.ones(shape, bool) if name == "mask" else jnp.zeros(shape)
  with pytest.raises(ValueError, match=rf"{name} must broadcast.*{name}.shape="):
    ours(q, k, v, **{name: value}, deterministic=True)


@pytest.mark.parametrize("flavour", sorted(ATTENTION_FNS))
@pytest.mark.parametrize("shape", [(3, 1, 6, 6), (2, 1, 1, 1, 6), (6, 6), (2, 3, 2, 6, 6)])
def test_bias_and_mask_that_flax_broadcasts_give_flax_output(flavour, shape):
  ours, _ = ATTENTION_FNS[flavour]
  q, k, v = qkv(batch_shape=(2, 3))
  rng = np.random.default_rng(4)
  bias = jnp.asarray(rng.normal(size=shape), jnp.float32)
  mask = jnp.asarray(rng.random(size=shape) > 0.2) | (jnp.arange(6) == 0)  # a key per row
  # linen broadcasts them; nnx does too with dropout, but without it reshapes
  # several batch dimensions into one, which a broadcast bias does not survive.
  expected = nn.dot_product_attention(q, k, v, bias=bias, mask=mask, deterministic=True)
  out = ours(q, k, v, bias=bias, mask=mask, deterministic=True)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
