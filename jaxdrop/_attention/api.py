"""``jaxdrop.dot_product_attention``: validates its arguments, then picks an implementation."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
import numbers
from functools import partial
from typing import Any, Callable, ContextManager

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import backend as jax_backend

from jaxdrop import _masks
from jaxdrop import _validate
from jaxdrop._attention import base
from jaxdrop._attention import xla

def _check_qkv(query, key, value) -> tuple[jax.Array, jax.Array, jax.Array]:
  arrays = {
      name: _validate.check_input(x, name)
      for name, x in (("query", query), ("key", key), ("value", value))
  }
  for name, x in arrays.items():
    if x.ndim != 4:
      layout = "[B, T, N, H]" if name == "query" else "[B, S, K, H]"
      raise ValueError(f"{name} must have 4 dimensions {layout}, got {name}.shape={x.shape}")
  q, k, v = arrays.values()
  if not q.dtype == k.dtype == v.dtype:
    raise TypeError(
        f"query, key and value must share one dtype, got {q.dtype}, {k.dtype} and {v.dtype}"
    )
  if k.shape != v.shape:
    raise ValueError(f"key and value must have the same shape, got {k.shape} and {v.shape}")
  if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
    raise ValueError(
        f"query [B, T, N, H] and key [B, S, K, H] must agree on B and H, got "
        f"query.shape={q.shape} and key.shape={k.shape}"
    )
  heads, kv_heads = q.shape[2], k.shape[2]
  if (heads % kv_heads) if kv_heads else heads:  # 0 divides only 0.
    raise ValueError(
        f"the key/value heads K must divide the query heads N, got N={q.shape[2]} "
        f"and K={k.shape[2]}"
    )
  return q, k, v


def broadcasts(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
  """Whether ``shape`` broadcasts to ``target`` without adding dimensions to it."""
  return len(shape) <= len(target) and all(
      size in (1, full) for size, full in zip(shape[::-1], target[::-1])
  )


def _check_broadcastable(x, name: str, target: tuple[int, ...], boolean: bool) -> jax.Array | None:
  """``x`` as 4 dimensions that broadcast to ``target`` = (B, N, T, S)."""
  if x is None:
    return None
  try:
    x = jnp.asarray(x)
  except TypeError as error:
    raise TypeError(f"{name} must be an array, got {type(x).__name__}") from error
  if boolean and x.dtype != jnp.bool_:
    raise TypeError(f"{name} must be a bool array (True = may attend), got {name}.dtype={x.dtype}")
  if not boolean and not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must have a floating dtype, got {name}.dtype={x.dtype}")
  if not broadcasts(x.shape, target):
    raise ValueError(
        f"{name} must broadcast to [B, N, T, S] = {list(target)}, got {name}.shape={x.shape}"
    )
  return x.reshape((1,) * (4 - x.ndim) + x.shape)


def _check_scale(scale, head_dim: int) -> float:
  """The static score scale; ``H = 0`` (an empty output) takes 1."""
  if scale is None:
    return 1 / math.sqrt(head_dim) if head_dim else 1.0
  if isinstance(scale, jax.Array):
    raise TypeError(
        f"scale must be a Python float or None, got a jax array scale={scale!r}: the scale is "
        "static (compiled into the kernels). For a traced scale s, pass query * s and scale=1.0."
    )
  if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, (numbers.Real, np.floating)):
    raise TypeError(f"scale must be a Python float or None, got scale={scale!r}")
  if not math.isfinite(scale):
    raise ValueError(f"scale must be finite, got scale={float(scale)!r}")
  return float(scale)


_TRITON = "jax.experimental.pallas.triton"


def _pallas():
  """The Pallas Triton kernels, or None where this jax no longer ships its Triton backend.

  Imported on first use: Pallas is a heavy import that only GPUs need.
  """
  try:
    importlib.import_module(_TRITON)
  except ImportError:
    return None
  from jaxdrop._attention import pallas_triton

  return pallas_triton


def _jax_nn(q, k, v, bias, mask, key_data, rate, config: base.Config) -> jax.Array:
  """``jax.nn.dot_product_attention``, with rows that may attend nothing set to 0.

  A bias of -inf excludes a position as the mask does (the other paths' softmax
  gives it weight 0), so it joins the mask: jax.nn would turn a row of them
  into NaN. A NaN bias stays and makes its row NaN, as on the other paths.
  """
  del key_data, rate  # No dropout here (_jax_nn_unsupported).
  if bias is not None:
    excluded = bias == -jnp.inf
    mask = ~excluded if mask is None else mask & ~excluded
    bias = jnp.where(excluded, 0, bias).astype(q.dtype)
  out = jax.nn.dot_product_attention(
      q, k, v, bias, mask, scale=config.scale, is_causal=config.is_causal)
  if mask is None:
    return out  # Every row may attend s = 0 at least.
  rows, cols = q.shape[1], k.shape[1]
  any_allowed = jnp.any(
      base.allowed_positions(jnp.arange(rows), jnp.arange(cols), cols, config.is_causal, mask),
      axis=-1,
  )  # [b, n, T]
  return jnp.where(any_allowed.transpose(0, 2, 1)[..., None], out, 0)


def _jax_nn_unsupported(q, k, v, bias, mask, config: base.Config) -> str | None:
  if config.fixed_rate != 0.0:
    return ("implementation='jax.nn' has no dropout: pass dropout_rate=0.0 or "
            "deterministic=True, or pick another implementation")
  if config.precision is not None:
    return (f"implementation='jax.nn' takes no precision, got precision={config.precision!r}; "
            "use implementation='xla'")
  return None


def _pallas_unsupported(q, k, v, bias, mask, config: base.Config) -> str | None:
  kernels = _pallas()
  if kernels is None:
    return (f"implementation='pallas' needs {_TRITON} (the Pallas Triton backend), which jax "
            f"{jax.__version__} does not provide; use implementation='xla' or None")
  return kernels.unsupported_reason(q, k, v, bias, mask, config)


def _pallas_run(q, k, v, bias, mask, key_data, rate, config: base.Config) -> jax.Array:
  return _pallas().attention(q, k, v, bias, mask, key_data, rate, config)


def _pallas_lowering():
  """jax >= 0.11 warns that its Triton backend is deprecated whenever it lowers
  a Triton kernel: ignored while jaxdrop lowers the kernels (a call outside a
  jit). Inside a caller's jit, jax lowers them when that jit compiles, after
  this call has returned, out of jaxdrop's reach (docs/attention.md)."""
  return _pallas().triton_deprecation_ignored()


def _always_supported(q, k, v, bias, mask, config: base.Config) -> None:
  return None


@dataclasses.dataclass(frozen=True)
class Implementation:
  """One way to compute the attention, as :data:`IMPLEMENTATIONS` names it.

  Every function takes arguments already validated and canonicalized by
  :func:`dot_product_attention` (``bias`` and ``mask`` 4-D or None).

  Attributes:
    run: ``run(q, k, v, bias, mask, key_data, rate, config) -> [B, T, N, H]``,
      traced under ``jax.jit``; ``key_data`` and ``rate`` as
      :func:`base.reference` takes them.
    unsupported_reason: ``unsupported_reason(q, k, v, bias, mask, config)``:
      None where ``run`` can take the call, else a message naming the argument.
    lowering: a context manager factory; the call is traced and lowered in it.
  """

  run: Callable[..., jax.Array]
  unsupported_reason: Callable[..., str | None] = _always_supported
  lowering: Callable[[], ContextManager[Any]] = contextlib.nullcontext


# Every implementation, by the name that ``implementation=`` takes. Tests
# replace entries (pytest's monkeypatch.setitem) to see which one a call picks.
IMPLEMENTATIONS: dict[str, Implementation] = {
    "reference": Implementation(base.reference),
    "xla": Implementation(xla.attention),
    "pallas": Implementation(_pallas_run, _pallas_unsupported, _pallas_lowering),
    "jax.nn": Implementation(_jax_nn, _jax_nn_unsupported),
}


def check_implementation(implementation) -> str | None:
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"implementation must be None (the best available) or one of "
        f"{', '.join(map(repr, IMPLEMENTATIONS))}, got implementation={implementation!r}"
    )
  return implementation


def _key_data(dropout_key, rate) -> jax.Array:
  if dropout_key is None:
    raise ValueError(
        f"dropout_key=None, but attention dropout is active (dropout_rate={rate!r}, "
        "deterministic=False). Pass dropout_key=jax.random.key(seed), a fresh "
        "key each step (e.g. jax.random.fold_in(key, step)), or "
        "deterministic=True to switch dropout off."
    )
  return _masks.threefry_key_data(dropout_key)


def _on_cuda_gpu() -> bool:
  """Whether the default backend is an NVIDIA GPU (jax's own test: "cuda" in its version)."""
  if jax.default_backend() != "gpu":
    return False
  return "cuda" in jax_backend.get_backend().platform_version.lower()


# T * S from which "xla" beat "jax.nn" without dropout on CPU in the forward pass, in a third
# of the memory or less (B 1, N 8, H 64, float32; benchmarks/results/bench_attention-cpu-T*.json).
_CPU_BLOCKWISE_FROM = 1024 * 1024


def _best_implementation(q, k, v, bias, mask, config: base.Config) -> str:
  """``implementation=None``: the name of the fastest implementation that takes the call.

  With dropout: "pallas" on NVIDIA GPUs where its kernels take the call, else
  "xla". On an H100 the kernels ran 4x faster than "xla" with dropout, in
  1/200 of its memory (BENCHMARKS.md); they are measured on NVIDIA GPUs only.
  Where jax no longer ships its Triton backend, "xla".

  Without dropout (evaluation, rate 0): "xla" on CPU from T * S = 1024 * 1024,
  where it ran 1.26-2.4x faster than "jax.nn" forward (what evaluation runs),
  in a third to a tenth of its memory; forward+backward the runs disagreed
  (0.82-2.1x). Below that "jax.nn", up to 1.37x faster forward+backward
  (docs/attention.md, "Choosing an implementation"). Elsewhere "jax.nn",
  which takes cuDNN on NVIDIA GPUs. A precision makes it "xla" ("jax.nn"
  takes none).
  """
  if config.fixed_rate == 0.0:
    rows, cols = q.shape[1], k.shape[1]
    blockwise = jax.default_backend() == "cpu" and rows * cols >= _CPU_BLOCKWISE_FROM
    preferred = "xla" if blockwise else "jax.nn"
  elif _on_cuda_gpu():
    preferred = "pallas"
  else:
    return "xla"
  if IMPLEMENTATIONS[preferred].unsupported_reason(q, k, v, bias, mask, config) is None:
    return preferred
  return "xla"  # It takes every validated call.


@partial(jax.jit, static_argnames=("implementation", "config"))
def _run(q, k, v, bias, mask, key_data, rate, *, implementation: Implementation, config):
  return implementation.run(q, k, v, bias, mask, key_data, rate, config)


def dot_product_attention(
    query: jax.typing.ArrayLike,
    key: jax.typing.ArrayLike,
    value: jax.typing.ArrayLike,
    bias: jax.typing.ArrayLike | None = None,
    mask: jax.typing.ArrayLike | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    dropout_rate: float | jax.typing.ArrayLike = 0.0,
    dropout_key: jax.typing.ArrayLike | None = None,
    deterministic: bool = False,
    implementation: str | None = None,
    broadcast_dropout: bool = False,
    precision: jax.lax.PrecisionLike = None,
) -> jax.Array:
  """Scaled dot-product attention with dropout on the attention weights.

  Computes ``P = softmax_s(scale * q . k + bias)`` over the allowed positions
  and ``out = sum_s P * keep * c * v``: each weight is dropped with
  probability ``dropout_rate`` -- **the probability to drop** -- and the kept
  ones are scaled by ``c``, the exact inverse of the keep probability, so the
  expected output is exactly the output without dropout. The mask ``keep`` is
  :func:`jaxdrop.attention_keep_mask` ``(dropout_key, (B, N, T, S),
  dropout_rate)``, the same for every implementation, block size and
  sharding; it is never materialized by ``"xla"``. A query row with no
  allowed position outputs 0 (with finite gradients), and so does every row
  when ``S = 0``; any other zero size gives an empty output. A NaN in
  ``bias`` at an allowed position makes its query row NaN, as in ``jax.nn``.
  Differentiate it in reverse mode (``jax.grad``, ``jax.vjp``; forward over
  reverse works too): ``"xla"`` and ``"pallas"`` are ``custom_vjp`` functions,
  which ``jax.jvp`` refuses; ``"reference"`` supports both modes.

  Args:
    query: ``[B, T, N, H]``.
    key: ``[B, S, K, H]``, with ``K`` dividing ``N`` (grouped-query
      attention; ``K = N`` is plain multi-head attention).
    value: ``[B, S, K, H]``.
    bias: a float array broadcastable to ``[B, N, T, S]``, added to the
      scaled scores; it receives a gradient.
    mask: a bool array broadcastable to ``[B, N, T, S]``; True = may attend.
    scale: the score scale, a finite Python float fixed at trace time;
      ``1 / sqrt(H)`` by default. For a traced scale ``s``, pass
      ``query * s`` and ``scale=1.0``.
    is_causal: if True, query ``t`` attends only keys ``s <= t``.
    dropout_rate: probability to drop each attention weight: a float in
      [0, 1], fixed at trace time, or a scalar array that may be traced (no
      recompilation across values; out of [0, 1] or NaN makes the output
      NaN). No gradient flows to it.
    dropout_key: a threefry PRNG key; needed while dropout is active.
    deterministic: if True, no dropout (evaluation); no key is needed.
    implementation: ``None`` (the fastest measured: with dropout,
      ``"pallas"`` on NVIDIA GPUs where jax ships its Pallas Triton backend
      and the kernels support the call, else ``"xla"``; without dropout,
      ``"xla"`` on CPU from ``T * S = 1024 * 1024``, else ``"jax.nn"``; the
      table is in docs/attention.md) or a name from ``IMPLEMENTATIONS``: ``"xla"``
      (blockwise: the flash-attention algorithm in ``jax.numpy``, memory
      linear in ``T``), ``"pallas"`` (fused Triton kernels for NVIDIA GPUs),
      ``"jax.nn"`` (``jax.nn.dot_product_attention``, without dropout only)
      or ``"reference"`` (materializes every ``[B, N, T, S]`` array; the
      oracle). A named implementation that cannot take the call raises
      ``ValueError`` naming the argument.
    broadcast_dropout: if True, one dropout mask, ``attention_keep_mask``
      ``(dropout_key, (1, 1, T, S), dropout_rate)``, shared by every batch
      element and head (flax's ``broadcast_dropout=True``); else one per
      batch element and head.
    precision: the ``jax.lax`` precision of the two matrix products; None is
      the backend's default.

  Returns:
    ``[B, T, N, H]`` in the dtype of ``query``.

  Raises:
    ValueError: shapes that do not fit the layout; a static rate outside
      [0, 1]; a non-finite scale; active dropout without a key; an unknown
      or unavailable implementation.
    TypeError: non-floating inputs or bias, a non-bool mask, a scale that is
      not a Python float (a jax array), a non-threefry or malformed key.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxdrop
    >>> q = k = v = jnp.ones((1, 16, 2, 8))
    >>> out = jaxdrop.dot_product_attention(
    ...     q, k, v, dropout_rate=0.1, dropout_key=jax.random.key(0))
    >>> out.shape
    (1, 16, 2, 8)
  """
  q, k, v = _check_qkv(query, key, value)
  batch, rows, heads, head_dim = q.shape
  cols = k.shape[1]
  target = (batch, heads, rows, cols)
  bias = _check_broadcastable(bias, "bias", target, boolean=False)
  mask = _check_broadcastable(mask, "mask", target, boolean=True)
  scale = _check_scale(scale, head_dim)
  for name, flag in (("is_causal", is_causal), ("broadcast_dropout", broadcast_dropout)):
    if not isinstance(flag, (bool, np.bool_)):
      raise TypeError(f"{name} must be a bool, got {name}={flag!r}")
  fixed = _validate.static_rate(dropout_rate, "dropout_rate")
  deterministic = _validate.check_deterministic(deterministic)
  implementation = check_implementation(implementation)
  if deterministic or fixed == 0.0:
    fixed, key_data, rate = 0.0, None, None
  elif fixed == 1.0:
    return jnp.zeros_like(q)  # Every weight dropped.
  else:
    key_data = _key_data(dropout_key, dropout_rate)
    _masks.check_attention_size(rows, cols)
    rate = None if fixed is not None else dropout_rate
  if q.size == 0 or cols == 0:
    # Nothing to compute, or no key to attend (every row outputs 0, as a row
    # with no allowed position): no implementation needed, with or without dropout.
    return jnp.zeros_like(q)
  config = base.Config(
      scale=scale,
      is_causal=bool(is_causal),
      dropout_heads=(1, 1) if bool(broadcast_dropout) else (batch, heads),
      fixed_rate=fixed,
      precision=precision,
  )
  if implementation is None:
    implementation = _best_implementation(q, k, v, bias, mask, config)
  else:
    reason = IMPLEMENTATIONS[implementation].unsupported_reason(q, k, v, bias, mask, config)
    if reason is not None:
      raise ValueError(reason)
  chosen = IMPLEMENTATIONS[implementation]
  with chosen.lowering():
    return _run(q, k, v, bias, mask, key_data, rate, implementation=chosen, config=config)
