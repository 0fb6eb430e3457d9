"""Markdown tables from the benchmarks' JSON results, for BENCHMARKS.md and docs/performance.md.

A page marks each generated table with two comments, and everything between
them belongs to this script::

  <!-- report: cpu-elementwise -->
  (the caption and the table, generated)
  <!-- /report -->

``TABLES`` maps each name to a results file under ``benchmarks/results/`` and
the function that renders it. A caption names the run's device, versions,
commit, date and command (the JSON's ``meta``; a section's own ``meta``, as
in a transcribed file, overrides it). Every ratio is computed here from the
recorded times and bytes: ``× floor`` is ms / the floor's ms, ``vs flax`` is
flax.linen's ms / ms, ``× no dropout`` is ms / the no-dropout step's ms. A
results file that is not there yet renders as a line that says how to make it.

Usage (from the repository root):
  python benchmarks/report.py --write    # regenerate every marked table in the pages
  python benchmarks/report.py --check    # exit 1 with a diff if a page differs from that
  python benchmarks/report.py benchmarks/results/bench-cpu.json   # all its tables, printed
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGES = (ROOT / "BENCHMARKS.md", ROOT / "docs" / "performance.md")

FLOOR = "x * 2.0 (floor)"  # bench.py's names
FLAX = "flax.linen.Dropout"
NO_DROPOUT = "no dropout"

BLOCK = re.compile(r"(<!-- report: ([\w.-]+) -->\n)(.*?)(<!-- /report -->)", re.S)


# ----------------------------------------------------------------------------
# Formatting.


def ms(value: float) -> str:
  """Milliseconds: to the microsecond below 10 ms, else to four significant digits."""
  digits = 3 if value < 10 else max(0, 3 - math.floor(math.log10(value)))
  return f"{value:.{digits}f}"


def ratio(value: float) -> str:
  return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def size(n: float, sign: bool = False) -> str:
  """Bytes as B, KB or MB (10^3, 10^6 bytes), one decimal above bytes."""
  prefix = ("+" if n >= 0 else "−") if sign else ("−" if n < 0 else "")
  n = abs(n)
  if n < 1e3:
    return f"{prefix}{n:.0f} B"
  if n < 1e6:
    return f"{prefix}{n / 1e3:.1f} KB"
  return f"{prefix}{n / 1e6:.1f} MB"


def fraction(value: float, reference: float) -> str:
  """``value`` against ``reference``: ``1/N`` when smaller, ``N×`` otherwise."""
  if value <= 0:
    return "0"
  if value < reference:
    times = reference / value
    return f"1/{times:.0f}" if times >= 100 else f"1/{times:.3g}"
  return f"{value / reference:.2f}×"


def table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> list[str]:
  """A markdown table; ``align`` holds ``"l"`` or ``"r"`` per column (default: text left,
  numbers right)."""
  align = align or ["l"] + ["r"] * (len(header) - 1)
  rule = ["---" if a == "l" else "---:" for a in align]
  return ["| " + " | ".join(cells) + " |" for cells in (header, rule, *rows)]


def caption(meta: dict[str, Any], title: str) -> list[str]:
  """The lines above a table: what it shows, where and when it ran, and its command."""
  if meta.get("backend") == "cpu":
    device = f"CPU: {meta.get('cpu', 'cpu')}, {meta.get('cpu_count', '?')} cores"
    load = meta.get("load_average")
    if load:
      device += f", load average {load[0]:.1f} at the start"
  else:
    device = meta.get("device", "?")
  versions = meta.get("versions", {})
  parts = [device, ", ".join(f"{name} {versions[name]}" for name in ("jax", "flax")
                             if versions.get(name))]
  parts += [f"commit {meta.get('commit') or '?'}", str(meta.get("date", "?"))[:10]]
  if meta.get("source"):
    parts.append(meta["source"])
  if meta.get("rerun"):  # a transcribed run, made by a script that has since been replaced
    command = (f"Rerun with `{meta['rerun']}` (the run itself used that commit's script and "
               "timer).")
  else:
    command = f"Command: `{meta.get('command', '?')}`."
  return [f"**{title}** _" + "; ".join(parts) + "._", command, ""]


def section(results: dict, key: str) -> tuple[dict, Any]:
  """``results[key]`` (its ``rows``, where it has them) and the meta that describes it: the
  file's, updated by the section's."""
  value = results[key]
  meta = dict(results.get("meta", {}))
  if isinstance(value, dict):
    meta.update(value.get("meta", {}))
    value = value.get("rows", value)
  return meta, value


# ----------------------------------------------------------------------------
# The tables.


def elementwise(results: dict, log2_size: int | None = None, rate: float | None = None,
                leave_out: tuple[str, ...] = ()) -> list[str]:
  """Forward and forward+backward ms per variant at one size and rate, every dtype.

  Each cell is ``ms (× floor, vs flax)``. Without a size or rate: the largest
  size, and rate 0.1 where it was run (else the first rate). ``leave_out``
  names variants to leave out of the table (not out of the ratios).
  """
  meta, records = section(results, "elementwise")
  log2_size = max(r["log2_size"] for r in records) if log2_size is None else log2_size
  rates = list(dict.fromkeys(r["rate"] for r in records if r["log2_size"] == log2_size))
  rate = (0.1 if 0.1 in rates else rates[0]) if rate is None else rate
  rows = [r for r in records if (r["log2_size"], r["rate"]) == (log2_size, rate)]
  columns = list(dict.fromkeys((r["dtype"], r["mode"]) for r in rows))
  by = {(r["variant"], r["dtype"], r["mode"]): r["ms"] for r in rows}
  body = []
  for variant in dict.fromkeys(r["variant"] for r in rows if r["variant"] not in leave_out):
    cells = [variant]
    for dtype, mode in columns:
      value = by.get((variant, dtype, mode))
      if value is None:
        cells.append("")
        continue
      floor, flax = by.get((FLOOR, dtype, mode)), by.get((FLAX, dtype, mode))
      notes = [ratio(value / floor) if floor else None,
               ratio(flax / value) + "×" if flax else None]
      notes = [n for n in notes if n]
      cells.append(ms(value) + (f" ({', '.join(notes)})" if notes else ""))
    body.append(cells)
  header = ["variant"] + [f"{dtype} {mode} ms (× floor, vs flax)" for dtype, mode in columns]
  title = f"Elementwise dropout, 2^{log2_size} elements, rate {rate}."
  return caption(meta, title) + table(header, body)


def steps(results: dict, key: str = "train_step") -> list[str]:
  """Temp memory and time of each variant's train step, against the no-dropout step."""
  meta, step = section(results, key)
  memory, timing = step["memory"], step["time"]
  base_bytes = memory[NO_DROPOUT]["temp_bytes"]
  base_ms = timing[NO_DROPOUT]["ms"]
  body = []
  for variant in dict.fromkeys([*memory, *timing]):
    m, t = memory.get(variant), timing.get(variant)
    body.append([
        variant,
        size(m["temp_bytes"]) if m else "",
        size(m["temp_bytes"] - base_bytes, sign=True) if m else "",
        ms(t["ms"]) if t else "",
        f"{t['ms'] / base_ms:.3f}" if t else "",
    ])
  header = ["variant", "temp memory", "vs no dropout", "step ms", "× no dropout"]
  return caption(meta, step["title"] + ".") + table(header, body)


def shape(config: dict) -> str:
  """An attention config's shape: ``B 1, N 8, T = S = 2048, H 64, float32``."""
  return (f"B {config.get('batch', '?')}, N {config.get('heads', '?')}, "
          f"T = S = {config.get('length', '?')}, H {config.get('head_dim', '?')}, "
          f"{config.get('dtype', '?')}")


def attention(results: dict, key: str = "attention") -> list[str]:
  """Attention alone: forward, forward+backward, and the latter's temp memory.

  Ratios are against flax's per-head dropout (its first row of that name),
  else the first row.
  """
  meta, rows = section(results, key)
  reference = next((r for r in rows if r["variant"].startswith("flax, per-head")), rows[0])
  has_rate = any("rate" in r for r in rows)
  body = []
  for r in rows:
    body.append([r["variant"]] + ([f"{r['rate']:g}"] if has_rate else []) + [
        ms(r["forward_ms"]),
        ms(r["forward_backward_ms"]),
        ratio(r["forward_backward_ms"] / reference["forward_backward_ms"]),
        size(r["temp_bytes"]),
        fraction(r["temp_bytes"], reference["temp_bytes"]),
    ])
  header = (["variant"] + (["rate"] if has_rate else [])
            + ["fwd ms", "fwd+bwd ms", "fwd+bwd × ref", "fwd+bwd temp memory", "memory vs ref"])
  config = results.get("config", {})
  if isinstance(results[key], dict):
    config = results[key].get("config", config)
  title = f"Attention alone, {shape(config)}; ref: {reference['variant']}."
  return caption(meta, title) + table(header, body)


def attention_block(results: dict) -> list[str]:
  """The transformer-block train step of ``bench_attention.py``, per ``attention_fn``."""
  meta, rows = section(results, "block")
  config = results.get("config", {})
  body = [[r["variant"], ms(r["step_ms"]), f"{r['step_ms'] / rows[0]['step_ms']:.2f}",
           size(r["temp_bytes"])] for r in rows]
  title = (f"Transformer-block train step, batch {config.get('block_batch', '?')}, "
           f"T {config.get('block_length', '?')}, width {config.get('block_width', '?')}, "
           f"{config.get('block_heads', '?')} heads, dropout {config.get('rate', '?')} on the "
           "attention weights and both residual branches.")
  header = ["attention_fn", "step ms", "× first row", "temp memory"]
  return caption(meta, title) + table(header, body)


def attention_kernels(results: dict) -> list[str]:
  """Each attention kernel alone, per rate, with the TFLOP/s recorded at the highest rate."""
  meta, rows = section(results, "attention_kernels")
  rates = sorted(dict.fromkeys(r["rate"] for r in rows))
  by = {(r["kernel"], r["rate"]): r for r in rows}
  body = []
  for kernel in dict.fromkeys(r["kernel"] for r in rows):
    times = [by[kernel, rate]["ms"] for rate in rates]
    body.append([kernel] + [ms(t) for t in times] + [
        ratio(times[-1] / times[0]), str(by[kernel, rates[-1]].get("tflops", ""))])
  header = (["kernel"] + [f"rate {rate:g} ms" for rate in rates]
            + [f"rate {rates[-1]:g} / rate {rates[0]:g}", f"TFLOP/s at {rates[-1]:g}"])
  config = results["attention_kernels"].get("config", {})
  title = f"Each attention kernel alone, {shape(config)}"
  if "tflops" in config:
    title += f"; TFLOP/s counts {config['tflops']}"
  title += "."
  return caption(meta, title) + table(header, body)


def tiles(results: dict) -> list[str]:
  """``tune_attention.py --tiles``: each kernel's time under each tile candidate, per case."""
  meta, rows = section(results, "tiles")
  body = [[r["case"], r["kernel"], r["tiles"], f"{r['rate']:g}", ms(r["ms"]),
           "" if r["max_abs_difference"] is None else f"{r['max_abs_difference']:.3g}"]
          for r in rows]
  header = ["case", "kernel", "tiles", "rate", "ms", "max abs difference from the default tiles"]
  config = results["tiles"].get("config", {})
  title = (f"Each attention kernel alone under each tile candidate, B {config.get('batch', '?')}, "
           f"N {config.get('heads', '?')}, {config.get('dtype', '?')}.")
  return caption(meta, title) + table(header, body, ["l", "l", "l", "r", "r", "r"])


def harness_check(results: dict) -> list[str]:
  """``check_harness.py``: each row's median timed in turns and alone, and their ratio."""
  meta = results.get("meta", {})
  rows = results["elementwise"]
  columns = list(dict.fromkeys((r["rate"], r["mode"]) for r in rows))
  by = {(r["variant"], r["rate"], r["mode"]): r for r in rows}
  body = []
  for variant in dict.fromkeys(r["variant"] for r in rows):
    cells = [variant]
    for rate, mode in columns:
      r = by.get((variant, rate, mode))
      cells.append(f"{ms(r['harness_ms'])} / {ms(r['alone_ms'])} ({r['ratio']:.2f})" if r else "")
    body.append(cells)
  header = ["variant"] + [f"rate {rate:g} {mode}: in turns / alone ms (ratio)"
                          for rate, mode in columns]
  first = rows[0]
  title = (f"The timer checked: 2^{first['log2_size']} {first['dtype']}, each row timed in "
           "turns with the others and alone, in alternating rounds.")
  lines = caption(meta, title) + table(header, body)
  if results.get("attention"):
    body = [[r["variant"], r["mode"], ms(r["harness_ms"]), ms(r["alone_ms"]),
             f"{r['ratio']:.2f}"] for r in results["attention"]]
    lines += ["", f"Attention, {shape(results.get('attention_config', {}))}:", ""]
    lines += table(["variant", "mode", "in turns ms", "alone ms", "ratio"], body,
                   ["l", "l", "r", "r", "r"])
  return lines


def flax_models(results: dict) -> list[str]:
  """``flax_models.py``: each model's train step and evaluation forward, flax against jaxdrop."""
  meta, rows = section(results, "flax_models")
  flax = {(r["model"], r["length"], r["rate"]): r for r in rows if r["variant"] == "flax"}
  body = []
  for r in rows:
    ref = flax[r["model"], r["length"], r["rate"]]
    body.append([
        r["model"], str(r["length"]), f"{r['rate']:g}", r["variant"],
        ms(r["train_ms"]), ratio(r["train_ms"] / ref["train_ms"]),
        size(r["train_temp_bytes"]), fraction(r["train_temp_bytes"], ref["train_temp_bytes"]),
        ms(r["eval_ms"]), ratio(r["eval_ms"] / ref["eval_ms"]),
        size(r["eval_temp_bytes"]), fraction(r["eval_temp_bytes"], ref["eval_temp_bytes"]),
        f"{r['train_compile_s']:.2f}", ratio(r["train_compile_s"] / ref["train_compile_s"]),
    ])
  header = ["model", "T", "attention dropout", "attention_fn", "train ms", "× flax",
            "train temp", "vs flax", "eval ms", "× flax", "eval temp", "vs flax",
            "train compile s", "× flax"]
  config = results.get("config", {})
  title = (f"Attention in flax models, batch {config.get('batch', '?')}, width "
           f"{config.get('width', '?')}, {config.get('heads', '?')} heads, depth "
           f"{config.get('depth', '?')}: a train step (Adam) and an evaluation forward pass, each "
           "against flax's default attention_fn at the same model, T and rate.")
  return caption(meta, title) + table(header, body, ["l", "r", "r", "l"] + ["r"] * 10)


# ----------------------------------------------------------------------------
# The pages.


@dataclasses.dataclass(frozen=True)
class Table:
  file: str  # under benchmarks/results/
  render: Callable[[dict], list[str]]
  make: str  # the command that writes the file


BENCH = "python benchmarks/bench.py"
ATTENTION = "python benchmarks/bench_attention.py"
CHECK = "python benchmarks/check_harness.py"
FLAX_MODELS = "python benchmarks/flax_models.py"
H100 = "a device run (docs/performance.md)"
# The pages' elementwise tables leave out the modules whose rows match
# jaxdrop.dropout's and flax.linen's (``report.py FILE`` prints every row).
MODULES = ("jaxdrop.linen.Dropout", "jaxdrop.nnx.Dropout", "flax.nnx.Dropout")
TABLES = {
    "cpu-elementwise": Table("bench-cpu.json", lambda r: elementwise(r, leave_out=MODULES), BENCH),
    "cpu-train-step": Table("bench-cpu.json", steps, BENCH),
    "cpu-block-step": Table("bench-cpu.json", lambda r: steps(r, "block_step"), BENCH),
    "cpu-attention": Table("bench_attention-cpu.json", attention, ATTENTION),
    "cpu-attention-block": Table("bench_attention-cpu.json", attention_block, ATTENTION),
    "cpu-harness-check": Table("check_harness-cpu.json", harness_check, CHECK),
    "cpu-flax-models": Table("flax_models-cpu.json", flax_models, FLAX_MODELS),
    "h100-elementwise": Table("h100-2026-11-27.json", lambda r: elementwise(r, leave_out=MODULES),
                              H100),
    "h100-train-step": Table("h100-2026-11-27.json", steps, H100),
    "h100-block-step": Table("h100-2026-11-27.json", lambda r: steps(r, "block_step"), H100),
    "h100-attention": Table("h100-2026-11-27.json", attention, H100),
    "h100-attention-kernels": Table("h100-2026-11-27.json", attention_kernels, H100),
}


def render(name: str, results_dir: Path = RESULTS) -> str:
  """The text of one marked block.

  Args:
    name: a key of ``TABLES``.
    results_dir: where the results files are.

  Returns:
    The table's caption and rows, or, while its results file does not exist,
    one line that says which command writes it.

  Raises:
    KeyError: ``name`` is not a table, or its file lacks the section it needs
      (a run cut short).
  """
  if name not in TABLES:
    raise KeyError(f"unknown table {name!r}: expected one of {', '.join(TABLES)}")
  spec = TABLES[name]
  path = results_dir / spec.file
  if not path.exists():
    return (f"_No results yet: `{spec.make}` writes `benchmarks/results/{spec.file}`; then "
            "`python benchmarks/report.py --write`._\n")
  try:
    return "\n".join(spec.render(json.loads(path.read_text()))) + "\n"
  except KeyError as missing:
    raise KeyError(f"table {name!r}: {spec.file} has no {missing}; was its run cut "
                   "short?") from None


def regenerate(text: str, results_dir: Path = RESULTS) -> str:
  """Replaces every marked block of a page.

  Args:
    text: the page.
    results_dir: where the results files are.

  Returns:
    ``text`` with the lines between each ``<!-- report: NAME -->`` and the
    next ``<!-- /report -->`` replaced by ``render(NAME)``; the rest unchanged.
  """
  return BLOCK.sub(lambda m: m.group(1) + render(m.group(2), results_dir) + m.group(4), text)


def everything(results: dict) -> str:
  """All the tables one results file holds, every size and rate: for reading, not pages."""
  parts = []
  if "elementwise" in results:
    _, records = section(results, "elementwise")
    for log2_size, rate in dict.fromkeys((r["log2_size"], r["rate"]) for r in records):
      parts.append(elementwise(results, log2_size, rate))
  for key in ("train_step", "block_step"):
    if key in results:
      parts.append(steps(results, key))
  if "attention" in results:
    parts.append(attention(results))
  if "block" in results:
    parts.append(attention_block(results))
  if "attention_kernels" in results:
    parts.append(attention_kernels(results))
  if "tiles" in results:
    parts.append(tiles(results))
  return "\n\n".join("\n".join(p) for p in parts)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  mode = parser.add_mutually_exclusive_group(required=True)
  mode.add_argument("--write", action="store_true", help="regenerate the pages' tables")
  mode.add_argument("--check", action="store_true",
                    help="exit 1, printing a diff, if a page is not what --write would write")
  mode.add_argument("files", nargs="*", default=[], help="print every table of these files")
  args = parser.parse_args(argv)
  if args.files:
    for path in args.files:
      print(everything(json.loads(Path(path).read_text())) + "\n")
    return 0
  stale = 0
  for page in PAGES:
    if not page.exists():
      continue
    text = page.read_text()
    new = regenerate(text)
    if new == text:
      continue
    if args.write:
      page.write_text(new)
      print(f"wrote {page.relative_to(ROOT)}")
    else:
      stale += 1
      name = str(page.relative_to(ROOT))
      sys.stdout.writelines(difflib.unified_diff(
          text.splitlines(keepends=True), new.splitlines(keepends=True),
          f"{name} (as it is)", f"{name} (from the JSON)"))
  if stale:
    print(f"\n{stale} page(s) differ from their results: python benchmarks/report.py --write",
          file=sys.stderr)
  return 1 if stale else 0


if __name__ == "__main__":
  sys.exit(main())
