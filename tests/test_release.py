"""What a release carries: the license, one version, a changelog and a reference page for
every public name (the builds themselves run in .ci/run: smoke_wheel.sh, build_docs.sh)."""

from __future__ import annotations

import importlib
import importlib.metadata
import pathlib
import re
import tomllib

import pytest

import jaxdrop

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODULES = ("jaxdrop", "jaxdrop.linen", "jaxdrop.nnx", "jaxdrop.mc", "jaxdrop.checks",
           "jaxdrop.schedules")
SUBMODULES = {"linen", "nnx", "mc", "checks", "schedules"}


def _public(module_name):
  names = importlib.import_module(module_name).__all__
  return [n for n in names if not (module_name == "jaxdrop" and n in SUBMODULES)]


def test_license_is_the_apache_text_that_pyproject_declares():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
  text = (ROOT / "LICENSE").read_text()
  assert text.lstrip().startswith("Apache License")
  assert "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def test_version_has_one_source():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())
  assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
  attr = project["tool"]["setuptools"]["dynamic"]["version"]["attr"]
  assert attr == "jaxdrop.__version__"
  try:
    installed = importlib.metadata.version("jaxdrop")
  except importlib.metadata.PackageNotFoundError:
    pytest.skip("jaxdrop is not installed (run from a source tree)")
  assert installed == jaxdrop.__version__


def test_changelog_names_the_version_and_every_public_name():
  text = (ROOT / "CHANGELOG.md").read_text()
  section = text.split(f"## {jaxdrop.__version__} (", 1)
  assert len(section) == 2, f"no section for {jaxdrop.__version__}"
  assert "breaking change" in text  # the mask promise
  for module_name in MODULES:
    missing = [n for n in _public(module_name) if f"`{n}`" not in section[1]]
    assert not missing, (module_name, missing)


@pytest.mark.parametrize("module_name", MODULES)
def test_every_public_name_has_a_reference_entry(module_name):
  page = ROOT / "docs" / "api" / f"{module_name.removeprefix('jaxdrop.')}.rst"
  text = page.read_text()
  assert f".. currentmodule:: {module_name}" in text
  documented = set(re.findall(r"^\.\. (?:autofunction|autoclass|data|autodata):: (\w+)", text,
                              re.M))
  assert documented == set(_public(module_name)), page
