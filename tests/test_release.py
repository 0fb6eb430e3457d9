"""What a release carries: the license, one version, a changelog and a reference page for
every public name (the builds themselves run in .ci/run: smoke_wheel.sh, build_docs.sh)."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import pathlib
import re
import runpy
import tomllib

import pytest

import jaxdrop

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODULES = ("jaxdrop", "jaxdrop.linen", "jaxdrop.nnx", "jaxdrop.mc", "jaxdrop.checks",
           "jaxdrop.schedules")
SUBMODULES = {"linen", "nnx", "mc", "checks", "schedules"}
FIRST_RELEASE = ("0.1.0", "2026-12-07")


def _public(module_name):
  names = importlib.import_module(module_name).__all__
  return [n for n in names if not (module_name == "jaxdrop" and n in SUBMODULES)]


def _changelog_sections(text):
  """{version: (date, body)} for each ``## <version> (<date>)`` heading."""
  parts = re.split(r"^## (\S+) \(([^)]*)\)[ \t]*$", text, flags=re.M)
  return {parts[i]: (parts[i + 1], parts[i + 2]) for i in range(1, len(parts), 3)}


def test_every_module_of_the_promise_is_a_submodule():
  assert SUBMODULES <= set(jaxdrop.__all__)
  assert {m.removeprefix("jaxdrop.") for m in MODULES[1:]} == SUBMODULES


def test_license_is_the_apache_text_that_pyproject_declares():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
  text = (ROOT / "LICENSE").read_text()
  assert text.lstrip().startswith("Apache License")
  assert "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
  assert "http://www.apache.org/licenses/" in text


def test_version_has_one_source():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())
  assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
  attr = project["tool"]["setuptools"]["dynamic"]["version"]["attr"]
  assert attr == "jaxdrop.__version__"
  # A literal, so that setuptools reads it without importing jaxdrop (and jax) in the
  # isolated build environment.
  tree = ast.parse((ROOT / "jaxdrop" / "__init__.py").read_text())
  literals = [node.value.value for node in tree.body
              if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
              and any(getattr(t, "id", None) == "__version__" for t in node.targets)]
  assert literals == [jaxdrop.__version__]
  try:
    installed = importlib.metadata.version("jaxdrop")
  except importlib.metadata.PackageNotFoundError:
    pytest.skip("jaxdrop is not installed (run from a source tree)")
  assert installed == jaxdrop.__version__


def test_changelog_starts_at_the_first_release_and_states_the_promise():
  text = (ROOT / "CHANGELOG.md").read_text()
  sections = _changelog_sections(text)
  assert jaxdrop.__version__ in sections, f"no section for {jaxdrop.__version__}"
  assert list(sections)[-1] == FIRST_RELEASE[0]
  assert sections[FIRST_RELEASE[0]][0] == FIRST_RELEASE[1]
  promise = text.split("\n## ", 1)[0]
  assert "breaking change" in promise.lower()
  assert "(docs/semantics.md)" in promise and "(docs/attention.md)" in promise


@pytest.mark.parametrize("module_name", MODULES)
def test_changelog_names_every_public_name(module_name):
  """The first release's entry for the module and those of later sections (an Unreleased one
  included) name each public name."""
  text = (ROOT / "CHANGELOG.md").read_text()
  _, body = _changelog_sections(text)[FIRST_RELEASE[0]]
  pattern = rf"^- `{re.escape(module_name)}`:(.*?)(?=^- |^\S|\Z)"
  entry = re.search(pattern, body, re.M | re.S)
  assert entry, f"no '- `{module_name}`:' entry in the {FIRST_RELEASE[0]} section"
  since = text.split("\n## ", 1)[1]  # Every section, the promise left out.
  entries = re.findall(pattern, since, re.M | re.S)
  named = {name for found in entries for name in re.findall(r"`(\w+)`", found)}
  missing = sorted(set(_public(module_name)) - named)
  assert not missing, (module_name, missing)
  if module_name == "jaxdrop":
    assert SUBMODULES <= named, sorted(SUBMODULES - named)


@pytest.mark.parametrize("module_name", MODULES)
def test_every_public_name_has_a_reference_entry(module_name):
  page = ROOT / "docs" / "api" / f"{module_name.removeprefix('jaxdrop.')}.rst"
  text = page.read_text()
  assert f".. currentmodule:: {module_name}" in text
  documented = re.findall(r"^\.\. (?:autofunction|autoclass|autodata|data):: (\w+)", text, re.M)
  assert len(documented) == len(set(documented)), page
  assert set(documented) == set(_public(module_name)), page


def test_every_reference_page_is_in_the_site():
  conf = runpy.run_path(str(ROOT / "docs" / "conf.py"))
  pages = {p.stem for p in (ROOT / "docs" / "api").glob("*.rst")}
  assert sorted(conf["_API_PAGES"]) == sorted(pages)
  assert {m.removeprefix("jaxdrop.") for m in MODULES} == pages
