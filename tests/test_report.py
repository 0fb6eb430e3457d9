"""report.py: the pages' tables are what the committed JSON generates, and the tables are right.

The first test is the one that keeps BENCHMARKS.md honest: every table
between ``report`` markers must equal what ``report.py --write`` makes of
the results files, so a number can change only with its JSON. The others
render small synthetic results and check the tables' structure and ratios.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


@pytest.fixture(scope="module")
def report(import_benchmark):
  return import_benchmark("report")


META = dict(date="2026-12-01T10:00:00+00:00", command="python benchmarks/bench.py --quick",
            backend="cpu", device="cpu", cpu="Test CPU", cpu_count=2, load_average=[1.5, 1, 1],
            versions=dict(jax="0.0.1", flax="0.0.2"), commit="abc1234")


def _cells(line: str) -> list[str]:
  return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _table(lines: list[str]) -> list[list[str]]:
  """The rows of the one markdown table in ``lines``, header first, the rule dropped."""
  rows = [_cells(line) for line in lines if line.startswith("|")]
  assert set(rows[1]) <= {"---", "---:"}, rows[1]
  return [rows[0], *rows[2:]]


def test_pages_are_what_the_committed_json_generates():
  done = subprocess.run([sys.executable, str(BENCHMARKS / "report.py"), "--check"],
                        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)
  assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]


def test_every_benchmark_script_the_pages_cite_exists():
  pages = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
  cited = set()
  for page in pages:
    cited |= set(re.findall(r"benchmarks/[\w/.-]+\.(?:py|sh)", page.read_text()))
  assert "benchmarks/run_gpu.sh" in cited and "benchmarks/tune_attention.py" in cited
  missing = sorted(path for path in cited if not (ROOT / path).exists())
  assert not missing, missing


def test_every_marker_names_a_known_table(report):
  names = []
  for page in report.PAGES:
    names += [m.group(2) for m in report.BLOCK.finditer(page.read_text())]
  assert names and set(names) <= set(report.TABLES)
  assert len(names) == len(set(names)), "a table appears twice"


def _elementwise_records() -> list[dict]:
  times = {"x * 2.0 (floor)": 1.0, "jaxdrop.dropout": 2.0, "flax.linen.Dropout": 8.0}
  records = []
  for log2_size, scale in ((10, 1.0), (12, 4.0)):
    for rate in (0.5, 0.1):
      for mode in ("fwd", "fwd+bwd"):
        for variant, ms in times.items():
          records.append(dict(log2_size=log2_size, dtype="float32", rate=rate, mode=mode,
                              variant=variant, ms=ms * scale * (1.5 if mode == "fwd+bwd" else 1)))
  return records


def test_elementwise_table_has_a_row_per_variant_and_ratios_from_ms(report):
  lines = report.elementwise(dict(meta=META, elementwise=_elementwise_records()))
  text = "\n".join(lines)
  for fact in ("Test CPU", "2 cores", "jax 0.0.1", "flax 0.0.2", "commit abc1234", "2026-12-01",
               "`python benchmarks/bench.py --quick`", "2^12 elements, rate 0.1"):
    assert fact in text
  header, *rows = _table(lines)
  assert header == ["variant", "float32 fwd ms (× floor, vs flax)",
                    "float32 fwd+bwd ms (× floor, vs flax)"]
  assert [row[0] for row in rows] == ["x * 2.0 (floor)", "jaxdrop.dropout", "flax.linen.Dropout"]
  # The largest size (ms x 4) at rate 0.1; × floor = ms / floor ms; vs flax = flax ms / ms.
  assert rows[1][1] == "8.000 (2.00, 4.00×)"
  assert rows[1][2] == "12.00 (2.00, 4.00×)"
  assert rows[2][1] == "32.00 (8.00, 1.00×)"


def test_elementwise_picks_a_size_and_rate_and_leaves_variants_out(report):
  results = dict(meta=META, elementwise=_elementwise_records())
  lines = report.elementwise(results, log2_size=10, rate=0.5, leave_out=("flax.linen.Dropout",))
  assert "2^10 elements, rate 0.5" in lines[0]
  _, *rows = _table(lines)
  assert [row[0] for row in rows] == ["x * 2.0 (floor)", "jaxdrop.dropout"]
  assert rows[1][1] == "2.000 (2.00, 4.00×)"  # flax still sets the ratio


def test_steps_table_compares_each_step_with_no_dropout(report):
  step = dict(
      title="MLP step",
      memory={"no dropout": dict(temp_bytes=1_000_000), "a": dict(temp_bytes=1_000_188),
              "b": dict(temp_bytes=4_200_000), "c": dict(temp_bytes=900_000)},
      time={"no dropout": dict(ms=10.0), "a": dict(ms=12.0), "b": dict(ms=15.0),
            "c": dict(ms=9.0)},
  )
  header, *rows = _table(report.steps(dict(meta=META, train_step=step)))
  assert header == ["variant", "temp memory", "vs no dropout", "step ms", "× no dropout"]
  assert rows == [
      ["no dropout", "1.0 MB", "+0 B", "10.00", "1.000"],
      ["a", "1.0 MB", "+188 B", "12.00", "1.200"],
      ["b", "4.2 MB", "+3.2 MB", "15.00", "1.500"],
      ["c", "900.0 KB", "−100.0 KB", "9.000", "0.900"],
  ]


def test_attention_table_compares_with_flax_per_head_dropout(report):
  rows = [
      dict(variant="flax, no dropout", forward_ms=2.0, forward_backward_ms=6.0,
           temp_bytes=3_000_000_000),
      dict(variant="flax, per-head dropout 0.1", forward_ms=4.0, forward_backward_ms=8.0,
           temp_bytes=4_000_000_000),
      dict(variant='jaxdrop "xla", dropout 0.1', forward_ms=1.0, forward_backward_ms=4.0,
           temp_bytes=2_000_000),
  ]
  results = dict(meta=META, attention=rows,
                 config=dict(batch=1, heads=8, length=2048, head_dim=64, dtype="float32"))
  lines = report.attention(results)
  assert "B 1, N 8, T = S = 2048, H 64, float32; ref: flax, per-head dropout 0.1" in lines[0]
  header, *body = _table(lines)
  assert header[:3] == ["variant", "fwd ms", "fwd+bwd ms"]
  assert [row[0] for row in body] == [r["variant"] for r in rows]
  assert body[2][1:] == ["1.000", "4.000", "0.50", "2.0 MB", "1/2000"]
  assert body[0][-1] == "1/1.33"


def test_flax_models_table_compares_each_variant_with_flax_at_its_model_length_and_rate(report):
  def row(variant, length, train_ms, eval_ms, temp, compile_s):
    return dict(model="language model", length=length, rate=0.1, variant=variant,
                train_ms=train_ms, eval_ms=eval_ms, train_temp_bytes=temp,
                eval_temp_bytes=temp // 2, train_compile_s=compile_s, eval_compile_s=0.5)

  rows = [row("flax", 1024, 100.0, 40.0, 8_000_000, 2.0),
          row("jaxdrop drop-in", 1024, 50.0, 60.0, 2_000_000, 3.0),
          row("flax", 2048, 400.0, 160.0, 32_000_000, 4.0),
          row("jaxdrop drop-in", 2048, 100.0, 80.0, 4_000_000, 4.0)]
  results = dict(meta=META, flax_models=rows, config=dict(batch=2, width=256, heads=4, depth=2))
  lines = report.flax_models(results)
  assert "batch 2, width 256, 4 heads, depth 2" in lines[0]
  header, *body = _table(lines)
  assert header[:4] == ["model", "T", "attention dropout", "attention_fn"]
  assert [r[1:4] for r in body] == [["1024", "0.1", "flax"], ["1024", "0.1", "jaxdrop drop-in"],
                                    ["2048", "0.1", "flax"], ["2048", "0.1", "jaxdrop drop-in"]]
  # Each jaxdrop row against the flax row of its own length.
  assert body[1][4:] == ["50.00", "0.50", "2.0 MB", "1/4", "60.00", "1.50", "1.0 MB", "1/4",
                         "3.00", "1.50"]
  assert body[3][5] == "0.25" and body[3][9] == "0.50" and body[3][13] == "1.00"


def test_transcribed_sections_carry_their_own_meta(report):
  results = dict(
      meta=dict(META, backend="gpu", device="Some GPU", source="transcribed from a page"),
      elementwise=dict(meta=dict(command="bash run.sh", commit="def5678"),
                       rows=_elementwise_records()),
  )
  caption = report.elementwise(results)[0:2]
  assert "Some GPU" in caption[0] and "commit def5678" in caption[0]
  assert "transcribed from a page" in caption[0]
  assert caption[1] == "Command: `bash run.sh`."


def test_a_run_by_a_replaced_script_names_the_command_that_reruns_it(report):
  results = dict(meta=dict(META, backend="gpu", device="Some GPU"),
                 elementwise=dict(meta=dict(command="bash old.sh", rerun="python new.py --gpu"),
                                  rows=_elementwise_records()))
  lines = report.elementwise(results)
  assert lines[1].startswith("Rerun with `python new.py --gpu` (")
  assert "old.sh" not in "\n".join(lines)


def test_tiles_table_has_a_row_per_kernel_and_candidate(report):
  rows = [dict(case="T = S = 64, H 24", kernel=kernel, tiles=tiles, rate=0.1, ms=ms,
               max_abs_difference=difference)
          for kernel, tiles, ms, difference in (("forward", "fwd 16x16", 1.5, 0.0),
                                                ("forward", "fwd 32x16", 2.25, 0.0078125))]
  results = dict(meta=META, tiles=dict(config=dict(batch=1, heads=2, dtype="bfloat16"),
                                       rows=rows))
  lines = report.tiles(results)
  assert "B 1, N 2, bfloat16" in lines[0]
  header, *body = _table(lines)
  assert header[:3] == ["case", "kernel", "tiles"]
  assert body == [["T = S = 64, H 24", "forward", "fwd 16x16", "0.1", "1.500", "0"],
                  ["T = S = 64, H 24", "forward", "fwd 32x16", "0.1", "2.250", "0.00781"]]


def test_regenerate_replaces_only_the_marked_blocks(report, tmp_path):
  page = ("intro\n<!-- report: cpu-train-step -->\nold table\n<!-- /report -->\n"
          "middle\n<!-- report: cpu-attention -->\n<!-- /report -->\nend\n")
  new = report.regenerate(page, tmp_path)  # no results files: how to make them
  assert new.startswith("intro\n<!-- report: cpu-train-step -->\n_No results yet: ")
  assert "old table" not in new
  assert "middle\n<!-- report: cpu-attention -->\n_No results yet: " in new
  assert new.endswith("<!-- /report -->\nend\n")
  assert report.regenerate(new, tmp_path) == new
  with pytest.raises(KeyError, match="unknown table"):
    report.regenerate("<!-- report: no-such-table -->\n<!-- /report -->\n", tmp_path)


def test_check_fails_with_a_diff_on_a_stale_page(report, tmp_path, monkeypatch, capsys):
  page = tmp_path / "page.md"
  page.write_text("<!-- report: h100-attention -->\n| an old table |\n<!-- /report -->\n")
  monkeypatch.setattr(report, "PAGES", (page,))
  monkeypatch.setattr(report, "ROOT", tmp_path)
  assert report.main(["--check"]) == 1
  out = capsys.readouterr().out
  assert "-| an old table |" in out and '+| jaxdrop "pallas" | 0.1 |' in out
  assert report.main(["--write"]) == 0
  assert report.main(["--check"]) == 0


def test_a_run_cut_short_is_named(report, tmp_path):
  (tmp_path / "bench-cpu.json").write_text('{"meta": {}, "elementwise": []}')
  with pytest.raises(KeyError, match="bench-cpu.json has no 'train_step'"):
    report.render("cpu-train-step", tmp_path)


def test_harness_check_table_pairs_each_row_in_turns_with_alone(report):
  rows = [dict(log2_size=10, dtype="float32", rate=0.1, mode=mode, variant=variant,
               harness_ms=ms, alone_ms=ms * 1.25, ratio=0.8)
          for mode in ("fwd", "fwd+bwd") for variant, ms in (("floor", 1.0), ("ours", 2.0))]
  attention = [dict(variant="xla", mode="fwd", harness_ms=3.0, alone_ms=2.0, ratio=1.5)]
  lines = report.harness_check(dict(meta=META, elementwise=rows, attention=attention,
                                    attention_config=dict(batch=1, heads=2, length=8,
                                                          head_dim=4, dtype="float32")))
  assert "2^10 float32" in lines[0]
  header, *body = _table(lines[:7])  # The caption (3 lines), then the elementwise table.
  assert header == ["variant", "rate 0.1 fwd: in turns / alone ms (ratio)",
                    "rate 0.1 fwd+bwd: in turns / alone ms (ratio)"]
  assert body == [["floor", "1.000 / 1.250 (0.80)", "1.000 / 1.250 (0.80)"],
                  ["ours", "2.000 / 2.500 (0.80)", "2.000 / 2.500 (0.80)"]]
  assert "| xla | fwd | 3.000 | 2.000 | 1.50 |" in lines
