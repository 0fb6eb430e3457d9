"""The results table (table.txt, printed at the end), the plots (accuracy.png,
sweep.png), and the files of a finished comparison."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from train_lib import workdir
from train_lib.workdir import rate_label


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def format_table(config, runs: list[dict[str, Any]], keep_sigmas: float) -> str:
  """Metrics as rows, rates as columns; mean ± sd when there are seeds."""
  rates = config.rates
  by_rate = {r: [run for run in runs if run["rate"] == r] for r in rates}
  seeds = len(config.seed_list)

  def cell(rate, get, percent=True):
    values = [get(run) for run in by_rate[rate]]
    if any(v is None for v in values):
      return "-"
    scale, digits = (100.0, 2) if percent else (1.0, 4)
    mean, sd = mean_sd([scale * v for v in values])
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if seeds > 1 else "")

  mc = lambda key: lambda run: run["mc"] and run["mc"][key]  # noqa: E731
  rows = [
      ("train accuracy (%)", lambda run: run["train_acc"], True),
      ("test accuracy (%)", lambda run: run["test_acc"], True),
      ("generalization gap (points)", lambda run: run["train_acc"] - run["test_acc"], True),
      ("test NLL", lambda run: run["test_nll"], False),
      ("test ECE (%)", lambda run: run["test_ece"], True),
  ]
  if config.mc_samples:
    k = config.mc_samples
    rows += [
        (f"MC dropout K={k}: test accuracy (%)", mc("test_acc"), True),
        (f"MC dropout K={k}: test NLL", mc("test_nll"), False),
        (f"MC dropout K={k}: test ECE (%)", mc("test_ece"), True),
    ]
  for name in sorted(runs[0]["keep_fraction"]):
    rows.append((f"keep fraction '{name}'", lambda run, n=name: run["keep_fraction"][n], False))
  header = ["", *("no dropout" if r == 0 else f"dropout {rate_label(r)}" for r in rates)]
  body = [[label, *(cell(r, get, pct) for r in rates)] for label, get, pct in rows]
  widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
  line = lambda row: "  ".join(  # noqa: E731
      c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
  )
  seed_text = f"seeds 0-{seeds - 1}, mean ± sd" if seeds > 1 else f"seed {config.seed_list[0]}"
  schedule = "" if config.rate_schedule == "constant" else f", {config.rate_schedule} dropout"
  lr = f"lr {config.lr:g} {config.lr_schedule}"
  title = (
      f"MNIST-1D ({config.train_size} train / {config.test_size} test), "
      f"{config.model} width {config.width}, {config.steps} steps, {lr}{schedule}, {seed_text}"
  )
  lines = [title, line(header), "  ".join("-" * w for w in widths), *map(line, body)]
  sigmas = [c["sigmas"] for run in runs for c in run["keep_check"].values() if c["n"]]
  lines.append(
      f"keep fractions: every layer within {max(sigmas):.2f}σ of 1 - rate "
      f"(checked with jaxdrop.checks.assert_keep_fraction, k={keep_sigmas:g})"
      if sigmas else "keep fractions: no step had dropout on, nothing to check"
  )
  test_acc = lambda rs: 100 * mean_sd([r["test_acc"] for r in rs])[0]  # noqa: E731
  gap = lambda rs: 100 * mean_sd([r["train_acc"] - r["test_acc"] for r in rs])[0]  # noqa: E731
  base = by_rate[0.0]
  for rate in rates[1:]:
    lines.append(
        f"dropout {rate_label(rate)} vs none: test accuracy "
        f"{test_acc(by_rate[rate]) - test_acc(base):+.2f} points, "
        f"generalization gap {gap(base):.2f} -> {gap(by_rate[rate]):.2f} points"
    )
  return "\n".join(lines)


def save_plots(config, workdir: str, runs: list[dict[str, Any]], rows: list[dict]) -> None:
  """accuracy.png (train/test accuracy and test NLL against the step) and, for a
  sweep, sweep.png (accuracy against the rate)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax, ax_nll) = plt.subplots(1, 2, figsize=(9.6, 3.8))
  for i, rate in enumerate(config.rates):
    steps = sorted({r["step"] for r in rows if r["rate"] == rate})
    label = "no dropout" if rate == 0 else f"dropout {rate_label(rate)}"
    mean = lambda key: [  # noqa: E731
        np.mean([r[key] for r in rows if r["rate"] == rate and r["step"] == s]) for s in steps
    ]
    ax.plot(steps, 100 * np.array(mean("train_acc")), "--", color=f"C{i}", label=f"{label}, train")
    ax.plot(steps, 100 * np.array(mean("test_acc")), "-", color=f"C{i}", label=f"{label}, test")
    ax_nll.plot(steps, mean("test_nll"), "-", color=f"C{i}", label=label)
  seeds = len(config.seed_list)
  mean_of = f", mean of {seeds} seeds" if seeds > 1 else ""
  ax.set_title(f"MNIST-1D {config.model}: accuracy{mean_of}")
  ax.set_xlabel("step")
  ax.set_ylabel("accuracy (%)")
  ax_nll.set_title("test NLL (weight scaling)")
  ax_nll.set_xlabel("step")
  ax_nll.set_yscale("log")
  for a in (ax, ax_nll):
    a.legend(fontsize="small")
    a.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "accuracy.png"), dpi=90)
  plt.close(fig)

  if config.sweep:
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    for key, label in (("train_acc", "train"), ("test_acc", "test")):
      stats = [mean_sd([100 * r[key] for r in runs if r["rate"] == rate]) for rate in config.rates]
      means, sds = zip(*stats)
      ax.errorbar(config.rates, means, yerr=sds, marker="o", capsize=3, label=label)
    ax.set_xlabel("dropout rate")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"MNIST-1D, {config.model}, {seeds} seed(s)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "sweep.png"), dpi=100)
    plt.close(fig)


def write(config, results: dict[str, Any], table: str) -> None:
  """results.json, table.txt and the plots; metrics.jsonl in run order, as an
  uninterrupted run writes it (a resumed run appends its redone rows last)."""
  path = lambda name: os.path.join(config.workdir, name)  # noqa: E731
  order = {(run["rate"], run["seed"]): i for i, run in enumerate(results["runs"])}
  workdir.rewrite_rows(path("metrics.jsonl"), lambda row: True,
                       key=lambda row: (order[row["rate"], row["seed"]], row["step"]))
  workdir.write_atomic(path("results.json"), workdir.dumps(results, indent=1) + "\n")
  workdir.write_atomic(path("table.txt"), table + "\n")
  save_plots(config, config.workdir, results["runs"], workdir.read_rows(path("metrics.jsonl")))
