"""Flax linen modules: drop-in replacements for ``flax.linen.Dropout``.

The modules hold no mathematics: they resolve ``deterministic`` and the key,
then call the pure functions in :mod:`jaxdrop`. Every module here has these
fields and call arguments, as ``flax.linen.Dropout`` does:

* ``rate``: the probability to **drop**; a float checked at construction, or
  a scalar array (e.g. a schedule's value) that may be traced.
* ``deterministic`` (field) and ``deterministic`` (call argument): if True,
  the layer is the identity (DropConnect: uses its kernel unmasked;
  ReluDropout: is ``relu``). As in flax, exactly one of the two must be set
  (``nn.merge_param``); it must be a Python bool.
* ``rng_collection``: the rng stream the key is drawn from (``'dropout'``);
  the call argument ``rng=key`` passes a key directly instead.

Differences from flax, each an error that says what to do: a missing rng
stream is an error, never a silent fallback to the ``'params'`` stream (which
would reuse initialization randomness), so a model initialized in training
mode needs ``model.init({'params': k1, 'dropout': k2}, ...)``; a
``deterministic`` that is not a Python bool and a non-floating input are
``TypeError`` s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdrop import _dropout
from jaxdrop import _validate
from jaxdrop import _variants
from jaxdrop._attention.flax_compat import linen_attention_fn as attention_fn
from jaxdrop._attention.flax_compat import linen_dot_product_attention as dot_product_attention

__all__ = [
    "AlphaDropout",
    "DropConnectDense",
    "DropPath",
    "Dropout",
    "attention_fn",
    "dot_product_attention",
    "GaussianDropout",
    "ReluDropout",
    "SpatialDropout",
]


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


class _Stochastic(nn.Module):
  """Flag and key plumbing shared by the modules here; the math is elsewhere.

  A subclass declares the fields ``rate``, ``deterministic`` and
  ``rng_collection`` (plus its own), its pure ``function(key, x, rate,
  deterministic, **options)`` and, if it has any, ``_options()``.
  """

  function: ClassVar[Callable[..., jax.Array]]

  def __post_init__(self):
    _variants.rate_check(type(self).function)(self.rate)
    super().__post_init__()

  def _options(self) -> dict[str, Any]:
    """Keyword arguments of ``function`` besides its key, input, rate and flag."""
    return {}

  def _flag_and_key(
      self, deterministic: bool | None, rng: jax.Array | None
  ) -> tuple[bool, jax.Array | None]:
    """Merges ``deterministic`` as flax does; draws a key only when one is used."""
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    if rng is None and _dropout.needs_key(self.rate, _validate.check_deterministic(deterministic)):
      rng = dropout_key(self, self.rng_collection)
    return deterministic, rng

  @nn.compact
  def __call__(
      self,
      inputs: jax.typing.ArrayLike,
      deterministic: bool | None = None,
      rng: jax.Array | None = None,
  ) -> jax.Array:
    """Applies the layer to ``inputs``.

    Args:
      inputs: the array to transform.
      deterministic: if True, return the inputs unchanged (``ReluDropout``:
        their relu). As in flax, give it either here or as the field, not
        both (``nn.merge_param``).
      rng: a key to use instead of the ``rng_collection`` stream.

    Returns:
      The transformed inputs (the inputs themselves when deterministic).
    """
    deterministic, rng = self._flag_and_key(deterministic, rng)
    return type(self).function(rng, inputs, self.rate, deterministic, **self._options())


class Dropout(_Stochastic):
  """Dropout layer; same fields and call as ``flax.linen.Dropout``.

  Computes :func:`jaxdrop.dropout` with a key from the ``rng_collection``
  stream: each element is dropped with probability ``rate`` (**the
  probability to drop, not to keep**) and survivors are scaled by
  ``1 / p_keep``.

  Attributes:
    rate: probability to drop an element.
    broadcast_dims: axes that share the same mask.
    deterministic: see the module docstring.
    rng_collection: see the module docstring.
    bits: 32 (default) or 16 for the fast mode; see :func:`jaxdrop.dropout`.

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
  bits: int = 32

  function = staticmethod(_dropout.dropout)

  def __post_init__(self):
    _validate.check_bits(self.bits)
    super().__post_init__()

  def _options(self):
    return {"broadcast_dims": self.broadcast_dims, "bits": self.bits}


class ReluDropout(Dropout):
  """``nn.relu`` then :class:`Dropout` in one layer, whose backward pass keeps only its output.

  Computes :func:`jaxdrop.relu_dropout`, equal in value and gradient (for a
  valid rate) to ``Dropout(rate)(nn.relu(inputs))``. The backward pass needs
  only the output, which the next layer keeps anyway, so ``Dense ->
  ReluDropout -> Dense`` trains in the memory of ``Dense -> relu -> Dense``.
  When deterministic it returns ``nn.relu(inputs)``. Reverse-mode
  differentiation only (a ``custom_vjp``).

  Attributes:
    rate, broadcast_dims, deterministic, rng_collection, bits: as for
      :class:`Dropout`.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxdrop
    >>> layer = jaxdrop.linen.ReluDropout(0.5)
    >>> layer.apply({}, jnp.array([-1.0, 3.0]), deterministic=True)
    Array([0., 3.], dtype=float32)
  """

  function = staticmethod(_dropout.relu_dropout)


# ----------------------------------------------------------------------------
# Variants: each module resolves its flag and key, then calls the function in
# jaxdrop._variants, where the mathematics lives.


class SpatialDropout(_Stochastic):
  """Drops whole channels; see :func:`jaxdrop.spatial_dropout`.

  One decision per (example, channel), shared over the other axes, with
  probability ``rate`` (**the probability to drop**); kept channels are
  scaled by ``1 / p_keep``.

  Attributes:
    rate: probability to drop a channel.
    channel_axis: the channel axis (-1 for NHWC, 1 for NCHW).
    batch_axis: the example axis, or None for unbatched inputs.
    deterministic: see the module docstring.
    rng_collection: see the module docstring.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxdrop
    >>> layer = jaxdrop.linen.SpatialDropout(0.5, deterministic=False)
    >>> y = layer.apply({}, jnp.ones((2, 4, 4, 3)), rngs={"dropout": jax.random.key(0)})
    >>> bool(jnp.all(y == y[:, :1, :1, :]))
    True
  """

  rate: float | jax.Array
  channel_axis: int = -1
  batch_axis: int | None = 0
  deterministic: bool | None = None
  rng_collection: str = "dropout"

  function = staticmethod(_variants.spatial_dropout)

  def _options(self):
    return {"channel_axis": self.channel_axis, "batch_axis": self.batch_axis}


class AlphaDropout(_Stochastic):
  """Alpha dropout for SELU networks; see :func:`jaxdrop.alpha_dropout`.

  Dropped units take SELU's saturation value, then an affine map restores
  mean 0 and variance 1 for standardized inputs.

  Attributes:
    rate: probability to drop a unit.
    deterministic: see the module docstring.
    rng_collection: see the module docstring.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxdrop
    >>> layer = jaxdrop.linen.AlphaDropout(0.1)
    >>> layer.apply({}, jnp.ones(3), deterministic=True)
    Array([1., 1., 1.], dtype=float32)
  """

  rate: float | jax.Array
  deterministic: bool | None = None
  rng_collection: str = "dropout"

  function = staticmethod(_variants.alpha_dropout)


class GaussianDropout(_Stochastic):
  """Multiplicative N(1, rate / (1 - rate)) noise; see :func:`jaxdrop.gaussian_dropout`.

  Attributes:
    rate: the dropout rate whose variance the noise matches, below 1.
    deterministic: see the module docstring.
    rng_collection: see the module docstring.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxdrop
    >>> layer = jaxdrop.linen.GaussianDropout(0.5)
    >>> y = layer.apply({}, jnp.ones(3), deterministic=False,
    ...                 rngs={"dropout": jax.random.key(0)})
    >>> y.shape
    (3,)
  """

  rate: float | jax.Array
  deterministic: bool | None = None
  rng_collection: str = "dropout"

  function = staticmethod(_variants.gaussian_dropout)


class DropPath(_Stochastic):
  """Stochastic depth for a residual branch; see :func:`jaxdrop.drop_path`.

  Each example's branch is dropped with probability ``rate`` (**the
  probability to drop**); kept ones are scaled by ``1 / p_keep``. Use it as
  ``x + DropPath(rate)(f(x))``, with rates from :func:`jaxdrop.drop_path_rates`.

  Attributes:
    rate: probability to drop an example's branch.
    batch_axis: the example axis.
    deterministic: see the module docstring.
    rng_collection: see the module docstring.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxdrop
    >>> layer = jaxdrop.linen.DropPath(0.5, deterministic=False)
    >>> y = layer.apply({}, jnp.ones((4, 3)), rngs={"dropout": jax.random.key(0)})
    >>> bool(jnp.all(y == y[:, :1]))
    True
  """

  rate: float | jax.Array
  batch_axis: int = 0
  deterministic: bool | None = None
  rng_collection: str = "dropout"

  function = staticmethod(_variants.drop_path)

  def _options(self):
    return {"batch_axis": self.batch_axis}


class DropConnectDense(_Stochastic):
  """``nn.Dense`` whose kernel is masked each call; see :func:`jaxdrop.dropconnect_dense`.

  The parameters (``kernel``, ``bias``) are those of ``flax.linen.Dense``, so
  the two load each other's variables. Each call drops every weight with
  probability ``rate`` (**the probability to drop**) and scales the kept ones
  by ``1 / p_keep``; one mask is shared by the batch. The bias is not dropped.

  Attributes:
    features: the number of output features.
    rate: probability to drop a weight.
    use_bias, dtype, param_dtype, precision, kernel_init, bias_init: as for
      ``nn.Dense``.
    deterministic: see the module docstring (True: the kernel unmasked).
    rng_collection: see the module docstring.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxdrop
    >>> layer = jaxdrop.linen.DropConnectDense(4, rate=0.5)
    >>> x = jnp.ones((2, 3))
    >>> variables = layer.init(jax.random.key(0), x, deterministic=True)
    >>> y = layer.apply(variables, x, deterministic=False,
    ...                 rngs={"dropout": jax.random.key(1)})
    >>> y.shape
    (2, 4)
  """

  features: int
  rate: float | jax.Array
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Callable[..., jax.Array] = nn.initializers.lecun_normal()
  bias_init: Callable[..., jax.Array] = nn.initializers.zeros_init()
  deterministic: bool | None = None
  rng_collection: str = "dropout"

  function = staticmethod(_variants.dropconnect_dense)

  @nn.compact
  def __call__(
      self,
      inputs: jax.typing.ArrayLike,
      deterministic: bool | None = None,
      rng: jax.Array | None = None,
  ) -> jax.Array:
    """Applies the layer with a freshly masked kernel (unmasked if deterministic)."""
    inputs = jnp.asarray(inputs)
    kernel = self.param(
        "kernel", self.kernel_init, (inputs.shape[-1], self.features), self.param_dtype
    )
    bias = None
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
    deterministic, rng = self._flag_and_key(deterministic, rng)
    return _variants.dropconnect_dense(
        rng, inputs, kernel, bias, self.rate, deterministic,
        dtype=self.dtype, precision=self.precision,
    )
