"""The argument checks every public function of jaxdrop shares.

Each raises a ``TypeError`` or ``ValueError`` that names the argument and the
value it got, and returns the argument in the form the callers compute with
(a Python int or float, a tuple of axes, a typed PRNG key).
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_BITS = (32, 16)  # The modes: 32-bit decisions (default) or 16-bit (fast).

_KEY_HELP = (
    "Pass a key made with jax.random.key(seed) (or a legacy "
    "jax.random.PRNGKey(seed)); in a training loop use a fresh key each step, "
    "such as jax.random.fold_in(key, step)."
)




def _is_int(value: Any) -> bool:
  return isinstance(value, (numbers.Integral, np.integer)) and not isinstance(
      value, (bool, np.bool_)
  )


def check_int(
    value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None
) -> int:
  """``value`` as a Python int; raises unless it is an int in [minimum, maximum].

  Raises:
    TypeError: ``value`` is not an int (a bool or a float is refused).
    ValueError: ``value`` is outside the bounds.
  """
  if not _is_int(value):
    raise TypeError(f"{name} must be an int, got {name}={value!r}")
  if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
    if maximum is None:
      bounds = f">= {minimum}"
    elif minimum is None:
      bounds = f"<= {maximum}"
    else:
      bounds = f"in [{minimum}, {maximum}]"
    raise ValueError(f"{name} must be an int {bounds}, got {name}={value!r}")
  return int(value)


def static_ints(values: Any, name: str, what: str) -> tuple[int, ...]:
  """An int or a sequence of ints (a NumPy or concrete JAX int array too)."""
  if isinstance(values, (jax.Array, np.ndarray)):
    try:
      array = np.asarray(values)
    except jax.errors.TracerArrayConversionError as error:
      raise TypeError(f"{name} must be static {what}, got a traced array") from error
    if array.dtype.kind not in "iu" or array.ndim > 1:
      raise TypeError(f"{name} must be {what}, got {name}={values!r}")
    return tuple(int(v) for v in array.reshape(-1))
  if _is_int(values):
    return (int(values),)
  try:
    items = tuple(values)
  except TypeError as error:
    raise TypeError(f"{name} must be {what}, got {name}={values!r}") from error
  if not all(_is_int(v) for v in items):
    raise TypeError(f"{name} must be {what}, got {name}={values!r}")
  return tuple(int(v) for v in items)


def static_rate(rate: Any, name: str = "rate") -> float | None:
  """Validates ``rate``; returns it as a float if static, None if an array.

  Python and NumPy scalars (and 0-d NumPy arrays) are static: they are
  checked here and fixed at trace time. A JAX array is dynamic: it may be
  traced, so a schedule can change it every step without recompiling.

  Raises:
    TypeError: ``rate`` is not a real number or array of one.
    ValueError: a static rate outside [0, 1] or NaN, or an array rate that is
      not a scalar.
  """
  if isinstance(rate, (bool, np.bool_)):
    raise TypeError(f"{name} must be a float in [0, 1], got {name}={rate!r}")
  if isinstance(rate, np.ndarray) and rate.shape == () and rate.dtype.kind in "iuf":
    rate = rate.item()  # A NumPy array is concrete: check it like a scalar.
  if isinstance(rate, (numbers.Real, np.integer, np.floating)):
    value = float(rate)
    if not 0.0 <= value <= 1.0:  # False for NaN too.
      raise ValueError(
          f"{name} is the probability to drop an element and must be in "
          f"[0, 1], got {name}={rate!r}"
      )
    return value
  if isinstance(rate, (jax.Array, np.ndarray)):
    dtype = jnp.result_type(rate)
    if not (
        jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)
    ):
      raise TypeError(
          f"{name} must be a real number or a real scalar array, got an array "
          f"of dtype {dtype}"
      )
    if np.shape(rate) != ():
      raise ValueError(
          f"{name} must be a scalar, got an array of shape {np.shape(rate)}"
      )
    return None
  raise TypeError(
      f"{name} must be a float in [0, 1] or a scalar JAX array, got "
      f"{name}={rate!r} of type {type(rate).__name__}"
  )


def check_input(x: Any, name: str = "x") -> jax.Array:
  """Returns ``x`` as a JAX array; raises TypeError unless it is floating."""
  try:
    x = jnp.asarray(x)
  except (TypeError, ValueError) as error:
    raise TypeError(
        f"{name} must be a floating array, got {name}={x!r} of type {type(x).__name__}"
    ) from error
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(
        f"{name} must have a floating dtype (float16, bfloat16, float32 or "
        f"float64), got {name}.dtype={x.dtype}"
    )
  return x


def check_deterministic(deterministic: Any) -> bool:
  if isinstance(deterministic, (bool, np.bool_)):
    return bool(deterministic)
  raise TypeError(
      "deterministic must be a Python bool, fixed at trace time, got "
      f"deterministic={deterministic!r}. To vary dropout strength inside jit, "
      "pass a traced rate instead (rate 0 switches dropout off)."
  )


def normalize_axes(
    axes: Sequence[int] | int, ndim: int, name: str = "broadcast_dims"
) -> tuple[int, ...]:
  """Non-negative, validated axes; raises on bad types, range or repeats.

  ``axes`` is an int or a sequence of ints, including a NumPy or concrete JAX
  integer array.
  """
  normalized = []
  for axis in static_ints(axes, name, "a sequence of ints"):
    if not -ndim <= axis < ndim:
      raise ValueError(
          f"{name}={axes!r} has axis {axis}, out of range for an input of "
          f"{ndim} dimensions"
      )
    normalized.append(axis % ndim)
  if len(set(normalized)) != len(normalized):
    raise ValueError(f"{name}={axes!r} repeats an axis")
  return tuple(normalized)


def check_shape(shape: Any, name: str = "shape") -> tuple[int, ...]:
  shape = static_ints(shape, name, "a tuple of ints")
  if any(dim < 0 for dim in shape):
    raise ValueError(f"{name} must not have negative sizes, got {name}={shape!r}")
  return shape


@functools.cache
def _raw_key_shape(impl: str) -> tuple[int, ...]:
  """Shape of a legacy raw key of ``impl``: (2,) for threefry."""
  return jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0, impl=impl))).shape


def typed_key(key: Any, name: str = "key") -> jax.Array:
  """``key`` as one typed PRNG key; accepts typed and legacy raw uint32 keys.

  Raises:
    ValueError: ``key`` is None, or a batch of keys.
    TypeError: ``key`` is not a PRNG key.
  """
  if key is None:
    raise ValueError(f"{name}=None, but a PRNG key is needed. {_KEY_HELP}")
  if not isinstance(key, (jax.Array, np.ndarray)):
    raise TypeError(
        f"{name} must be a JAX PRNG key, got {type(key).__name__} ({key!r}). {_KEY_HELP}"
    )
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    typed = key
  elif key.dtype == jnp.uint32:
    raw = _raw_key_shape(str(jax.config.jax_default_prng_impl))
    if key.shape[key.ndim - len(raw):] != raw:
      raise TypeError(
          f"{name} must be a PRNG key; a raw uint32 key has shape {raw}, "
          f"got shape {key.shape}. {_KEY_HELP}"
      )
    typed = jax.random.wrap_key_data(key)
  else:
    raise TypeError(
        f"{name} must be a JAX PRNG key, got an array of dtype {key.dtype} and "
        f"shape {key.shape}. {_KEY_HELP}"
    )
  if typed.shape != ():
    raise ValueError(
        f"{name} must be a single key, got a batch of keys of shape {typed.shape}; "
        "use jax.vmap to give each example its own key"
    )
  return typed


def split_key(key: Any) -> tuple[jax.Array, str]:
  """Returns ``(key_data, impl_name)`` of the key of an active dropout call.

  Raises:
    ValueError: ``key`` is None, or a batch of keys.
    TypeError: ``key`` is not a PRNG key.
  """
  if key is None:
    raise ValueError(
        f"key=None, but dropout is active (deterministic=False). {_KEY_HELP} "
        "To switch dropout off, pass deterministic=True instead."
    )
  typed = typed_key(key)
  return jax.random.key_data(typed), str(jax.random.key_impl(typed))


def check_bits(bits: Any) -> int:
  """Validates the ``bits`` mode: 32 (default) or 16 (fast)."""
  if not _is_int(bits):
    raise TypeError(f"bits must be 32 or 16, got bits={bits!r}")
  if bits not in _BITS:
    raise ValueError(
        f"bits must be 32 (default: bit-identical to jax.random.bits(key, shape, "
        f"jnp.uint32) thresholds) or 16 (fast mode), got bits={bits!r}"
    )
  return int(bits)
