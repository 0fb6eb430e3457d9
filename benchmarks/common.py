"""What the benchmark scripts share: the timer, the variants and models, run metadata, results.

The scripts (``bench.py``, ``bench_attention.py``, ``check_harness.py``,
``tune_attention.py``, ``inspect_hlo.py``, ``aot_gpu.py``) import this module
and nothing of each other's, so each row is defined once and every script
times or compiles the same function under the same name.

The timer (``interleaved``) is the one method every table uses:

* each function comes jitted or compiled (``compile_each``) and runs once
  here before any sample: compilation is never timed;
* one *sample* of a function is ``calls`` back-to-back calls, where ``calls``
  makes a sample last about ``min_sample_s`` (one call for anything slower),
  and the sample waits for every result (``jax.block_until_ready``); the
  outputs are freed after the clock stops (freeing a large output costs
  milliseconds on CPU) and before the next sample starts;
* before each sample the function runs once untimed, so the sample starts
  from that function's own steady state (its buffers allocated and faulted
  in, its code in cache) and not from whatever its neighbour left behind;
* the functions take turns, one sample each, starting from a rotating
  position, so that a slow phase of a shared machine hits all of them;
* the median of the samples is reported.

``alone`` times one function by itself, one call per sample: the check that
the interleaved timer measures each function as it runs by itself
(``tests/test_bench.py``).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import importlib.metadata
import json
import math
import os
import platform as platform_lib
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))  # Run from a checkout without installing.

import jaxdrop  # noqa: E402
import pallas_dropout  # noqa: E402  (benchmarks/pallas_dropout.py, a prototype)

try:
  import equinox as eqx
except ImportError:
  eqx = None
try:
  import haiku as hk
except ImportError:
  hk = None

RESULTS = ROOT / "benchmarks" / "results"


# ----------------------------------------------------------------------------
# Timing.


def _sample(fn: Callable, args: tuple, calls: int) -> float:
  """Seconds per call of `calls` calls, after one untimed call.

  The outputs are kept until the clock stops: freeing a large one (unmapping its pages)
  costs milliseconds on CPU, and would be timed for some calls and not others.
  """
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  outs = [fn(*args) for _ in range(calls)]  # Dispatch is asynchronous: calls queue up.
  jax.block_until_ready(outs)
  seconds = time.perf_counter() - start
  del outs  # Freed here, untimed.
  return seconds / calls


def interleaved(fns: dict[str, Callable], args: tuple, repeats: int,
                min_sample_s: float) -> dict[str, list[float]]:
  """Per function: `repeats` samples, in seconds per call, taken in turns (module docstring)."""
  calls = {}
  for name, fn in fns.items():
    once = _sample(fn, args, 1)  # A jitted function's first call compiles it.
    calls[name] = max(1, math.ceil(min_sample_s / max(once, 1e-9)))
  names = list(fns)
  samples = {name: [] for name in names}
  for repeat in range(repeats):
    for i in range(len(names)):
      name = names[(repeat + i) % len(names)]
      samples[name].append(_sample(fns[name], args, calls[name]))
  return samples


def alone(fn: Callable, args: tuple, repeats: int) -> list[float]:
  """`repeats` samples of `fn` by itself, one waited-for call each, in seconds."""
  jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    samples.append(time.perf_counter() - start)
    del out  # Freed after the clock stops, as in `interleaved`.
  return samples


def compile_each(fns: dict[str, Callable], args: tuple, failures: list[dict], what: str
                 ) -> dict[str, Any]:
  """Each of ``fns`` jitted and compiled for ``args``; one that fails is printed, recorded in
  ``failures`` as ``"{what}: {name}"`` and left out, so that one broken row does not end a
  run."""
  compiled = {}
  for name, fn in fns.items():
    with attempt(f"{what}: {name}", failures):
      compiled[name] = jax.jit(fn).lower(*args).compile()
  return compiled


@contextlib.contextmanager
def attempt(name: str, failures: list[dict]):
  """Runs one item of a run: a failure is printed and recorded in ``failures``, and the run
  goes on with the next item."""
  try:
    yield
  except Exception as error:  # noqa: BLE001 - every failure is reported, none ends the run
    text = "".join(traceback.format_exception_only(type(error), error)).strip()
    print(f"FAIL {name}: {text[:2000]}", flush=True)
    failures.append(dict(name=name, error=text[:4000]))


def median_ms(samples: list[float]) -> float:
  return float(np.median(samples)) * 1e3


# ----------------------------------------------------------------------------
# The elementwise variants: each maps a static rate to ``f(key, x)``.


FLOOR = "x * 2.0 (floor)"
FLAX = "flax.linen.Dropout"
FAST = "jaxdrop.dropout bits=16"
PALLAS_FAST = "pallas kernel bits=16"


def _linen(module: nn.Module) -> Callable:
  return lambda key, x: module.apply({}, x, rngs={"dropout": key})


def elementwise_variants(rate: float, fast: bool = True, pallas: bool = False,
                         interpret: bool = False) -> dict[str, Callable]:
  """name -> ``f(key, x)``: the floor, jaxdrop, flax, and equinox and haiku where installed.

  Args:
    rate: the dropout rate, static.
    fast: also jaxdrop's fast mode (``bits=16``).
    pallas: with ``fast``, also the fast mode as one Pallas kernel (``pallas_dropout.py``).
    interpret: run that kernel in the Pallas interpreter (any backend).
  """
  fns = {
      FLOOR: lambda key, x: x * 2.0,
      "jaxdrop.dropout": lambda key, x: jaxdrop.dropout(key, x, rate),
      FAST: lambda key, x: jaxdrop.dropout(key, x, rate, bits=16),
      "jaxdrop.linen.Dropout": _linen(jaxdrop.linen.Dropout(rate, deterministic=False)),
      "jaxdrop.nnx.Dropout": lambda key, x: jaxdrop.nnx.Dropout(rate)(x, rngs=key),
      FLAX: _linen(nn.Dropout(rate, deterministic=False)),
      "flax.nnx.Dropout": lambda key, x: nnx.Dropout(rate, deterministic=False)(x, rngs=key),
  }
  if eqx is not None:
    fns["equinox.nn.Dropout"] = lambda key, x: eqx.nn.Dropout(rate)(x, key=key, inference=False)
  if hk is not None:
    fns["haiku.dropout"] = lambda key, x: hk.dropout(key, rate, x)
  if not fast:
    del fns[FAST]
  elif pallas:
    fns[PALLAS_FAST] = lambda key, x: pallas_dropout.dropout16(key, x, rate, interpret=interpret)
  return fns


def missing_competitors() -> list[str]:
  """The optional libraries whose rows a run leaves out: not installed."""
  return [name for name, module in (("equinox", eqx), ("haiku", hk)) if module is None]


def forward_backward(fn: Callable) -> Callable:
  """``(key, x, w) -> grad_x sum(fn(key, x) * w)``."""
  return lambda key, x, w: jax.grad(lambda x: jnp.sum(fn(key, x) * w))(x)


# ----------------------------------------------------------------------------
# The attention variants: each maps ``(q, k, v, key)`` to ``out [B, T, N, H]``.


def attention_variants(rate: float, gpu: bool = False,
                       causal: bool = False) -> dict[str, Callable]:
  """name -> ``f(q, k, v, key)``: flax, ``jax.nn`` and jaxdrop, with dropout at ``rate`` and
  without.

  Args:
    rate: the dropout rate, static.
    gpu: also the rows that need an NVIDIA GPU: cuDNN through ``jax.nn`` (it has no dropout
      argument), cuDNN's fused dropout through jax's private module (its mask cannot be
      reproduced or checked: timed only), and jaxdrop's ``"pallas"`` kernels.
    causal: every variant causal.
  """

  def flax_fn(dropout_rate, broadcast):
    def fn(q, k, v, key):
      mask = nn.make_causal_mask(q[:, :, 0, 0]) if causal else None
      return nn.dot_product_attention(
          q, k, v, mask=mask, dropout_rng=key, dropout_rate=dropout_rate,
          broadcast_dropout=broadcast, deterministic=dropout_rate == 0)
    return fn

  def jax_nn_fn(implementation):
    return lambda q, k, v, key: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, implementation=implementation)

  def jaxdrop_fn(dropout_rate, implementation):
    return lambda q, k, v, key: jaxdrop.dot_product_attention(
        q, k, v, is_causal=causal, dropout_rate=dropout_rate, dropout_key=key,
        implementation=implementation)

  fns = {
      f"flax, per-head dropout {rate}": flax_fn(rate, False),
      f"flax, shared mask (broadcast_dropout=True) {rate}": flax_fn(rate, True),
      "flax, no dropout": flax_fn(0.0, False),
      "jax.nn.dot_product_attention, no dropout": jax_nn_fn(None),
      f'jaxdrop "xla", dropout {rate}': jaxdrop_fn(rate, "xla"),
      'jaxdrop "xla", no dropout': jaxdrop_fn(0.0, "xla"),
  }
  if gpu:
    fns["jax.nn cuDNN, no dropout"] = jax_nn_fn("cudnn")
    fns[f"cuDNN private module, dropout {rate} (not reproducible)"] = _cudnn_dropout(rate, causal)
    fns[f'jaxdrop "pallas", dropout {rate}'] = jaxdrop_fn(rate, "pallas")
    fns['jaxdrop "pallas", no dropout'] = jaxdrop_fn(0.0, "pallas")
  return fns


def _cudnn_dropout(rate: float, causal: bool) -> Callable:
  """cuDNN's fused attention with its own dropout, through jax's private module."""

  def fn(q, k, v, key):
    del key  # cuDNN takes a seed and makes a mask of its own.
    from jax._src.cudnn import fused_attention_stablehlo as fused  # Private: may move.

    options = dict(scale=1 / math.sqrt(q.shape[-1]), dropout_rate=rate, seed=42)
    if causal:
      options["mask_type"] = fused.MaskType.CAUSAL
    return fused.dot_product_attention(q, k, v, **options)

  return fn


def attention_inputs(batch: int, length: int, heads: int, head_dim: int, dtype: str
                     ) -> tuple[jax.Array, ...]:
  """``(q, k, v, key, w)``: queries, keys and values ``[B, T, N, H]`` (T = S), a dropout key,
  and the float32 weights of ``attention_forward_backward``'s sum."""
  shape = (batch, length, heads, head_dim)
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=shape), dtype) for _ in range(3))
  return q, k, v, jax.random.key(0), jnp.asarray(rng.normal(size=shape), jnp.float32)


def attention_forward_backward(fn: Callable) -> Callable:
  """``(q, k, v, key, w) -> grad_(q, k, v) sum(fn(q, k, v, key) * w)``."""

  def loss(q, k, v, key, w):
    return jnp.sum(fn(q, k, v, key).astype(jnp.float32) * w)

  return lambda q, k, v, key, w: jax.grad(loss, argnums=(0, 1, 2))(q, k, v, key, w)


# ----------------------------------------------------------------------------
# The train-step models.


def drop(dropout, rate: float, x: jax.Array, train: bool) -> jax.Array:
  """``x`` through ``dropout`` (a linen Dropout class, or None) in the calling module."""
  if dropout is None or not train:
    return x
  return dropout(rate, deterministic=False)(x)


RELU_DROPOUT = "jaxdrop.relu_dropout"


class MLP(nn.Module):
  # A linen Dropout class, RELU_DROPOUT (jaxdrop.relu_dropout in place of relu
  # and dropout), or None.
  dropout: Callable[..., nn.Module] | str | None
  rate: float = 0.1
  widths: tuple[int, ...] = (1024, 1024)
  # A jax.checkpoint policy for the loss, or None for no checkpointing. The
  # dense outputs are named "dense" so that names-based policies can keep them.
  remat_policy: Callable[..., Any] | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for width in self.widths:
      h = checkpoint_name(nn.Dense(width)(x), "dense")
      if self.dropout == RELU_DROPOUT:
        x = jaxdrop.relu_dropout(self.make_rng("dropout") if train else None, h, self.rate,
                                 deterministic=not train)
      else:
        x = drop(self.dropout, self.rate, nn.relu(h), train)
    return nn.Dense(10)(x)


class Block(nn.Module):
  """Pre-LN transformer blocks: attention, then a GELU MLP, each added back through dropout.

  ``bench.py`` varies the elementwise ``dropout``; ``bench_attention.py``
  varies ``attention_fn`` with attention dropout on.
  """

  heads: int
  rate: float = 0.1
  # The elementwise dropout: a linen Dropout class, or None.
  dropout: Callable[..., nn.Module] | None = nn.Dropout
  attention_fn: Callable[..., jax.Array] = nn.dot_product_attention
  attention_dropout: bool = False  # also drop attention weights, one mask per example and head
  hidden_dropout: bool = True  # also drop the MLP's hidden activation
  causal: bool = False
  depth: int = 1
  dtype: Any = None  # the computation dtype; parameters stay float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    width = x.shape[-1]
    attend = train and self.attention_dropout
    mask = nn.make_causal_mask(x[..., 0]) if self.causal else None
    for _ in range(self.depth):
      h = nn.MultiHeadDotProductAttention(
          self.heads, dtype=self.dtype, dropout_rate=self.rate if attend else 0.0,
          broadcast_dropout=False, attention_fn=self.attention_fn, deterministic=not attend,
      )(nn.LayerNorm(dtype=self.dtype)(x), mask=mask)
      x = x + drop(self.dropout, self.rate, h, train)
      h = nn.gelu(nn.Dense(4 * width, dtype=self.dtype)(nn.LayerNorm(dtype=self.dtype)(x)))
      if self.hidden_dropout:
        h = drop(self.dropout, self.rate, h, train)
      x = x + drop(self.dropout, self.rate, nn.Dense(width, dtype=self.dtype)(h), train)
    return x


FAST_LINEN = "jaxdrop.linen.Dropout bits=16"
NO_DROPOUT = "no dropout"
REMAT_POLICY = "remat policy"  # save_any_names_but_these(jaxdrop.CHECKPOINT_NAME)
REMAT = "jaxdrop.linen.Dropout + " + REMAT_POLICY


def mlp_models(rate: float, widths: tuple[int, ...], fast: bool = True, pallas: bool = False,
               interpret: bool = False) -> dict[str, nn.Module]:
  """The MLP train step's variants (arguments as for ``elementwise_variants``)."""
  mlp = functools.partial(MLP, rate=rate, widths=widths)
  models = {NO_DROPOUT: mlp(None), "jaxdrop.linen.Dropout": mlp(jaxdrop.linen.Dropout),
            FLAX: mlp(nn.Dropout)}
  if fast:
    models[FAST_LINEN] = mlp(functools.partial(jaxdrop.linen.Dropout, bits=16))
  models[RELU_DROPOUT] = mlp(RELU_DROPOUT)
  if fast and pallas:
    models[PALLAS_FAST] = mlp(functools.partial(pallas_dropout.Dropout, interpret=interpret))
  # Recomputing the dropout outputs under jax.checkpoint (docs/semantics.md).
  policy = jax.checkpoint_policies.save_any_names_but_these(jaxdrop.CHECKPOINT_NAME)
  models[REMAT] = mlp(jaxdrop.linen.Dropout, remat_policy=policy)
  models[f"{NO_DROPOUT} + {REMAT_POLICY}"] = mlp(None, remat_policy=policy)
  return models


def block_models(heads: int, rate: float, fast: bool = True, pallas: bool = False,
                 interpret: bool = False) -> dict[str, nn.Module]:
  """The bf16 transformer train step's variants: 2 blocks (arguments as for ``mlp_models``)."""
  block = functools.partial(Block, heads, rate, depth=2, dtype=jnp.bfloat16)
  models = {NO_DROPOUT: block(dropout=None),
            "jaxdrop.linen.Dropout": block(dropout=jaxdrop.linen.Dropout),
            FLAX: block(dropout=nn.Dropout)}
  if fast:
    models[FAST_LINEN] = block(dropout=functools.partial(jaxdrop.linen.Dropout, bits=16))
    if pallas:
      models[PALLAS_FAST] = block(
          dropout=functools.partial(pallas_dropout.Dropout, interpret=interpret))
  return models


def classification_loss(model, params, batch, key):
  images, labels = batch
  logits = model.apply({"params": params}, images, train=True, rngs={"dropout": key})
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def regression_loss(model, params, batch, key):
  inputs, targets = batch
  out = model.apply({"params": params}, inputs, train=True, rngs={"dropout": key})
  return jnp.mean(jnp.square(out.astype(jnp.float32) - targets))


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    loss_of: Callable = classification_loss) -> Callable:
  """A donated, jitted Adam step; ``loss_of(model, params, batch, key)`` is the loss."""

  def train_step(params, opt_state, batch, key):
    def loss_fn(params):
      return loss_of(model, params, batch, key)

    if getattr(model, "remat_policy", None) is not None:
      loss_fn = jax.checkpoint(loss_fn, policy=model.remat_policy)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(train_step, donate_argnums=(0, 1))


class DonatedStep:
  """A donated train step as a function of no state: each call feeds the last call's outputs.

  Lets ``interleaved`` time train steps like any other function.
  """

  def __init__(self, step: Callable, params, opt_state, batch, key):
    self.step, self.state, self.rest = step, [params, opt_state], (batch, key)

  def __call__(self):
    self.state[0], self.state[1], loss = self.step(*self.state, *self.rest)
    return loss


# ----------------------------------------------------------------------------
# Run metadata and results.


def _version(dist: str) -> str | None:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return None


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform_lib.processor() or platform_lib.machine()


def _git_commit() -> str | None:
  try:
    out = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                         capture_output=True, text=True, timeout=10)
    return out.stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    return None


def metadata() -> dict[str, Any]:
  """Where and how a run ran: date, command, device, host, versions, commit."""
  return dict(
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      command="python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
      backend=jax.default_backend(),
      device=jax.devices()[0].device_kind,
      device_count=jax.device_count(),
      cpu=_cpu_model(),
      cpu_count=os.cpu_count(),
      load_average=[round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
      python=platform_lib.python_version(),
      versions={d: _version(d) for d in (
          "jax", "jaxlib", "flax", "optax", "equinox", "dm-haiku", "numpy")},
      commit=_git_commit(),
  )


def results_path(json_arg: str | None, name: str, write_default: bool) -> Path | None:
  """Where a run writes its JSON: ``--json``, else ``benchmarks/results/<name>-<backend>.json``
  for a full run (`write_default`), else nowhere."""
  if json_arg:
    return Path(json_arg)
  if write_default:
    return RESULTS / f"{name}-{jax.default_backend()}.json"
  return None


def write_json(path: Path | None, results: dict) -> None:
  """Writes `results` to `path` (if any), whole: written beside, then renamed."""
  if path is None:
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_suffix(".tmp")
  partial.write_text(json.dumps(results, indent=1, default=str) + "\n")
  os.replace(partial, path)
