"""Compiles for an H100 on a machine without a GPU: temp memory, and kernels that build.

XLA compiles for a GPU it only has a description of (a "deviceless" AOT
compile), so this runs on any Linux x86 host with the CUDA plugin installed
(``pip install "jax[cuda12]"``, about 5 GB, in a separate virtual environment;
the plugin needs ``JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1`` when no driver is
present). It reports what a compile fixes, never a time:

  (1) ``bench.py``'s MLP train step at its GPU shape (3 x Dense 4096 +
      relu + dropout 0.1, batch 8192, float32, Adam, donated; input width
      4096), the step ``run_gpu.sh`` times: compiled temp
      memory and kernel launches for no dropout, flax, jaxdrop (both
      modes), jaxdrop under ``jax.checkpoint`` policies, and
      ``relu_dropout``; then the same at ``bench.py``'s small default shape;
  (2) attention, B 8, T = S = 2048, N 16, H 64, bfloat16, forward+backward:
      compiled temp memory of flax, jaxdrop ``"xla"`` and ``"pallas"``;
  (3) the Pallas kernels through XLA's own Triton pipeline for each covered
      case (the Pallas interpreter and Triton-IR lowering on CPU do not run
      Triton's passes, where a layout once exhausted host memory);
  (4) the fast-mode elementwise kernel (``benchmarks/pallas_dropout.py``), the same;
  (5) ``bench.py``'s bf16 transformer train step at its GPU shape
      (2 blocks, batch 16, T 1024, width 1024, 16 heads): temp memory and
      kernel launches.

Run: ``JAX_PLATFORMS=cpu JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 python benchmarks/aot_gpu.py``
"""

from __future__ import annotations

import functools
import re
import sys
import time
import traceback
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.experimental import topologies

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402 - benchmarks/common.py: the models, losses and train step
import jaxdrop  # noqa: E402
import pallas_dropout as _pallas_dropout  # noqa: E402  (benchmarks/pallas_dropout.py)
from jaxdrop._attention import pallas_triton  # noqa: E402

# The device description XLA compiles against (an H100 SXM, as reported by one).
H100 = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 84929347584
  shared_memory_per_block_optin: 232448 cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: 12 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""


@functools.cache
def replicated() -> jax.sharding.NamedSharding:
  topology = topologies.get_topology_desc(platform="cuda", target_config=H100, topology="1x1x1")
  mesh = topologies.make_mesh(topology, (1,), ("x",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def h100_context():
  """Tells Pallas which GPU it lowers for (jax >= 0.11 asks; there is no GPU to ask)."""
  device = jax.sharding.AbstractDevice(
      device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
  mesh = jax.sharding.AbstractMesh(
      (1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,), abstract_device=device)
  return jax.sharding.use_abstract_mesh(mesh)


def on_h100(tree):
  """Shape-dtype structs of ``tree``'s leaves, placed on the described H100."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated()), tree)


def temp_mb(fn, *args) -> float:
  with h100_context():
    lowered = jax.jit(fn).lower(*on_h100(args))
  compiled = lowered.compile()
  return compiled.memory_analysis().temp_size_in_bytes / 1e6


def report(name: str, compute) -> None:
  """Prints one row (MB, or MB and kernels); a failure prints its error and the run goes on."""
  start = time.perf_counter()
  try:
    value = compute()
  except Exception as error:  # noqa: BLE001 - every row is reported
    print(f"  {name:<58} FAILED {type(error).__name__}: {str(error)[:300]}", flush=True)
    traceback.print_exc(limit=2)
    return
  megabytes, kernels = value if isinstance(value, tuple) else (value, None)
  launches = "" if kernels is None else f"  {kernels:4d} kernels"
  print(f"  {name:<58} {megabytes:10.1f} MB{launches}  ({time.perf_counter() - start:.1f} s)",
        flush=True)


# ----------------------------------------------------------------------------
# (1) The MLP step.

RATE = 0.1


# Entry instructions that launch nothing: they name, pick or reinterpret buffers.
_NO_KERNEL = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "opt-barrier"}


def kernel_count(compiled) -> int:
  """GPU kernels one run of ``compiled`` launches: its entry's fusions, library calls, copies.

  Launches cost a few microseconds each, which matters for small steps. Loops
  would launch their bodies many times, so a program with one is refused.
  """
  text = compiled.as_text()
  entry = text[text.index("\nENTRY"):]
  entry = entry[: entry.index("\n}")]
  opcodes = re.findall(r"^\s*(?:ROOT )?%\S+ = .*? ([a-z][a-z-]*)\(", entry, re.M)
  if {"while", "call", "conditional"} & set(opcodes):
    raise ValueError("kernel_count counts straight-line programs only")
  return sum(op not in _NO_KERNEL for op in opcodes)


def step_cost(model: nn.Module, batch, loss_of) -> tuple[float, int]:
  """Temp MB and kernel count of ``bench.py``'s donated train step, compiled for the H100."""
  tx = optax.adam(1e-3)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), batch[0], train=False)["params"])
  opt_state = jax.eval_shape(tx.init, params)
  step = common.make_train_step(model, tx, loss_of)
  with h100_context():
    lowered = step.lower(*on_h100((params, opt_state, batch, jax.random.key(0))))
  compiled = lowered.compile()
  return compiled.memory_analysis().temp_size_in_bytes / 1e6, kernel_count(compiled)


def mlp_table() -> None:
  for title, (inputs, widths, batch_size) in (
      ("(1) MLP step, 3 x Dense 4096, batch 8192", (4096, (4096,) * 3, 8192)),
      ("(1b) MLP step, 784-1024-1024-10, batch 256 (bench.py's default)",
       (784, (1024, 1024), 256)),
  ):
    print(f"{title}, float32, Adam, donated: temp memory, kernels")
    batch = (jnp.zeros((batch_size, inputs)), jnp.zeros((batch_size,), jnp.int32))
    # pallas=True: the Pallas kernel's rows too, as bench.py adds them on a GPU.
    for name, model in common.mlp_models(RATE, widths, pallas=True).items():
      report(name, functools.partial(step_cost, model, batch, common.classification_loss))


# ----------------------------------------------------------------------------
# (2) and (3) Attention.


def attention_temp(implementation: str, rate: float, *, batch=8, seq=2048, kv_seq=None,
                   heads=16, kv_heads=None, head_dim=64, dtype=jnp.bfloat16, causal=False,
                   bias_shape=None, padding_mask=False) -> float:
  kv_seq, kv_heads = kv_seq or seq, kv_heads or heads
  q = jnp.zeros((batch, seq, heads, head_dim), dtype)
  kv = jnp.zeros((batch, kv_seq, kv_heads, head_dim), dtype)
  bias = None if bias_shape is None else jnp.zeros(bias_shape, dtype)
  mask = jnp.ones((batch, 1, 1, kv_seq), bool) if padding_mask else None
  key_data = jax.random.key_data(jax.random.key(0))

  def loss(q, k, v, bias, mask, key_data):
    key = jax.random.wrap_key_data(key_data)
    if implementation == "flax":
      out = nn.dot_product_attention(q, k, v, bias=bias, mask=mask, dropout_rng=key,
                                     dropout_rate=rate, broadcast_dropout=False,
                                     deterministic=rate == 0)
    else:
      out = jaxdrop.dot_product_attention(q, k, v, bias, mask, is_causal=causal,
                                          dropout_rate=rate, dropout_key=key,
                                          implementation=implementation)
    return jnp.sum(out.astype(jnp.float32))

  grad = jax.grad(loss, argnums=(0, 1, 2) if bias is None else (0, 1, 2, 3))
  return temp_mb(grad, q, kv, kv, bias, mask, key_data)


def attention_tables() -> None:
  # The kernels compile for "gpu" only; this host's backend is the CPU.
  check = pallas_triton.unsupported_reason
  pallas_triton.unsupported_reason = functools.partial(check, platform="gpu")
  try:
    _attention_rows()
  finally:
    pallas_triton.unsupported_reason = check


def _attention_rows() -> None:
  print("\n(2) attention B8 T=S=2048 N16 H64 bf16, forward+backward: temp memory")
  for name, implementation, rate in (
      ("flax, per-head dropout 0.1", "flax", 0.1), ("flax, no dropout", "flax", 0.0),
      ("jaxdrop xla, dropout 0.1", "xla", 0.1), ("jaxdrop pallas, dropout 0.1", "pallas", 0.1),
      ("jaxdrop pallas, no dropout", "pallas", 0.0),
  ):
    report(name, functools.partial(attention_temp, implementation, rate))
  print("\n(3) Pallas kernels through XLA's Triton pipeline (forward+backward, dropout 0.1)")
  cases = {
      "causal T=S=4096": dict(seq=4096, causal=True),
      "T=S=8192": dict(seq=8192),
      "H 128": dict(head_dim=128),
      "H 96 (zero-padded to 128)": dict(head_dim=96),
      "H 256": dict(head_dim=256),
      "float16": dict(dtype=jnp.float16),
      "float32": dict(dtype=jnp.float32),
      "GQA 16/4 heads": dict(kv_heads=4),
      "T 1000, S 1500, padding mask": dict(seq=1000, kv_seq=1500, padding_mask=True),
      "bias [1,N,1,S]": dict(bias_shape=(1, 16, 1, 2048)),
      "bias [1,1,T,S], B 2": dict(batch=2, bias_shape=(1, 1, 2048, 2048)),
  }
  for name, options in cases.items():
    report(name, functools.partial(attention_temp, "pallas", 0.1, **options))


def block_table() -> None:
  batch_size, seq, width, heads = 16, 1024, 1024, 16
  print(f"\n(5) bf16 transformer train step, B T D N = {batch_size} {seq} {width} {heads}, "
        f"dropout {RATE}: temp memory, kernels")
  batch = (jnp.zeros((batch_size, seq, width), jnp.bfloat16),
           jnp.zeros((batch_size, seq, width), jnp.float32))
  for name, model in common.block_models(heads, RATE, pallas=True).items():
    report(name, functools.partial(step_cost, model, batch, common.regression_loss))


def elementwise_table() -> None:
  print("\n(4) grad of sum(dropout(x) * w), 2^28 elements, rate 0.1: temp memory")
  x = jnp.zeros((2**28,), jnp.float32)

  def grad_temp(fn, dtype):
    def grad(key_data, x, w):
      key = jax.random.wrap_key_data(key_data)
      return jax.grad(lambda x: jnp.sum((fn(key, x) * w).astype(jnp.float32)))(x)

    key_data = jax.random.key_data(jax.random.key(0))
    return temp_mb(grad, key_data, x.astype(dtype), x.astype(dtype))

  for dtype in (jnp.float32, jnp.bfloat16):
    name = jnp.dtype(dtype).name
    report(f"jaxdrop bits=16, {name}",
           functools.partial(grad_temp, lambda k, x: jaxdrop.dropout(k, x, RATE, bits=16), dtype))
    report(f"Pallas fast-mode kernel, {name}",
           functools.partial(grad_temp, lambda k, x: _pallas_dropout.dropout16(k, x, RATE), dtype))


if __name__ == "__main__":
  print(f"jax {jax.__version__}; compiling for: {H100.strip().splitlines()[-1]}")
  mlp_table()
  attention_tables()
  elementwise_table()
  block_table()
