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

__all__ = ["Dropout"]

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
      f"rngs must be an nnx.Rngs, an nnx.RngStream or None, got {type(rngs).__name__}"
  )


def call_key(
    rngs: Any, own: nnx.RngStream | None, rng_collection: str, owner: str
) -> jax.Array:
  """A fresh key from the call's ``rngs`` (or a key), else the module's stream."""
  if isinstance(rngs, (jax.Array, jnp.ndarray)) and not isinstance(rngs, nnx.Variable):
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


class Dropout(nnx.Module):
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
  ):
    _dropout.static_rate(rate)
    self.rate = rate
    self.broadcast_dims = tuple(broadcast_dims)
    self.deterministic = deterministic
    self.rng_collection = rng_collection
    stream = stream_of(rngs, rng_collection, type(self).__name__)
    self.rngs = nnx.data(None if stream is None else stream.fork())

  def __call__(
      self,
      inputs: jax.typing.ArrayLike,
      *,
      deterministic: bool | None = None,
      rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None,
  ) -> jax.Array:
    """Applies dropout to ``inputs``.

    Args:
      inputs: the array to mask.
      deterministic: overrides the module's flag for this call.
      rngs: overrides the module's stream for this call: an Rngs, an
        RngStream or a key.

    Returns:
      The masked, rescaled inputs (the inputs themselves when deterministic).
    """
    for flag in (deterministic, self.deterministic):
      if flag is not None:
        deterministic = flag
        break
    else:
      raise ValueError(_DETERMINISTIC_HELP.format(cls=type(self).__name__))
    key = None
    if not deterministic and _dropout.static_rate(self.rate) != 0.0:
      key = call_key(rngs, self.rngs, self.rng_collection, type(self).__name__)
    return _dropout.dropout(
        key, inputs, self.rate, deterministic, broadcast_dims=self.broadcast_dims
    )

  def set_view(self, deterministic: bool | None = None):
    """Used by ``nnx.view``: sets ``deterministic`` when given."""
    if deterministic is not None:
      self.deterministic = deterministic
