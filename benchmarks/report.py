"""Markdown tables from ``bench.py --json`` results, for BENCHMARKS.md.

Usage: python benchmarks/report.py cpu.json [gpu.json ...]
"""

from __future__ import annotations

import json
import sys


def _elementwise(results: dict) -> list[str]:
  records = results["elementwise"]
  lines = []
  configs = dict.fromkeys((r["log2_size"], r["dtype"], r["rate"]) for r in records)
  for log2, dtype, rate in configs:
    rows = [r for r in records
            if (r["log2_size"], r["dtype"], r["rate"]) == (log2, dtype, rate)]
    by = {(r["variant"], r["mode"]): r for r in rows}
    lines += [
        f"\n**n = 2^{log2}, {dtype}, rate {rate}**\n",
        "| variant | fwd ms | × floor | vs flax | fwd+bwd ms | × floor | vs flax |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in dict.fromkeys(r["variant"] for r in rows):
      f, b = by[name, "fwd"], by[name, "fwd+bwd"]
      lines.append(
          f"| {name} | {f['ms']:.4g} | {f['x_floor']:.2f} | {f['speedup_vs_flax']:.1f}× "
          f"| {b['ms']:.4g} | {b['x_floor']:.2f} | {b['speedup_vs_flax']:.1f}× |"
      )
  return lines


def _train(results: dict) -> list[str]:
  memory, timing = results["train_step"]["memory"], results["train_step"]["time"]
  lines = [
      "| variant | temp bytes | vs no dropout | step ms | × no dropout |",
      "|---|---:|---:|---:|---:|",
  ]
  for name, m in memory.items():
    t = timing[name]
    lines.append(
        f"| {name} | {m['temp_bytes']:,} | {m['temp_bytes_over_no_dropout']:+,} "
        f"| {t['ms']:.4g} | {t['x_no_dropout']:.3f} |"
    )
  return lines


def _targets(results: dict) -> list[str]:
  lines = ["| target | value | |", "|---|---:|---|"]
  for t in results["targets"]:
    lines.append(f"| {t['target']} | {t['value']:.3g} | {'met' if t['met'] else '**not met**'} |")
  return lines


def report(results: dict) -> str:
  meta = results["meta"]
  versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v)
  lines = [
      f"Device: {meta['device']} ({meta['backend']}), host {meta['cpu']} "
      f"({meta['cpu_count']} cores); {versions}; jaxdrop {meta['jaxdrop_commit']}; "
      f"{meta['date']}; {meta['seconds']} s.",
      f"Command: `{meta['command']}`",
  ]
  if meta["skipped"]:
    lines.append(f"Skipped (not installed): {', '.join(meta['skipped'])}.")
  if "targets" in results:  # Absent when a run was cut short.
    lines += ["", "Targets:", ""] + _targets(results)
  if "train_step" in results:
    lines += ["", "MLP train step:", ""] + _train(results)
  lines += ["", "Elementwise:"] + _elementwise(results)
  return "\n".join(lines)


def main() -> None:
  for path in sys.argv[1:]:
    with open(path) as f:
      print(report(json.load(f)) + "\n")


if __name__ == "__main__":
  main()
