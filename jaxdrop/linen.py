"""Flax linen modules: drop-in replacements for ``flax.linen.Dropout``.

The modules hold no mathematics: they resolve ``deterministic`` and the key,
then call the pure functions in :mod:`jaxdrop`. Unlike flax, a missing rng
stream is an error, never a silent fallback to the ``'params'`` stream.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from jaxdrop import _dropout

__all__ = ["Dropout"]


def dropout_key(module: nn.Module, rng_collection: str) -> jax.Array:
  """``module.make_rng(rng_collection)``, refusing flax's 'params' fallback."""
  if not module.has_rng(rng_collection):
    raise ValueError(
        f"{type(module).__name__}{f' {module.name!r}' if module.name else ''} is "
        "active (deterministic=False) "
        f"but no {rng_collection!r} rng stream was given. Options:\n"
        f"  1. model.apply(variables, x, rngs={{{rng_collection!r}: key}})\n"
        f"     (and model.init({{'params': k1, {rng_collection!r}: k2}}, x) if "
        "init runs in training mode);\n"
        "  2. pass deterministic=True (to the constructor or the call) for "
        "evaluation;\n"
        "  3. pass the key directly: module(x, rng=key).\n"
        "jaxdrop does not fall back to the 'params' stream: that would reuse "
        "initialization randomness for dropout masks."
    )
  return module.make_rng(rng_collection)


def needs_key(rate, deterministic: bool) -> bool:
  return not deterministic and _dropout.static_rate(rate) != 0.0


class Dropout(nn.Module):
  """Dropout layer; same fields and call as ``flax.linen.Dropout``.

  Computes :func:`jaxdrop.dropout` with a key from the ``rng_collection``
  stream: each element is dropped with probability ``rate`` (**the
  probability to drop, not to keep**) and survivors are scaled by
  ``1 / p_keep``.

  Attributes:
    rate: probability to drop; a float in [0, 1], or a scalar array (e.g. a
      schedule's value passed through ``apply``) that may be traced.
    broadcast_dims: axes that share the same mask.
    deterministic: if True, return the input unchanged. Merged with the call
      argument as in flax: exactly one of the two must be set.
    rng_collection: the rng stream the key is drawn from.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxdrop
    >>> layer = jaxdrop.linen.Dropout(0.5)
    >>> y = layer.apply({}, jnp.ones(4), deterministic=False,
    ...                 rngs={"dropout": jax.random.key(0)})
    >>> bool(jnp.all((y == 0) | (y == 2)))
    True
  """

  rate: float | jax.Array
  broadcast_dims: Sequence[int] = ()
  deterministic: bool | None = None
  rng_collection: str = "dropout"

  def __post_init__(self):
    _dropout.static_rate(self.rate)
    super().__post_init__()

  @nn.compact
  def __call__(
      self,
      inputs: jax.typing.ArrayLike,
      deterministic: bool | None = None,
      rng: jax.Array | None = None,
  ) -> jax.Array:
    """Applies dropout to ``inputs``.

    Args:
      inputs: the array to mask.
      deterministic: overrides nothing: must be given here or as a field.
      rng: a key to use instead of the ``rng_collection`` stream.

    Returns:
      The masked, rescaled inputs (the inputs themselves when deterministic).
    """
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    if rng is None and needs_key(self.rate, deterministic):
      rng = dropout_key(self, self.rng_collection)
    return _dropout.dropout(
        rng, inputs, self.rate, deterministic, broadcast_dims=self.broadcast_dims
    )
