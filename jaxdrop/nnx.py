"""Flax NNX modules: drop-in replacements for ``flax.nnx.Dropout``.

Like :mod:`jaxdrop.linen`, the modules only resolve ``deterministic`` and the
key, then call the pure functions. ``model.train()``, ``model.eval()`` and
``nnx.view(model, deterministic=...)`` work as they do for flax's modules. A
missing rng stream is an error: jaxdrop does not fall back to another stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdrop import _dropout
from jaxdrop import _variants

__all__ = [
    "AlphaDropout",
    "DropConnectDense",
    "DropPath",
    "Dropout",
    "GaussianDropout",
    "SpatialDropout",
]

_DETERMINISTIC_HELP = (
    "No `deterministic` argument was given to {cls}. Options:\n"
    "  1. pass it to the constructor: {cls}(..., deterministic=True/False);\n"
    "  2. pass it to the call: layer(x, deterministic=True/False);\n"
    "  3. use model.train() / model.eval(), or "
    "nnx.view(model, deterministic=True/False)."
)


def stream_of(rngs: Any, rng_collection: str, owner: str) -> nnx.RngStream | None:
  """The ``rng_collection`` stream of ``rngs`` (an Rngs, an RngStream or None)."""
  if rngs is None or isinstance(rngs, nnx.RngStream):
    return rngs
  if isinstance(rngs, nnx.Rngs):
    if rng_collection not in rngs:
      raise ValueError(
          f"{owner} needs an rng stream named {rng_collection!r}, but the Rngs "
          f"given has only {sorted(rngs)}. Create it explicitly, e.g. "
          f"nnx.Rngs(params=0, {rng_collection}=1); jaxdrop does not fall back "
          "to the 'default' or 'params' stream."
      )
    return rngs[rng_collection]
  raise TypeError(
      f"rngs must be an nnx.Rngs, an nnx.RngStream, a key or None, got "
      f"{type(rngs).__name__}"
  )


def call_key(
    rngs: Any, own: nnx.RngStream | None, rng_collection: str, owner: str
) -> jax.Array:
  """A fresh key from the call's ``rngs`` (or a key), else the module's stream."""
  if isinstance(rngs, jax.Array):
    return rngs
  stream = stream_of(rngs, rng_collection, owner) or own
  if stream is None:
    raise ValueError(
        f"{owner} is active (deterministic=False) but has no rng stream: pass "
        f"rngs=nnx.Rngs({rng_collection}=seed) to the constructor, or "
        "rngs=... (an Rngs, RngStream or key) to the call, or use "
        "deterministic=True / model.eval()."
    )
  return stream()


class _Stochastic:
  """Flag and key plumbing shared by every module here; the math is elsewhere.

  A subclass calls ``_init_stochastic`` from its constructor and implements
  ``_apply(key, inputs, deterministic)`` by calling its pure function.
  """

  def _init_stochastic(
      self,
      rate: float,
      deterministic: bool | None,
      rng_collection: str,
      rngs: nnx.Rngs | nnx.RngStream | None,
      check_rate: Any = _dropout.static_rate,
  ):
    check_rate(rate)
    self.rate = rate
    self.deterministic = deterministic
    self.rng_collection = rng_collection
    stream = stream_of(rngs, rng_collection, type(self).__name__)
    self.rngs = nnx.data(None if stream is None else stream.fork())

  def _flag_and_key(
      self, deterministic: bool | None, rngs: Any
  ) -> tuple[bool, jax.Array | None]:
    """The call's flag (else the module's) and a key when one is used."""
    for flag in (deterministic, self.deterministic):
      if flag is not None:
        deterministic = flag
        break
    else:
      raise ValueError(_DETERMINISTIC_HELP.format(cls=type(self).__name__))
    key = None
    if _dropout.needs_key(self.rate, deterministic):
      key = call_key(rngs, self.rngs, self.rng_collection, type(self).__name__)
    return deterministic, key

  def __call__(
      self,
      inputs: jax.typing.ArrayLike,
      *,
      deterministic: bool | None = None,
      rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None,
  ) -> jax.Array:
    """Applies the layer to ``inputs``.

    Args:
      inputs: the array to transform.
      deterministic: overrides the module's flag for this call.
      rngs: overrides the module's stream for this call: an Rngs, an
        RngStream or a key.

    Returns:
      The transformed inputs (the inputs themselves when deterministic).
    """
    deterministic, key = self._flag_and_key(deterministic, rngs)
    return self._apply(key, inputs, deterministic)

  def set_view(self, deterministic: bool | None = None):
    """Used by ``nnx.view``: sets ``deterministic`` when given."""
    if deterministic is not None:
      self.deterministic = deterministic


class Dropout(_Stochastic, nnx.Module):
  """Dropout layer; same constructor and call as ``flax.nnx.Dropout``.

  Computes :func:`jaxdrop.dropout`: each element is dropped with probability
  ``rate`` (**the probability to drop, not to keep**) and survivors are
  scaled by ``1 / p_keep``.

  Args:
    rate: probability to drop, a float in [0, 1].
    broadcast_dims: axes that share the same mask.
    deterministic: if True, return the input unchanged; the call argument,
      ``model.train()/eval()`` and ``nnx.view`` override it.
    rng_collection: the name of the rng stream to take keys from.
    rngs: an ``nnx.Rngs`` holding that stream (forked here), an
      ``nnx.RngStream``, or None to pass keys at call time.
    bits: 32 (default) or 16 for the fast mode; see :func:`jaxdrop.dropout`.

  Examples:
    >>> import jax.numpy as jnp, jaxdrop
    >>> from flax import nnx
    >>> layer = jaxdrop.nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=0))
    >>> y = layer(jnp.ones(4))
    >>> bool(jnp.all((y == 0) | (y == 2)))
    True
    >>> layer.eval()
    >>> layer(jnp.ones(2))
    Array([1., 1.], dtype=float32)
  """

  def __init__(
      self,
      rate: float,
      *,
      broadcast_dims: Sequence[int] = (),
      deterministic: bool | None = False,
      rng_collection: str = "dropout",
      rngs: nnx.Rngs | nnx.RngStream | None = None,
      bits: int = 32,
  ):
    self.bits = _dropout.check_bits(bits)
    self.broadcast_dims = tuple(broadcast_dims)
    self._init_stochastic(rate, deterministic, rng_collection, rngs)

  def _apply(self, key, inputs, deterministic):
    return _dropout.dropout(
        key,
        inputs,
        self.rate,
        deterministic,
        broadcast_dims=self.broadcast_dims,
        bits=self.bits,
    )


class SpatialDropout(_Stochastic, nnx.Module):
  """Drops whole channels; see :func:`jaxdrop.spatial_dropout`.

  One decision per (example, channel), shared over the other axes, with
  probability ``rate`` (**the probability to drop**); kept channels are
  scaled by ``1 / p_keep``.

  Args:
    rate: probability to drop a channel, a float in [0, 1].
    channel_axis: the channel axis (-1 for NHWC, 1 for NCHW).
    batch_axis: the example axis, or None for unbatched inputs.
    deterministic: if True, return the input unchanged; the call argument,
      ``model.train()/eval()`` and ``nnx.view`` override it.
    rng_collection: the name of the rng stream to take keys from.
    rngs: an ``nnx.Rngs`` holding that stream (forked here), an
      ``nnx.RngStream``, or None to pass keys at call time.

  Examples:
    >>> import jax.numpy as jnp, jaxdrop
    >>> from flax import nnx
    >>> layer = jaxdrop.nnx.SpatialDropout(0.5, rngs=nnx.Rngs(dropout=0))
    >>> y = layer(jnp.ones((2, 4, 4, 3)))
    >>> bool(jnp.all(y == y[:, :1, :1, :]))
    True
  """

  def __init__(
      self,
      rate: float,
      *,
      channel_axis: int = -1,
      batch_axis: int | None = 0,
      deterministic: bool | None = False,
      rng_collection: str = "dropout",
      rngs: nnx.Rngs | nnx.RngStream | None = None,
  ):
    self.channel_axis = channel_axis
    self.batch_axis = batch_axis
    self._init_stochastic(rate, deterministic, rng_collection, rngs)

  def _apply(self, key, inputs, deterministic):
    return _variants.spatial_dropout(
        key,
        inputs,
        self.rate,
        deterministic,
        channel_axis=self.channel_axis,
        batch_axis=self.batch_axis,
    )


class AlphaDropout(_Stochastic, nnx.Module):
  """Alpha dropout for SELU networks; see :func:`jaxdrop.alpha_dropout`.

  Args:
    rate: probability to drop a unit, a float in [0, 1].
    deterministic: if True, return the input unchanged; the call argument,
      ``model.train()/eval()`` and ``nnx.view`` override it.
    rng_collection: the name of the rng stream to take keys from.
    rngs: an ``nnx.Rngs`` holding that stream (forked here), an
      ``nnx.RngStream``, or None to pass keys at call time.

  Examples:
    >>> import jax.numpy as jnp, jaxdrop
    >>> from flax import nnx
    >>> layer = jaxdrop.nnx.AlphaDropout(0.1, rngs=nnx.Rngs(dropout=0))
    >>> layer.eval()
    >>> layer(jnp.ones(3))
    Array([1., 1., 1.], dtype=float32)
  """

  def __init__(
      self,
      rate: float,
      *,
      deterministic: bool | None = False,
      rng_collection: str = "dropout",
      rngs: nnx.Rngs | nnx.RngStream | None = None,
  ):
    self._init_stochastic(rate, deterministic, rng_collection, rngs)

  def _apply(self, key, inputs, deterministic):
    return _variants.alpha_dropout(key, inputs, self.rate, deterministic)


class GaussianDropout(_Stochastic, nnx.Module):
  """Multiplicative N(1, rate / (1 - rate)) noise; see :func:`jaxdrop.gaussian_dropout`.

  Args:
    rate: the dropout rate whose variance the noise matches, in [0, 1).
    deterministic: if True, return the input unchanged; the call argument,
      ``model.train()/eval()`` and ``nnx.view`` override it.
    rng_collection: the name of the rng stream to take keys from.
    rngs: an ``nnx.Rngs`` holding that stream (forked here), an
      ``nnx.RngStream``, or None to pass keys at call time.

  Examples:
    >>> import jax.numpy as jnp, jaxdrop
    >>> from flax import nnx
    >>> layer = jaxdrop.nnx.GaussianDropout(0.5, rngs=nnx.Rngs(dropout=0))
    >>> layer(jnp.ones(3)).shape
    (3,)
  """

  def __init__(
      self,
      rate: float,
      *,
      deterministic: bool | None = False,
      rng_collection: str = "dropout",
      rngs: nnx.Rngs | nnx.RngStream | None = None,
  ):
    self._init_stochastic(
        rate, deterministic, rng_collection, rngs, check_rate=_variants.check_gaussian_rate
    )

  def _apply(self, key, inputs, deterministic):
    return _variants.gaussian_dropout(key, inputs, self.rate, deterministic)


class DropPath(_Stochastic, nnx.Module):
  """Stochastic depth for a residual branch; see :func:`jaxdrop.drop_path`.

  Use it as ``x + self.drop_path(f(x))``, with rates from
  :func:`jaxdrop.drop_path_rates`.

  Args:
    rate: probability to drop an example's branch, a float in [0, 1].
    batch_axis: the example axis.
    deterministic: if True, return the input unchanged; the call argument,
      ``model.train()/eval()`` and ``nnx.view`` override it.
    rng_collection: the name of the rng stream to take keys from.
    rngs: an ``nnx.Rngs`` holding that stream (forked here), an
      ``nnx.RngStream``, or None to pass keys at call time.

  Examples:
    >>> import jax.numpy as jnp, jaxdrop
    >>> from flax import nnx
    >>> layer = jaxdrop.nnx.DropPath(0.5, rngs=nnx.Rngs(dropout=0))
    >>> y = layer(jnp.ones((4, 3)))
    >>> bool(jnp.all(y == y[:, :1]))
    True
  """

  def __init__(
      self,
      rate: float,
      *,
      batch_axis: int = 0,
      deterministic: bool | None = False,
      rng_collection: str = "dropout",
      rngs: nnx.Rngs | nnx.RngStream | None = None,
  ):
    self.batch_axis = batch_axis
    self._init_stochastic(rate, deterministic, rng_collection, rngs)

  def _apply(self, key, inputs, deterministic):
    return _variants.drop_path(
        key, inputs, self.rate, deterministic, batch_axis=self.batch_axis
    )


class DropConnectDense(_Stochastic, nnx.Linear):
  """``nnx.Linear`` whose kernel is masked by :func:`jaxdrop.dropconnect` each call.

  The parameters are those of ``nnx.Linear``. Each call drops every weight
  with probability ``rate`` (**the probability to drop**) and scales the kept
  ones by ``1 / p_keep``; one mask is shared by the batch. The bias is not
  dropped.

  Args:
    in_features: the number of input features.
    out_features: the number of output features.
    rate: probability to drop a weight, a float in [0, 1].
    deterministic: if True, use the kernel unmasked; the call argument,
      ``model.train()/eval()`` and ``nnx.view`` override it.
    rng_collection: the name of the rng stream to take keys from.
    rngs: an ``nnx.Rngs`` with a ``'params'`` (or default) stream for the
      initializers and the ``rng_collection`` stream (forked here).
    **linear_kwargs: passed to ``nnx.Linear`` (``use_bias``, ``dtype``,
      ``param_dtype``, ``precision``, ``kernel_init``, ``bias_init``, ...).

  Examples:
    >>> import jax.numpy as jnp, jaxdrop
    >>> from flax import nnx
    >>> layer = jaxdrop.nnx.DropConnectDense(3, 4, 0.5, rngs=nnx.Rngs(params=0, dropout=1))
    >>> layer(jnp.ones((2, 3))).shape
    (2, 4)
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      rate: float,
      *,
      deterministic: bool | None = False,
      rng_collection: str = "dropout",
      rngs: nnx.Rngs,
      **linear_kwargs: Any,
  ):
    super().__init__(in_features, out_features, rngs=rngs, **linear_kwargs)
    self._init_stochastic(rate, deterministic, rng_collection, rngs)

  def _apply(self, key, inputs, deterministic):
    kernel = _variants.dropconnect(key, self.kernel[...], self.rate, deterministic)
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
    kwargs = {}
    if self.preferred_element_type is not None:
      kwargs["preferred_element_type"] = self.preferred_element_type
    y = self.dot_general(
        inputs,
        kernel,
        (((inputs.ndim - 1,), (0,)), ((), ())),
        precision=self.precision,
        **kwargs,
    )
    if bias is not None:
      y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y
