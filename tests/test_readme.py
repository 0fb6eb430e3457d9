"""The Python examples of README.md and docs/*.md run as written."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [
    (page.relative_to(ROOT).as_posix(), index, code)
    for page in PAGES
    for index, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S))
]


@pytest.mark.parametrize(
    "page, index, code", BLOCKS, ids=[f"{page}[{index}]" for page, index, _ in BLOCKS]
)
def test_example_runs(page, index, code):
  exec(compile(code, f"{page}[python block {index}]", "exec"), {})


@pytest.mark.parametrize("page", ["README.md", "docs/semantics.md", "docs/variants.md",
                                  "docs/mc.md", "docs/schedules.md"])
def test_page_has_examples(page):
  assert any(p == page for p, _, _ in BLOCKS), f"{page} has no python block"


def test_links_to_local_files_resolve():
  for page in PAGES:
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
      assert (page.parent / target).exists(), f"{page.name} links to missing {target}"
