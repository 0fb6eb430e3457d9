"""Flax NNX modules: drop-in replacements for ``flax.nnx.Dropout``.

Like :mod:`jaxdrop.linen`, the modules only resolve ``deterministic`` and the
key, then call the pure functions. Every module here takes these constructor
and call arguments, as ``flax.nnx.Dropout`` does:

* ``rate``: the probability to **drop**, checked at construction.
* ``deterministic``: if True, the layer is the identity (DropConnect: uses its
  kernel unmasked; ReluDropout: is ``relu``). The call argument overrides the
  constructor's, and ``model.train()``, ``model.eval()`` and
  ``nnx.view(model, deterministic=...)`` set it. It must be a Python bool.
* ``rng_collection``: the name of the stream keys come from (``'dropout'``).
* ``rngs`` (constructor): an ``nnx.Rngs``, whose ``rng_collection`` stream is
  forked here, falling back to its ``'default'`` stream as in flax (so
  ``nnx.Rngs(0)`` works and parameter initialization never reuses a dropout
  key); an ``nnx.RngStream`` (forked); or None, to pass keys at call time.
* ``rngs`` (call): overrides the module's stream for one call: an
  ``nnx.Rngs`` (its ``rng_collection`` stream, else ``'default'``), an
  ``nnx.RngStream`` or a key.

Differences from flax: an ``nnx.Rngs`` with neither the named stream nor a
``'default'`` one is a ``ValueError`` that lists the options (flax: a
``KeyError``); a ``deterministic`` that is not a Python bool, and a
non-floating input, are ``TypeError`` s; a call that raises leaves the
stream's count unchanged.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.module import first_from

from jaxdrop import _dropout
from jaxdrop import _validate
from jaxdrop import _variants
from jaxdrop._attention.flax_compat import nnx_attention_fn as attention_fn
from jaxdrop._attention.flax_compat import nnx_dot_product_attention as dot_product_attention

__all__ = [
    "AlphaDropout",
    "DropConnectLinear",
    "DropPath",
    "Dropout",
    "attention_fn",
    "dot_product_attention",
    "GaussianDropout",
    "ReluDropout",
    "SpatialDropout",
]

_DETERMINISTIC_HELP = (
    "No `deterministic` argument was given to {cls}. Options:\n"
    "  1. pass it to the constructor: {cls}(..., deterministic=True/False);\n"
    "  2. pass it to the call: layer(x, deterministic=True/False);\n"
    "  3. use model.train() / model.eval(), or "
    "nnx.view(model, deterministic=True/False)."
)
_NO_STREAM_HELP = (
    "{cls} is active (deterministic=False) but has no rng stream. Options:\n"
    "  1. pass rngs=nnx.Rngs(seed) or nnx.Rngs({name}=seed) to the constructor;\n"
    "  2. pass rngs=... (an Rngs, an RngStream or a key) to the call;\n"
    "  3. use deterministic=True, model.eval() or "
    "nnx.view(model, deterministic=True)."
)


def stream_of(rngs: Any, rng_collection: str, owner: str) -> nnx.RngStream | None:
  """The ``rng_collection`` stream of ``rngs``, else its ``'default'`` one, as in flax.

  ``rngs`` is an ``nnx.Rngs``, an ``nnx.RngStream`` (returned as is) or None.
  """
  if rngs is None or isinstance(rngs, nnx.RngStream):
    return rngs
  if isinstance(rngs, nnx.Rngs):
    try:
      return rngs[rng_collection]
    except KeyError:
      raise ValueError(
          f"{owner} needs an rng stream named {rng_collection!r} or 'default', "
          f"but the Rngs given has only {sorted(rngs)}. Options:\n"
          f"  1. nnx.Rngs(seed): one 'default' stream that every module forks;\n"
          f"  2. nnx.Rngs(params=0, {rng_collection}=1): a stream of its own;\n"
          f"  3. rng_collection=<one of {sorted(rngs)}>."
      ) from None
  raise TypeError(
      f"rngs must be an nnx.Rngs, an nnx.RngStream or None (at call time also "
      f"a key), got "
      f"rngs={rngs!r} of type {type(rngs).__name__}"
  )


class _Stochastic:
  """Flag and key plumbing shared by every module here; the math is elsewhere.

  A subclass declares its pure ``function(key, x, rate, deterministic,
  **options)``, calls ``_init_stochastic`` from its constructor and, if it
  has options, defines ``_options()``; or it overrides ``_apply``.
  """

  function: ClassVar[Callable[..., jax.Array]]

  def _init_stochastic(
      self,
      rate: float,
      deterministic: bool | None,
      rng_collection: str,
      rngs: nnx.Rngs | nnx.RngStream | None,
  ):
    _variants.rate_check(type(self).function)(rate)
    self.rate = rate
    self.deterministic = deterministic
    self.rng_collection = rng_collection
    stream = stream_of(rngs, rng_collection, type(self).__name__)
    self.rngs = nnx.data(None if stream is None else stream.fork())

  def _options(self) -> dict[str, Any]:
    """Keyword arguments of ``function`` besides its key, input, rate and flag."""
    return {}

  def _apply(self, key: jax.Array | None, inputs: Any, deterministic: bool) -> jax.Array:
    return type(self).function(key, inputs, self.rate, deterministic, **self._options())

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
    name = type(self).__name__
    deterministic = _validate.check_deterministic(
        first_from(
            deterministic, self.deterministic, error_msg=_DETERMINISTIC_HELP.format(cls=name)
        )
    )
    if not _dropout.needs_key(self.rate, deterministic):
      return self._apply(None, inputs, deterministic)
    rngs = first_from(
        rngs,
        self.rngs,
        error_msg=_NO_STREAM_HELP.format(cls=name, name=self.rng_collection),
    )
    if isinstance(rngs, jax.Array):
      return self._apply(rngs, inputs, deterministic)
    stream = stream_of(rngs, self.rng_collection, name)
    count = stream.count[...]
    try:
      return self._apply(stream(), inputs, deterministic)
    except Exception:
      stream.count[...] = count  # A failed call does not advance the stream.
      raise

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
    rate: probability to drop an element, a float in [0, 1].
    broadcast_dims: axes that share the same mask (an int or ints).
    deterministic: see the module docstring.
    rng_collection: see the module docstring.
    rngs: see the module docstring.
    bits: 32 (default) or 16 for the fast mode; see :func:`jaxdrop.dropout`.

  Examples:
    >>> import jax.numpy as jnp, jaxdrop
    >>> from flax import nnx
    >>> layer = jaxdrop.nnx.Dropout(0.5, rngs=nnx.Rngs(0))
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
    self.bits = _validate.check_bits(bits)
    self.broadcast_dims = _validate.static_ints(
        broadcast_dims, "broadcast_dims", "an int or a sequence of ints"
    )
    self._init_stochastic(rate, deterministic, rng_collection, rngs)

  function = staticmethod(_dropout.dropout)

  def _options(self):
    return {"broadcast_dims": self.broadcast_dims, "bits": self.bits}


class ReluDropout(Dropout):
  """``nnx.relu`` then :class:`Dropout` in one layer, whose backward pass keeps only its output.

  Computes :func:`jaxdrop.relu_dropout`, equal in value and gradient (for a
  valid rate) to ``Dropout(rate)(nnx.relu(x))``. The backward pass needs only
  the output, which the next layer keeps anyway, so ``Linear -> ReluDropout
  -> Linear`` trains in the memory of ``Linear -> relu -> Linear``. When
  deterministic it returns ``nnx.relu(x)``. Reverse-mode differentiation only
  (a ``custom_vjp``).

  Args:
    rate, broadcast_dims, deterministic, rng_collection, rngs, bits: as for
      :class:`Dropout`.

  Examples:
    >>> import jax.numpy as jnp, jaxdrop
    >>> from flax import nnx
    >>> layer = jaxdrop.nnx.ReluDropout(0.5, rngs=nnx.Rngs(0))
    >>> layer.eval()
    >>> layer(jnp.array([-1.0, 3.0]))
    Array([0., 3.], dtype=float32)
  """

  function = staticmethod(_dropout.relu_dropout)


class SpatialDropout(_Stochastic, nnx.Module):
  """Drops whole channels; see :func:`jaxdrop.spatial_dropout`.

  One decision per (example, channel), shared over the other axes, with
  probability ``rate`` (**the probability to drop**); kept channels are
  scaled by ``1 / p_keep``.

  Args:
    rate: probability to drop a channel, a float in [0, 1].
    channel_axis: the channel axis (-1 for NHWC, 1 for NCHW).
    batch_axis: the example axis, or None for unbatched inputs.
    deterministic: see the module docstring.
    rng_collection: see the module docstring.
    rngs: see the module docstring.

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

  function = staticmethod(_variants.spatial_dropout)

  def _options(self):
    return {"channel_axis": self.channel_axis, "batch_axis": self.batch_axis}


class _RateOnly(_Stochastic, nnx.Module):
  """A module whose one option is its rate: the constructor they share."""

  def __init__(
      self,
      rate: float,
      *,
      deterministic: bool | None = False,
      rng_collection: str = "dropout",
      rngs: nnx.Rngs | nnx.RngStream | None = None,
  ):
    self._init_stochastic(rate, deterministic, rng_collection, rngs)


class AlphaDropout(_RateOnly):
  """Alpha dropout for SELU networks; see :func:`jaxdrop.alpha_dropout`.

  Args:
    rate: probability to drop a unit, a float in [0, 1].
    deterministic: see the module docstring.
    rng_collection: see the module docstring.
    rngs: see the module docstring.

  Examples:
    >>> import jax.numpy as jnp, jaxdrop
    >>> from flax import nnx
    >>> layer = jaxdrop.nnx.AlphaDropout(0.1, rngs=nnx.Rngs(dropout=0))
    >>> layer.eval()
    >>> layer(jnp.ones(3))
    Array([1., 1., 1.], dtype=float32)
  """

  function = staticmethod(_variants.alpha_dropout)


class GaussianDropout(_RateOnly):
  """Multiplicative N(1, rate / (1 - rate)) noise; see :func:`jaxdrop.gaussian_dropout`.

  Args:
    rate: the dropout rate whose variance the noise matches, in [0, 1).
    deterministic: see the module docstring.
    rng_collection: see the module docstring.
    rngs: see the module docstring.

  Examples:
    >>> import jax.numpy as jnp, jaxdrop
    >>> from flax import nnx
    >>> layer = jaxdrop.nnx.GaussianDropout(0.5, rngs=nnx.Rngs(dropout=0))
    >>> layer(jnp.ones(3)).shape
    (3,)
  """

  function = staticmethod(_variants.gaussian_dropout)


class DropPath(_Stochastic, nnx.Module):
  """Stochastic depth for a residual branch; see :func:`jaxdrop.drop_path`.

  Use it as ``x + self.drop_path(f(x))``, with rates from
  :func:`jaxdrop.drop_path_rates`.

  Args:
    rate: probability to drop an example's branch, a float in [0, 1].
    batch_axis: the example axis.
    deterministic: see the module docstring.
    rng_collection: see the module docstring.
    rngs: see the module docstring.

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

  function = staticmethod(_variants.drop_path)

  def _options(self):
    return {"batch_axis": self.batch_axis}


class DropConnectLinear(_Stochastic, nnx.Linear):
  """``nnx.Linear`` whose kernel is masked each call; see :func:`jaxdrop.dropconnect_dense`.

  The parameters are those of ``nnx.Linear``. Each call drops every weight
  with probability ``rate`` (**the probability to drop**) and scales the kept
  ones by ``1 / p_keep``; one mask is shared by the batch. The bias is not
  dropped.

  Args:
    in_features: the number of input features.
    out_features: the number of output features.
    rate: probability to drop a weight, a float in [0, 1].
    use_bias, dtype, param_dtype, precision, kernel_init, bias_init: as for
      ``nnx.Linear``.
    deterministic: see the module docstring (True: the kernel unmasked).
    rng_collection: see the module docstring.
    rngs: an ``nnx.Rngs`` for the initializers (its ``'params'`` stream, else
      ``'default'``), whose ``rng_collection`` stream (else ``'default'``) is
      forked for the masks.

  Examples:
    >>> import jax.numpy as jnp, jaxdrop
    >>> from flax import nnx
    >>> layer = jaxdrop.nnx.DropConnectLinear(3, 4, 0.5, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 3))).shape
    (2, 4)
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      rate: float,
      *,
      use_bias: bool = True,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      precision: jax.lax.PrecisionLike = None,
      kernel_init: Callable[..., jax.Array] = nnx.initializers.lecun_normal(),
      bias_init: Callable[..., jax.Array] = nnx.initializers.zeros_init(),
      deterministic: bool | None = False,
      rng_collection: str = "dropout",
      rngs: nnx.Rngs,
  ):
    if not isinstance(rngs, nnx.Rngs):
      raise TypeError(
          "rngs must be an nnx.Rngs, for the parameters and the masks, got "
          f"rngs={rngs!r} of type {type(rngs).__name__}"
      )
    super().__init__(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        precision=precision,
        kernel_init=kernel_init,
        bias_init=bias_init,
        rngs=rngs,
    )
    self._init_stochastic(rate, deterministic, rng_collection, rngs)

  function = staticmethod(_variants.dropconnect_dense)

  def _apply(self, key, inputs, deterministic):
    return _variants.dropconnect_dense(
        key,
        inputs,
        self.kernel[...],
        None if self.bias is None else self.bias[...],
        self.rate,
        deterministic,
        dtype=self.dtype,
        precision=self.precision,
    )


class DropConnectDense(DropConnectLinear):
  """Deprecated alias of :class:`DropConnectLinear` (NNX calls the layer Linear)."""

  def __init__(self, *args: Any, **kwargs: Any):
    warnings.warn(
        "jaxdrop.nnx.DropConnectDense is deprecated; use jaxdrop.nnx.DropConnectLinear",
        DeprecationWarning,
        stacklevel=2,
    )
    super().__init__(*args, **kwargs)
