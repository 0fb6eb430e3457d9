"""Checks and times the Pallas attention-dropout kernels on a GPU, in one run.

Every item is wrapped so that a failure prints its error and the script goes
on to the next:

  (a) on the device, the kernels' dropout bits equal ``attention_keep_mask``
      (value = identity with S = H exposes them);
  (b) outputs and gradients match ``implementation="xla"``, at small shapes
      and at the benchmark shape;
  (c) a timing table, forward+backward and forward alone, B 8, T = S = 2048,
      N 16, H 64, bfloat16, rates 0 and 0.1: flax (per-head and shared
      dropout, and none), ``jax.nn`` cuDNN, the private cuDNN module with
      dropout (timed only), jaxdrop ``"xla"`` and ``"pallas"``, with compiled
      temp memory; then causal T = S = 4096, T = 8192 for pallas, and a small
      block-size sweep while time remains;
  (d) a profile at the main shape: each kernel (forward, dq, dk/dv) timed
      alone at rates 0 and 0.1, with its TFLOP/s, so that a missed target
      shows where the time goes.
  (e) only when asked for (``--sections tune``): each kernel alone under the
      tile candidates ``TUNE_FORWARD`` and ``TUNE_BACKWARD``, at H 64 and 128
      and causal, each checked against the default tiles' outputs.

Each section runs in its own process, so that a compiler crash or a host
out-of-memory kill (as XLA's Triton pipeline gave for an earlier hash layout)
loses that section only; the parent merges what each wrote.

Run on a GPU:  ``python benchmarks/gpu_attention_check.py``
On CPU (tiny shapes, Pallas interpreter, no cuDNN rows; tests this script):
``python benchmarks/gpu_attention_check.py --smoke``

Prints a markdown table and writes JSON to ``$OUT/gpu_attention_check.json``
when ``$OUT`` is set, else to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

# The parent process only merges what the sections write: it must not hold the
# GPU memory that JAX preallocates (75%) while a child needs it. The children
# get the environment as it was.
CHILD_ENV = dict(os.environ)
if __name__ == "__main__" and "--section" not in sys.argv:
  os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import jaxdrop  # noqa: E402
from jaxdrop._attention import base  # noqa: E402
from jaxdrop._attention import pallas_triton as pt  # noqa: E402
from jaxdrop._attention import xla  # noqa: E402

try:
  from flax import linen as nn
except ImportError:  # flax rows are skipped
  nn = None


@dataclasses.dataclass(frozen=True)
class Settings:
  batch: int = 8
  seq: int = 2048  # T = S of the main table
  heads: int = 16
  head_dim: int = 64
  causal_seq: int = 4096
  long_seq: int = 8192
  rates: tuple[float, ...] = (0.0, 0.1)
  warmup: int = 2
  reps: int = 10
  budget_s: float = 330.0  # optional items (causal, long, sweep) start only before this
  section_timeout_s: float = 300.0  # a section's process is killed after this
  total_s: float = 540.0  # ... or when the whole run reaches this
  interpret: bool = False
  cudnn: bool = True
  small: tuple[int, int, int, int, int] = (2, 100, 80, 4, 2)  # B, T, S, N, K of checks


# H 24 runs the kernels zero-padded to 32, through the same code as a GPU run's H 64.
SMOKE = Settings(
    batch=1, seq=64, heads=2, head_dim=24, causal_seq=64, long_seq=128, warmup=1, reps=2,
    budget_s=600.0, interpret=True, cudnn=False, small=(1, 40, 24, 2, 1),
)
SMOKE_BLOCKS = pt.BlockSizes(q=16, k=16, q_dkv=16, k_dkv=16, q_dq=16, k_dq=16)

START = time.perf_counter()
RESULTS: dict = {"checks": [], "timings": [], "notes": [], "profile": []}
PART: Path | None = None  # in a section's process: where RESULTS go after each item


def elapsed() -> float:
  return time.perf_counter() - START


@contextlib.contextmanager
def item(name: str):
  """Runs one item; a failure is printed and recorded, and the script goes on."""
  t0 = time.perf_counter()
  try:
    yield
  except Exception as error:  # noqa: BLE001 - every failure is reported, none stops the run
    text = "".join(traceback.format_exception_only(type(error), error)).strip()
    print(f"FAIL {name}: {text[:2000]}", flush=True)
    traceback.print_exc(limit=4)
    RESULTS["checks"].append({"name": name, "ok": False, "error": text[:4000]})
  else:
    print(f"ok   {name} ({time.perf_counter() - t0:.1f} s)", flush=True)
    RESULTS["checks"].append({"name": name, "ok": True})
  finally:
    save_part()


def save_part() -> None:
  """In a section's process: RESULTS to PART, replaced whole (a kill never leaves half)."""
  if PART is not None:
    partial = PART.with_suffix(".tmp")
    partial.write_text(json.dumps(RESULTS, default=str))
    os.replace(partial, PART)


def close(actual, expected, tol: float, what: str) -> None:
  """Raises unless |actual - expected| <= tol * (1 + max|expected|) and all finite."""
  a = np.asarray(jnp.asarray(actual, jnp.float32))
  e = np.asarray(jnp.asarray(expected, jnp.float32))
  if a.shape != e.shape:
    raise AssertionError(f"{what}: shape {a.shape} != {e.shape}")
  if not np.all(np.isfinite(a)):
    raise AssertionError(f"{what}: non-finite values")
  err = float(np.max(np.abs(a - e))) if a.size else 0.0
  bound = tol * (1 + float(np.max(np.abs(e))))
  if err > bound:
    raise AssertionError(f"{what}: max error {err:.3g} > {bound:.3g}")


def config_for(settings, batch, heads, head_dim, causal, rate, precision=None):
  return base.Config(
      scale=1 / math.sqrt(head_dim), is_causal=causal, dropout_heads=(batch, heads),
      fixed_rate=rate, precision=precision,
  )


def pallas_attention(settings, config, blocks=None, bias=None, mask=None):
  """(q, k, v, key_data) -> out, with the kernels of ``pallas_triton``."""
  if settings.interpret and blocks is None:
    blocks = SMOKE_BLOCKS

  def fn(q, k, v, key_data):
    return pt.attention(
        q, k, v, bias, mask, key_data, None, config, blocks=blocks,
        interpret=settings.interpret,
    )

  return fn


def xla_attention(config, bias=None, mask=None):
  def fn(q, k, v, key_data):
    return xla.attention(q, k, v, bias, mask, key_data, None, config)

  return fn


def with_grads(fn):
  """(q, k, v, key_data, d_out) -> (out, (dq, dk, dv))."""

  def run(q, k, v, key_data, d_out):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, key_data), q, k, v)
    return out, vjp(d_out.astype(out.dtype))

  return run


def qkv(seed, batch, rows, cols, heads, kv_heads, head_dim, dtype):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (batch, rows, heads, head_dim), dtype)
  k = jax.random.normal(keys[1], (batch, cols, kv_heads, head_dim), dtype)
  v = jax.random.normal(keys[2], (batch, cols, kv_heads, head_dim), dtype)
  d_out = jax.random.normal(keys[3], (batch, rows, heads, head_dim), dtype)
  return q, k, v, d_out


PALLAS = "jaxdrop pallas"
KEY = jax.random.key(1234)
KEY_DATA = jax.random.key_data(KEY)


# ----------------------------------------------------------------------------
# (a) Mask bits on the device.


def check_mask_bits(settings) -> None:
  batch, rows = 2, (300 if not settings.interpret else 40)
  cols = 128 if not settings.interpret else 32  # S = H
  heads, kv_heads = 4, 2
  q, k, _, _ = qkv(0, batch, rows, cols, heads, kv_heads, cols, jnp.float32)
  v = jnp.broadcast_to(jnp.eye(cols)[None, :, None, :], (batch, cols, kv_heads, cols))
  for shared in (False, True):
    with item(f"(a) mask bits == attention_keep_mask, shared={shared}"):
      config = base.Config(
          scale=0.1, is_causal=False, dropout_heads=(1, 1) if shared else (batch, heads),
          fixed_rate=0.5, precision=jax.lax.Precision.HIGHEST,
      )
      out = jax.jit(pallas_attention(settings, config))(q, k, v, KEY_DATA)
      shape = (1, 1, rows, cols) if shared else (batch, heads, rows, cols)
      keep = np.asarray(jaxdrop.attention_keep_mask(KEY, shape, 0.5))
      kept = np.asarray(out != 0).transpose(0, 2, 1, 3)
      np.testing.assert_array_equal(kept, np.broadcast_to(keep, kept.shape))
      want = base.reference(q, k, v, None, None, KEY_DATA, None, config)
      close(out, want, 1e-4, "output vs reference")


# ----------------------------------------------------------------------------
# (b) Outputs and gradients against "xla" at small shapes.


def check_small(settings) -> None:
  batch, rows, cols, heads, kv_heads = settings.small
  head_dims = (64, 128) if not settings.interpret else (16,)
  padded = 96 if not settings.interpret else 24  # zero-padded to a power of two
  cases = [
      ("bf16 causal GQA padding-mask dropout", jnp.bfloat16, True, 0.1, head_dims[0], False),
      (f"f32 (HIGHEST) bias+mask dropout H={head_dims[-1]}", jnp.float32, False, 0.2,
       head_dims[-1], True),
      ("f16 no dropout causal", jnp.float16, True, 0.0, head_dims[-1], False),
      (f"bf16 padding-mask dropout H={padded} (padded)", jnp.bfloat16, False, 0.1, padded,
       False),
  ]
  for name, dtype, causal, rate, head_dim, with_bias in cases:
    with item(f"(b) small: {name}"):
      q, k, v, d_out = qkv(1, batch, rows, cols, heads, kv_heads, head_dim, dtype)
      lengths = jnp.array([cols, cols // 2] * batch)[:batch]
      mask = (jnp.arange(cols)[None, :] < lengths[:, None])[:, None, None, :]
      bias = None
      if with_bias:
        bias = jax.random.normal(jax.random.key(5), (1, heads, rows, cols), dtype)
      precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
      config = config_for(settings, batch, heads, head_dim, causal, rate, precision)
      if bias is None:
        fns = [pallas_attention(settings, config, mask=mask), xla_attention(config, mask=mask)]
        args = (q, k, v, KEY_DATA, d_out)
        got, want = (jax.jit(with_grads(f))(*args) for f in fns)
      else:
        def grads_with_bias(fn_of_bias):
          def run(q, k, v, bias, key_data, d_out):
            out, vjp = jax.vjp(lambda q, k, v, b: fn_of_bias(b)(q, k, v, key_data), q, k, v, bias)
            return out, vjp(d_out)
          return jax.jit(run)

        args = (q, k, v, bias, KEY_DATA, d_out)
        got = grads_with_bias(lambda b: pallas_attention(settings, config, bias=b, mask=mask))(*args)
        want = grads_with_bias(lambda b: xla_attention(config, bias=b, mask=mask))(*args)
      tol = 1e-4 if dtype == jnp.float32 else 3e-2
      close(got[0], want[0], tol, "out")
      for i, (g, w) in enumerate(zip(got[1], want[1])):
        close(g, w, tol, ["dq", "dk", "dv", "dbias"][i])


# ----------------------------------------------------------------------------
# (c) Timing.


def compile_and_time(settings, fn, args):
  """Compiles ``fn(*args)``; returns (median seconds, temp bytes, compile s, first result)."""
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  temp = None
  with contextlib.suppress(Exception):
    temp = int(compiled.memory_analysis().temp_size_in_bytes)
  first = jax.block_until_ready(compiled(*args))
  for _ in range(settings.warmup - 1):
    jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(settings.reps):
    t = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times), temp, compile_s, first


def time_row(settings, label, rate, fn, args, shape, keep=None, fwd_only_too=True, mode_list=None):
  """Times ``fn(q, k, v, key_data)`` forward+backward and forward alone."""
  modes = mode_list or (("fwd+bwd", "fwd") if fwd_only_too else ("fwd+bwd",))
  for mode in modes:
    with item(f"(c) time {label} rate={rate} {mode} {shape}"):
      if mode == "fwd":
        run, run_args = fn, args[:4]
      else:
        run, run_args = with_grads(fn), args
      seconds, temp, compile_s, first = compile_and_time(settings, run, run_args)
      row = dict(label=label, rate=rate, mode=mode, shape=shape, ms=seconds * 1e3,
                 temp_mb=None if temp is None else temp / 1e6, compile_s=compile_s)
      RESULTS["timings"].append(row)
      temp_text = "?" if temp is None else f"{temp / 1e6:.1f}"
      print(f"     {label:<44} rate {rate:<4} {mode:<8} {seconds * 1e3:9.3f} ms "
            f"temp {temp_text} MB (compile {compile_s:.1f} s)", flush=True)
      if keep is not None and mode == "fwd+bwd":
        keep[(label, rate)] = first


def flax_fn(rate, broadcast):
  def fn(q, k, v, key_data):
    del key_data
    return nn.dot_product_attention(
        q, k, v, dropout_rng=KEY, dropout_rate=rate, broadcast_dropout=broadcast,
        deterministic=rate == 0.0,
    )

  return fn


def cudnn_fn(causal):
  def fn(q, k, v, key_data):
    del key_data
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")

  return fn


def cudnn_private_fn(rate, causal):
  from jax._src.cudnn import fused_attention_stablehlo as fused  # private; timed only

  def fn(q, k, v, key_data):
    del key_data
    kwargs = dict(scale=1 / math.sqrt(q.shape[-1]), dropout_rate=rate, seed=42)
    if causal:
      kwargs["mask_type"] = fused.MaskType.CAUSAL
    return fused.dot_product_attention(q, k, v, **kwargs)

  return fn


def jaxdrop_xla_fn(rate, causal):
  def fn(q, k, v, key_data):
    del key_data
    return jaxdrop.dot_product_attention(
        q, k, v, is_causal=causal, dropout_rate=rate, dropout_key=KEY, implementation="xla",
    )

  return fn


def main_shape(settings) -> str:
  return f"B{settings.batch} T=S={settings.seq} N{settings.heads} H{settings.head_dim} bf16"


def main_table(settings) -> None:
  b, t, n, h = settings.batch, settings.seq, settings.heads, settings.head_dim
  shape = main_shape(settings)
  q, k, v, d_out = qkv(2, b, t, t, n, n, h, jnp.bfloat16)
  args = (q, k, v, KEY_DATA, d_out)
  keep: dict = {}
  for rate in settings.rates:
    if nn is not None:
      if rate:
        time_row(settings, "flax, per-head dropout", rate, flax_fn(rate, False), args, shape)
        time_row(settings, "flax, shared dropout (default)", rate, flax_fn(rate, True), args, shape)
      else:
        time_row(settings, "flax, no dropout", rate, flax_fn(0.0, False), args, shape)
    if settings.cudnn:
      if not rate:
        time_row(settings, "jax.nn cuDNN", rate, cudnn_fn(False), args, shape)
      time_row(settings, "cuDNN private (not reproducible)", rate, cudnn_private_fn(rate, False), args, shape)
    time_row(settings, "jaxdrop xla", rate, jaxdrop_xla_fn(rate, False), args, shape, keep)
    config = config_for(settings, b, n, h, False, rate)
    time_row(settings, PALLAS, rate, pallas_attention(settings, config), args, shape, keep)
  for rate in settings.rates:
    if ("jaxdrop xla", rate) in keep and (PALLAS, rate) in keep:
      with item(f"(b) benchmark shape: pallas == xla, rate={rate}"):
        got, want = keep[(PALLAS, rate)], keep[("jaxdrop xla", rate)]
        close(got[0], want[0], 3e-2, "out")
        for name, g, w in zip(("dq", "dk", "dv"), got[1], want[1]):
          close(g, w, 3e-2, name)


def kernels_alone(settings, q, k, v, d_out, config, blocks, names=("forward", "dq", "dk/dv")):
  """(static, {name: (fn, args)}): the library's private kernel entry points, each alone.

  They run on the padded operands; the backward kernels get the forward's
  residuals (computed here, when asked for). XLA drops a kernel whose outputs
  are unused, so "dq" and "dk/dv" are one kernel (and its delta) each.
  """
  st, operands = pt.prepare(q, k, v, None, None, KEY_DATA, None, config, blocks,
                            settings.interpret)
  forward = functools.partial(pt._forward, st)
  kernels = {"forward": (forward, operands)}
  if set(names) - {"forward"}:
    residuals = (*operands, *jax.jit(forward)(*operands))
    d_out_p = base.pad_axis(base.pad_axis(d_out, 1, st.rows_p), 3, st.head_dim)
    kernels["dq"] = (lambda r, d: pt._backward(st, r, d)[0], (residuals, d_out_p))
    kernels["dk/dv"] = (lambda r, d: pt._backward(st, r, d)[1:3], (residuals, d_out_p))
  return st, {name: kernels[name] for name in names}


def kernel_profile(settings) -> None:
  """Each kernel alone at the main shape, rates 0 and 0.1: where the time goes.

  The rate-0.1 / rate-0 ratio of a kernel is what its mask (hash and select)
  costs; TFLOP/s counts the kernel's own matmuls, recomputation included:
  forward 4, dq 6, dk/dv 8 times B N T S H (H as padded for the kernels). It
  runs whatever the budget, before the optional sections: a missed target
  needs it.
  """
  b, t, n, h = settings.batch, settings.seq, settings.heads, settings.head_dim
  shape = main_shape(settings)
  q, k, v, d_out = qkv(2, b, t, t, n, n, h, jnp.bfloat16)
  blocks = SMOKE_BLOCKS if settings.interpret else None
  work = {"forward": 4, "dq": 6, "dk/dv": 8}
  for rate in settings.rates:
    kernels = None
    with item(f"(d) profile: the forward's residuals, rate={rate} {shape}"):
      config = config_for(settings, b, n, h, False, rate)
      st, kernels = kernels_alone(settings, q, k, v, d_out, config, blocks)
    for name, (fn, args) in (kernels or {}).items():
      with item(f"(d) profile: {name} kernel alone, rate={rate} {shape}"):
        seconds, _, _, _ = compile_and_time(settings, fn, args)
        tflops = work[name] * b * n * t * t * st.head_dim / seconds / 1e12
        RESULTS["profile"].append(dict(kernel=name, rate=rate, shape=shape,
                                       ms=seconds * 1e3, tflops=tflops))
        print(f"     {name:<8} rate {rate:<4} {seconds * 1e3:9.3f} ms  {tflops:6.1f} TFLOP/s",
              flush=True)


def causal_table(settings) -> None:
  b, t, n, h = settings.batch, settings.causal_seq, settings.heads, settings.head_dim
  shape = f"causal B{b} T=S={t} N{n} H{h} bf16"
  q, k, v, d_out = qkv(3, b, t, t, n, n, h, jnp.bfloat16)
  args = (q, k, v, KEY_DATA, d_out)
  for rate in settings.rates:
    if elapsed() > settings.budget_s:
      RESULTS["notes"].append(f"skipped {shape} rate {rate}: time budget")
      continue
    config = config_for(settings, b, n, h, True, rate)
    time_row(settings, PALLAS, rate, pallas_attention(settings, config), args, shape)
    if settings.cudnn:
      if not rate:
        time_row(settings, "jax.nn cuDNN", rate, cudnn_fn(True), args, shape)
      else:
        time_row(settings, "cuDNN private (not reproducible)", rate,
                 cudnn_private_fn(rate, True), args, shape, fwd_only_too=False)
    if rate:
      time_row(settings, "jaxdrop xla", rate, jaxdrop_xla_fn(rate, True), args, shape,
               fwd_only_too=False)


def long_table(settings) -> None:
  if elapsed() > settings.budget_s:
    RESULTS["notes"].append("skipped the long sequence: time budget")
    return
  b, t, n, h = settings.batch, settings.long_seq, settings.heads, settings.head_dim
  shape = f"B{b} T=S={t} N{n} H{h} bf16"
  q, k, v, d_out = qkv(4, b, t, t, n, n, h, jnp.bfloat16)
  args = (q, k, v, KEY_DATA, d_out)
  config = config_for(settings, b, n, h, False, 0.1)
  time_row(settings, PALLAS, 0.1, pallas_attention(settings, config), args, shape)
  if nn is not None:
    with item(f"(c) flax per-head dropout temp memory at {shape} (compile only)"):
      lowered = jax.jit(with_grads(flax_fn(0.1, False))).lower(*args)
      temp = lowered.compile().memory_analysis().temp_size_in_bytes
      RESULTS["timings"].append(dict(label="flax, per-head dropout (compiled, not run)",
                                     rate=0.1, mode="fwd+bwd", shape=shape, ms=None,
                                     temp_mb=temp / 1e6, compile_s=None))
      print(f"     flax per-head dropout at {shape}: temp {temp / 1e9:.1f} GB", flush=True)


# Around the defaults (64 x 64 tiles, 4 warps, 3 stages at H 64), each forward+backward.
SWEEP = (
    pt.BlockSizes(),
    pt.BlockSizes(num_stages=2),
    pt.BlockSizes(q=128, k=64, num_warps=4),
    pt.BlockSizes(q=128, k=128),
    pt.BlockSizes(q=64, k=128, num_warps=4),
    pt.BlockSizes(q_dkv=128, k_dkv=64, q_dq=64, k_dq=128, num_warps=8),
)


def sweep(settings) -> None:
  b, t, n, h = settings.batch, settings.seq, settings.heads, settings.head_dim
  shape = main_shape(settings)
  q, k, v, d_out = qkv(2, b, t, t, n, n, h, jnp.bfloat16)
  args = (q, k, v, KEY_DATA, d_out)
  config = config_for(settings, b, n, h, False, 0.1)
  for blocks in SWEEP:
    if elapsed() > settings.budget_s:
      RESULTS["notes"].append("block sweep cut short: time budget")
      return
    label = (f"pallas fwd {blocks.q}x{blocks.k} dkv {blocks.q_dkv}x{blocks.k_dkv} "
             f"dq {blocks.q_dq}x{blocks.k_dq} warps {blocks.num_warps} stages {blocks.num_stages}")
    time_row(settings, label, 0.1, pallas_attention(settings, config, blocks), args,
             shape, mode_list=("fwd+bwd", "fwd"))


# Tile candidates for the "tune" section, each kernel timed alone: (q, k, warps,
# stages) of the forward, and (q_dkv, k_dkv, q_dq, k_dq, warps, stages) of the two
# backward kernels. The first of each is the default; the defaults before the
# tune run on an H100 were 128 x 64 forward tiles, 64 x 64 backward ones, 2 stages.
TUNE_FORWARD = (
    (64, 64, None, None), (64, 64, None, 2), (64, 64, 8, 2), (128, 64, None, 2),
    (128, 64, 4, 2), (128, 64, 4, 3), (64, 128, 4, 2), (128, 128, 8, 2), (128, 32, 4, 2),
    (64, 32, 4, 2), (32, 64, 4, 2),
)
TUNE_BACKWARD = (
    (64, 64, 64, 64, None, None), (64, 64, 64, 64, None, 2), (64, 64, 64, 64, 8, 2),
    (32, 64, 64, 32, 4, 2), (64, 128, 128, 64, 8, 2), (32, 128, 128, 32, 4, 2),
    (128, 64, 64, 128, 8, 2), (32, 32, 32, 32, 4, 2),
)


def tune(settings) -> None:
  """Each kernel alone under each candidate tile, checked against the default tiles.

  Cases: H 64 and 128 at the main shape, and causal T = S = 4096 at H 64; the
  forward at rates 0 and 0.1, the backward kernels at 0.1 (and 0 at H 64).
  A candidate's outputs must equal the default's within bf16 rounding (the mask
  does not depend on the tiles), so any of them can become the default.
  """
  b, n = settings.batch, settings.heads
  forward_tiles, backward_tiles = TUNE_FORWARD, TUNE_BACKWARD
  cases = [(settings.head_dim, settings.seq, False), (2 * settings.head_dim, settings.seq, False),
           (settings.head_dim, settings.causal_seq, True)]
  rates = settings.rates
  if settings.interpret:  # a smoke run: two of each, shrunk to the tiny shapes, one case
    forward_tiles, backward_tiles, cases = forward_tiles[:2], backward_tiles[:2], cases[:1]
    rates = rates[-1:]
  for head_dim, t, causal in cases:
    shape = f"{'causal ' if causal else ''}B{b} T=S={t} N{n} H{head_dim} bf16"
    q, k, v, d_out = qkv(2, b, t, t, n, n, head_dim, jnp.bfloat16)
    for rate in rates:
      config = config_for(settings, b, n, head_dim, causal, rate)
      candidates = [("forward", pt.BlockSizes(q=a, k=c, num_warps=w, num_stages=s))
                    for a, c, w, s in forward_tiles]
      if rate or (head_dim == settings.head_dim and not causal):
        candidates += [("backward", pt.BlockSizes(q_dkv=a, k_dkv=c, q_dq=d, k_dq=e,
                                                   num_warps=w, num_stages=s))
                       for a, c, d, e, w, s in backward_tiles]
      reference = {}
      for part, blocks in candidates:
        if elapsed() > settings.budget_s:
          RESULTS["notes"].append(f"tune cut short at {shape} rate {rate}: time budget")
          return
        if settings.interpret:  # the smoke run's tiles, with the candidate's launch options
          blocks = SMOKE_BLOCKS._replace(num_warps=blocks.num_warps, num_stages=blocks.num_stages)
        tiles = (f"fwd {blocks.q}x{blocks.k}" if part == "forward" else
                 f"dkv {blocks.q_dkv}x{blocks.k_dkv} dq {blocks.q_dq}x{blocks.k_dq}")
        label = f"{tiles} warps {blocks.num_warps} stages {blocks.num_stages}"
        with item(f"(e) tune {label} rate={rate} {shape}"):
          names = ("forward",) if part == "forward" else ("dq", "dk/dv")
          _, kernels = kernels_alone(settings, q, k, v, d_out, config, blocks, names)
          for name, (fn, args) in kernels.items():
            seconds, _, _, first = compile_and_time(settings, fn, args)
            if name in reference:
              for got, want in zip(jax.tree.leaves(first), jax.tree.leaves(reference[name])):
                close(got, want, 3e-2, f"{name} vs the default tiles")
            else:
              reference[name] = first
            RESULTS.setdefault("tune", []).append(dict(
                kernel=name, label=label, rate=rate, shape=shape, ms=seconds * 1e3))
            print(f"     {name:<8} {label:<44} rate {rate:<4} {shape:<32} {seconds * 1e3:8.3f} ms",
                  flush=True)


def tune_table() -> str:
  """(e) as markdown: each kernel's time under each tile, per shape and rate."""
  lines = ["| shape | kernel | tiles | rate | ms |", "|---|---|---|---|---|"]
  for r in RESULTS.get("tune", []):
    lines.append(f"| {r['shape']} | {r['kernel']} | {r['label']} | {r['rate']} | {r['ms']:.3f} |")
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# Report.


def table() -> str:
  lines = [
      "| shape | implementation | rate | fwd+bwd ms | fwd ms | temp MB (fwd+bwd) |",
      "|---|---|---|---|---|---|",
  ]
  rows: dict = {}
  for r in RESULTS["timings"]:
    rows.setdefault((r["shape"], r["label"], r["rate"]), {})[r["mode"]] = r
  for (shape, label, rate), modes in rows.items():
    both = modes.get("fwd+bwd", {})
    fwd = modes.get("fwd", {})

    def fmt(x, digits):
      return "-" if x is None else f"{x:.{digits}f}"

    lines.append(
        f"| {shape} | {label} | {rate} | {fmt(both.get('ms'), 3)} | {fmt(fwd.get('ms'), 3)} "
        f"| {fmt(both.get('temp_mb'), 1)} |"
    )
  return "\n".join(lines)


def profile_table() -> str:
  """(d) as markdown: each kernel's time at rates 0 and 0.1, and what the mask adds."""
  lines = [
      "| kernel | rate 0 ms | rate 0.1 ms | mask cost | TFLOP/s at 0.1 |",
      "|---|---|---|---|---|",
  ]
  by = {(r["kernel"], r["rate"]): r for r in RESULTS["profile"]}
  for kernel in dict.fromkeys(r["kernel"] for r in RESULTS["profile"]):
    plain, dropped = by.get((kernel, 0.0)), by.get((kernel, 0.1))
    cost = f"{dropped['ms'] / plain['ms']:.2f}x" if plain and dropped else "-"
    lines.append(
        f"| {kernel} | {plain['ms'] if plain else float('nan'):.3f} "
        f"| {dropped['ms'] if dropped else float('nan'):.3f} | {cost} "
        f"| {dropped['tflops'] if dropped else float('nan'):.0f} |"
    )
  return "\n".join(lines)


def targets(settings) -> None:
  def ms(label, rate, mode="fwd+bwd"):
    for r in RESULTS["timings"]:
      if (r["label"], r["rate"], r["mode"], r["shape"]) == (label, rate, mode, main_shape(settings)):
        return r["ms"], r["temp_mb"]
    return None, None

  pallas, pallas_temp = ms(PALLAS, 0.1)
  flax, _ = ms("flax, per-head dropout", 0.1)
  cudnn, _ = ms("cuDNN private (not reproducible)", 0.1)
  fwd_drop, _ = ms(PALLAS, 0.1, "fwd")
  fwd_none, _ = ms(PALLAS, 0.0, "fwd")
  lines = []
  if pallas is not None:
    lines.append(f"pallas fwd+bwd rate 0.1: {pallas:.3f} ms (target <= 3.7, stretch <= 2.6), "
                 f"temp {'?' if pallas_temp is None else f'{pallas_temp:.1f}'} MB (target <= 150)")
  if pallas and flax:
    lines.append(f"speed-up over flax per-head: {flax / pallas:.2f}x (target >= 2)")
  if pallas and cudnn:
    lines.append(f"ratio to cuDNN fused dropout: {pallas / cudnn:.2f} (stretch <= 1.25)")
  if fwd_drop and fwd_none:
    lines.append(f"forward rate 0.1 / rate 0: {fwd_drop / fwd_none:.2f} (target <= 1.3)")
  RESULTS["targets"] = lines
  print("\n".join(lines))


def checks(settings) -> None:
  check_mask_bits(settings)
  check_small(settings)


# Each runs in its own process, in this order.
SECTIONS = {
    "checks": checks, "main": main_table, "profile": kernel_profile, "causal": causal_table,
    "long": long_table, "sweep": sweep, "tune": tune,
}


def run_section(name: str, settings, part: Path) -> None:
  """The child: runs one section and writes its RESULTS to ``part``."""
  global PART
  PART = part
  print(f"\n== section {name} ==", flush=True)
  try:
    SECTIONS[name](settings)
  finally:
    save_part()  # also the notes of items skipped for time


def run_children(options, settings, folder: Path, save) -> None:
  """The parent: runs each section in a child process, merges what it wrote, saves."""
  for name in options.sections or [name for name in SECTIONS if name != "tune"]:
    if name == "sweep" and options.no_sweep:
      continue
    part = folder / f"gpu_attention_check.{name}.part.json"
    part.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--section", name, "--part", str(part),
               "--budget-s", str(settings.budget_s - elapsed())]
    if options.smoke:
      command.append("--smoke")
    # Never past the whole run's limit, so a hung section leaves time for the rest.
    limit = max(1.0, min(settings.section_timeout_s, settings.total_s - elapsed()))
    try:
      code = subprocess.run(command, check=False, timeout=limit, env=CHILD_ENV).returncode
      failure = None if code == 0 else f"the process ended with code {code} (negative: a signal)"
    except subprocess.TimeoutExpired:
      failure = f"the process was killed after {limit:.0f} s"
    if part.exists():  # written after every item, so a crash keeps those before it
      try:
        child = json.loads(part.read_text())
      except ValueError as error:
        failure = f"{failure or 'it ended'}; its results were unreadable: {error}"
      else:
        for field in ("checks", "timings", "notes", "profile", "tune"):
          RESULTS.setdefault(field, []).extend(child.get(field, []))
      part.unlink()
    if failure is not None:
      text = f"section {name}: {failure}"
      print(f"FAIL {text}", flush=True)
      RESULTS["checks"].append({"name": f"section {name}", "ok": False, "error": text})
    save()


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode (CPU)")
  parser.add_argument("--budget-s", type=float, default=None, help="stop optional items after this")
  parser.add_argument("--no-sweep", action="store_true", help="skip the block-size sweep")
  parser.add_argument("--out", default=None, help="folder for the JSON (default $OUT or benchmarks/results)")
  parser.add_argument("--section-timeout-s", type=float, default=None,
                      help="kill a section's process after this")
  parser.add_argument("--total-s", type=float, default=None,
                      help="kill the section running when the whole run reaches this")
  parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=None,
                      help="run only these sections (default: all but tune)")
  parser.add_argument("--section", choices=list(SECTIONS), help=argparse.SUPPRESS)
  parser.add_argument("--part", default=None, help=argparse.SUPPRESS)
  options = parser.parse_args(argv)
  settings = SMOKE if options.smoke else Settings()
  for field in ("budget_s", "section_timeout_s", "total_s"):
    if getattr(options, field) is not None:
      settings = dataclasses.replace(settings, **{field: getattr(options, field)})
  if not options.smoke and jax.default_backend() != "gpu":
    print(f"no GPU (backend {jax.default_backend()}); use --smoke on CPU")
    return RESULTS
  if options.section is not None:
    run_section(options.section, settings, Path(options.part))
    return RESULTS
  device = jax.devices()[0]
  RESULTS["meta"] = dict(
      device=getattr(device, "device_kind", str(device)), backend=jax.default_backend(),
      jax=jax.__version__, smoke=options.smoke, settings=dataclasses.asdict(settings),
  )
  print(f"device: {RESULTS['meta']['device']}, jax {jax.__version__}", flush=True)
  folder = Path(options.out or os.environ.get("OUT") or Path(__file__).parent / "results")
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / ("gpu_attention_check_smoke.json" if options.smoke else "gpu_attention_check.json")

  def save() -> None:  # after every section, so that a killed run keeps what finished
    path.write_text(json.dumps(RESULTS, indent=1, default=str))

  run_children(options, settings, folder, save)

  print()
  print(table())
  print()
  print(profile_table())
  if RESULTS.get("tune"):
    print()
    print(tune_table())
    RESULTS["tune_markdown"] = tune_table()
  print()
  targets(settings)
  failed = [c["name"] for c in RESULTS["checks"] if not c["ok"]]
  print(f"\n{len(RESULTS['checks']) - len(failed)} items ok, {len(failed)} failed "
        f"in {elapsed():.0f} s")
  for name in failed:
    print("  failed:", name)
  RESULTS["table_markdown"] = table()
  RESULTS["profile_markdown"] = profile_table()
  save()
  print("wrote", path)
  return RESULTS


if __name__ == "__main__":
  main()
