"""``attention_fn`` drop-ins for flax's attention modules.

``flax.linen.MultiHeadDotProductAttention(..., attention_fn=jaxdrop.linen.dot_product_attention)``
and ``flax.nnx.MultiHeadAttention(..., attention_fn=jaxdrop.nnx.dot_product_attention)``
work unchanged: these functions take flax's signature (batch dimensions
``[batch..., T, N, H]``, ``dropout_rng``, ``broadcast_dropout``, ``dtype``, ...),
translate it, and call :func:`jaxdrop.dot_product_attention`.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxdrop._attention import api

_MATERIALIZES = (
    "{what} needs the [..., N, T, S] attention weights, which jaxdrop never "
    "materializes. Use flax's own dot_product_attention for that call "
    "(attention_fn's default), or {fix}."
)


def _flat_batch(x: jax.Array | None, name: str, target: tuple[int, ...]) -> jax.Array | None:
  """``x``, broadcastable to ``target = [batch..., N, T, S]``, as ``[b, N|1, T|1, S|1]``.

  ``b`` is 1 where ``x`` broadcasts over every batch dimension, else ``prod(batch)``.
  """
  if x is None:
    return None
  x = jnp.asarray(x)
  if not api.broadcasts(x.shape, target):
    raise ValueError(
        f"{name} must broadcast to [batch..., N, T, S] = {list(target)}, got "
        f"{name}.shape={x.shape}"
    )
  x = x.reshape((1,) * (len(target) - x.ndim) + x.shape)
  batch_shape = target[:-3]
  if all(size == 1 for size in x.shape[:-3]):
    return x.reshape((1,) + x.shape[-3:])
  x = jnp.broadcast_to(x, batch_shape + x.shape[-3:])
  return x.reshape((-1,) + x.shape[-3:])


def _check_batch(query, key, value) -> tuple[int, ...]:
  """The batch dimensions, which query, key and value must share exactly (as flax asks)."""
  if query.ndim < 3:
    raise ValueError(f"query must be [batch..., T, N, H], got query.shape={query.shape}")
  batch_shape = query.shape[:-3]
  if not key.ndim == value.ndim == query.ndim or not (
      key.shape[:-3] == value.shape[:-3] == batch_shape
  ):
    raise ValueError(
        "query, key and value must have the same batch dimensions [batch...] (flax's "
        f"attention requires it too), got query.shape={query.shape}, key.shape={key.shape} "
        f"and value.shape={value.shape}"
    )
  return batch_shape


def _flax_attention(
    query, key, value, bias, mask, broadcast_dropout, dropout_rng, dropout_rate,
    deterministic, precision, module, is_causal, implementation,
) -> jax.Array:
  if module is not None:
    raise ValueError(_MATERIALIZES.format(what="sow_weights=True", fix="sow_weights=False"))
  query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
  batch_shape = _check_batch(query, key, value)
  flat = (math.prod(batch_shape),)
  # [batch..., N, T, S]
  target = batch_shape + (query.shape[-2], query.shape[-3], key.shape[-3])

  def flatten(x):  # [batch..., L, heads, H] -> [b, L, heads, H]
    return x.reshape(flat + x.shape[len(batch_shape):])

  out = api.dot_product_attention(
      flatten(query), flatten(key), flatten(value),
      _flat_batch(bias, "bias", target),
      # flax masks are often float 0/1 (nn.make_causal_mask); flax attends where nonzero.
      None if mask is None else _flat_batch(jnp.asarray(mask) != 0, "mask", target),
      is_causal=is_causal,
      dropout_rate=dropout_rate,
      dropout_key=dropout_rng,
      deterministic=deterministic,
      broadcast_dropout=broadcast_dropout,
      precision=precision,
      implementation=implementation,
  )
  return out.reshape(batch_shape + out.shape[1:])


def linen_dot_product_attention(
    query: jax.typing.ArrayLike,
    key: jax.typing.ArrayLike,
    value: jax.typing.ArrayLike,
    bias: jax.typing.ArrayLike | None = None,
    mask: jax.typing.ArrayLike | None = None,
    broadcast_dropout: bool = True,
    dropout_rng: jax.Array | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype: Any = None,
    precision: Any = None,
    module: Any = None,
    force_fp32_for_softmax: bool = False,
    einsum_dot_general: Any = None,
    qk_attn_weights_einsum: Any = None,
    attn_weights_value_einsum: Any = None,
    *,
    is_causal: bool = False,
    implementation: str | None = None,
) -> jax.Array:
  """``flax.linen.dot_product_attention``'s signature on :func:`jaxdrop.dot_product_attention`.

  Use it as ``attention_fn`` of ``nn.MultiHeadDotProductAttention``. Dropout
  uses the mask of :func:`jaxdrop.attention_keep_mask`; pass
  ``broadcast_dropout=False`` (recommended) for one mask per batch element
  and head, or keep flax's default ``True`` for one ``[T, S]`` mask shared by
  all of them. The softmax is always computed in float32, so
  ``force_fp32_for_softmax`` changes nothing. A query row with no allowed
  position outputs 0, where flax outputs the plain average of the values.

  Args:
    query: ``[batch..., T, N, H]``.
    key: ``[batch..., S, K, H]`` (K dividing N), with the query's batch
      dimensions exactly, as flax requires.
    value: ``[batch..., S, K, H]``.
    bias: broadcastable to ``[batch..., N, T, S]``.
    mask: bool, broadcastable to ``[batch..., N, T, S]``; True = may attend.
    broadcast_dropout: share one dropout mask across batch and heads.
    dropout_rng: the dropout key (flax's name).
    dropout_rate: probability to drop each attention weight.
    deterministic: if True, no dropout.
    dtype: the computation dtype; query, key and value are promoted to it
      as flax does.
    precision: the ``jax.lax`` precision of the matrix products.
    module: must be None: sowing the weights needs them materialized.
    force_fp32_for_softmax: accepted; jaxdrop always does this.
    einsum_dot_general: must be None (custom einsums are not supported).
    qk_attn_weights_einsum: must be None.
    attn_weights_value_einsum: must be None.
    is_causal: if True, query ``t`` attends only keys ``s <= t``, without a mask
      (the blockwise and fused paths then skip the tiles above the diagonal).
    implementation: as for :func:`jaxdrop.dot_product_attention`. flax passes
      neither of these two: set them with :func:`jaxdrop.linen.attention_fn`.

  Returns:
    ``[batch..., T, N, H]``.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxdrop
    >>> layer = nn.MultiHeadDotProductAttention(
    ...     num_heads=2, qkv_features=8, dropout_rate=0.1, broadcast_dropout=False,
    ...     attention_fn=jaxdrop.linen.dot_product_attention)
    >>> x = jnp.ones((1, 4, 8))
    >>> variables = layer.init(jax.random.key(0), x, deterministic=True)
    >>> y = layer.apply(variables, x, deterministic=False,
    ...                 rngs={"dropout": jax.random.key(1)})
    >>> y.shape
    (1, 4, 8)
  """
  del force_fp32_for_softmax  # The softmax is float32 in every implementation.
  for name, value_ in (
      ("einsum_dot_general", einsum_dot_general),
      ("qk_attn_weights_einsum", qk_attn_weights_einsum),
      ("attn_weights_value_einsum", attn_weights_value_einsum),
  ):
    if value_ is not None:
      raise ValueError(_MATERIALIZES.format(what=f"{name}={value_!r}", fix=f"{name}=None"))
  import flax.linen as nn  # Deferred: flax loads only when this is used.

  query, key, value = nn.dtypes.promote_dtype(query, key, value, dtype=dtype)
  return _flax_attention(
      query, key, value, bias, mask, broadcast_dropout, dropout_rng, dropout_rate,
      deterministic, precision, module, is_causal, implementation,
  )


def nnx_dot_product_attention(
    query: jax.typing.ArrayLike,
    key: jax.typing.ArrayLike,
    value: jax.typing.ArrayLike,
    bias: jax.typing.ArrayLike | None = None,
    mask: jax.typing.ArrayLike | None = None,
    broadcast_dropout: bool = True,
    dropout_rng: jax.Array | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype: Any = None,
    precision: Any = None,
    module: Any = None,
    promote_dtype: Any = None,
    is_causal: bool = False,
    *,
    implementation: str | None = None,
) -> jax.Array:
  """``flax.nnx.dot_product_attention``'s signature on :func:`jaxdrop.dot_product_attention`.

  Use it as ``attention_fn`` of ``nnx.MultiHeadAttention``. Arguments and
  differences as :func:`jaxdrop.linen.dot_product_attention`; ``promote_dtype``
  (default: flax nnx's) casts query, key and value, ``is_causal``
  restricts query ``t`` to keys ``s <= t``, and ``implementation`` is as for
  :func:`jaxdrop.dot_product_attention`; :func:`jaxdrop.nnx.attention_fn` sets
  these two for a flax module.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxdrop
    >>> from flax import nnx
    >>> layer = nnx.MultiHeadAttention(
    ...     num_heads=2, in_features=8, dropout_rate=0.1, broadcast_dropout=False,
    ...     decode=False, attention_fn=jaxdrop.nnx.dot_product_attention,
    ...     rngs=nnx.Rngs(0))
    >>> layer.train()  # or layer(x, deterministic=False)
    >>> layer(jnp.ones((1, 4, 8))).shape
    (1, 4, 8)
  """
  if promote_dtype is None:
    from flax.nnx.nn import dtypes  # Deferred: flax loads only when this is used.

    promote_dtype = dtypes.promote_dtype
  query, key, value = promote_dtype((query, key, value), dtype=dtype)
  return _flax_attention(
      query, key, value, bias, mask, broadcast_dropout, dropout_rng, dropout_rate,
      deterministic, precision, module, is_causal, implementation,
  )


def _attention_fn(adapter, is_causal: bool, implementation: str | None):
  if not isinstance(is_causal, bool):
    raise TypeError(f"is_causal must be a bool, got is_causal={is_causal!r}")
  api.check_implementation(implementation)
  causal = is_causal

  @functools.wraps(adapter)
  def attention_fn(*args, is_causal: bool = False, **kwargs):
    # Recent nnx MultiHeadAttention passes its call's is_causal (default False): either asks.
    return adapter(*args, is_causal=is_causal or causal, implementation=implementation,
                   **kwargs)

  # The signature flax.linen inspects to choose what to pass: the adapter's, these bound.
  attention_fn.__signature__ = inspect.signature(functools.partial(
      adapter, is_causal=is_causal, implementation=implementation))
  del attention_fn.__wrapped__
  return attention_fn


def linen_attention_fn(*, is_causal: bool = False, implementation: str | None = None):
  """:func:`jaxdrop.linen.dot_product_attention` with options, as flax's ``attention_fn``.

  flax's attention modules call ``attention_fn`` with their own arguments only,
  so options must be bound beforehand; the function returned keeps the
  signature flax inspects. The options are checked here, not at the first call.

  Args:
    is_causal: if True, query ``t`` attends only keys ``s <= t``: causality
      without a ``[B, 1, T, T]`` mask, so that the blockwise and fused paths
      skip the tiles above the diagonal. Pass no causal ``mask`` with it
      (``nn.make_causal_mask``); a padding mask may still be given.
    implementation: as for :func:`jaxdrop.dot_product_attention`.

  Returns:
    A function to pass as ``attention_fn=``.

  Raises:
    TypeError: ``is_causal`` is not a bool.
    ValueError: an unknown ``implementation``.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxdrop
    >>> layer = nn.MultiHeadDotProductAttention(
    ...     num_heads=2, qkv_features=8, dropout_rate=0.1, broadcast_dropout=False,
    ...     attention_fn=jaxdrop.linen.attention_fn(is_causal=True, implementation="xla"))
    >>> x = jnp.ones((1, 4, 8))
    >>> variables = layer.init(jax.random.key(0), x, deterministic=True)
    >>> layer.apply(variables, x, deterministic=True).shape
    (1, 4, 8)
  """
  return _attention_fn(linen_dot_product_attention, is_causal, implementation)


def nnx_attention_fn(*, is_causal: bool = False, implementation: str | None = None):
  """:func:`jaxdrop.nnx.dot_product_attention` with options, as flax's ``attention_fn``.

  As :func:`jaxdrop.linen.attention_fn`, for ``nnx.MultiHeadAttention``. Where
  that module's calls take ``is_causal=`` too (recent flax), a call is causal
  if either says so.

  Args:
    is_causal: if True, query ``t`` attends only keys ``s <= t``, without a mask.
    implementation: as for :func:`jaxdrop.dot_product_attention`.

  Returns:
    A function to pass as ``attention_fn=``.

  Raises:
    TypeError: ``is_causal`` is not a bool.
    ValueError: an unknown ``implementation``.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxdrop
    >>> from flax import nnx
    >>> layer = nnx.MultiHeadAttention(
    ...     num_heads=2, in_features=8, decode=False, rngs=nnx.Rngs(0),
    ...     attention_fn=jaxdrop.nnx.attention_fn(is_causal=True, implementation="xla"))
    >>> layer(jnp.ones((1, 4, 8)), deterministic=True).shape
    (1, 4, 8)
  """
  return _attention_fn(nnx_dot_product_attention, is_causal, implementation)
