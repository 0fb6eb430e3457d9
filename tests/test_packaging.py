"""The dependency range pyproject.toml declares is the range CI tests.

`.ci/run` tests the lowest end with `.ci/constraints-lowest.txt`, which pins each
bounded dependency to its lower bound: the two files must say the same thing.
"""

from __future__ import annotations

import pathlib
import re
import tomllib

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _lower_bounds() -> dict[str, Version]:
  """Every ``>=`` bound of the library, train and test requirements, by package."""
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  extras = project["optional-dependencies"]
  bounds = {}
  for line in [*project["dependencies"], *extras["train"], *extras["test"]]:
    requirement = Requirement(line)
    if requirement.name == "jaxdrop":  # test = ["jaxdrop[train]", ...]
      continue
    lower = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
    assert len(lower) == 1, f"{line!r}: give one lower bound (>=), the version CI tests"
    bounds[requirement.name] = lower[0]
  return bounds


def _pins() -> dict[str, Version]:
  pins = {}
  for line in (ROOT / ".ci" / "constraints-lowest.txt").read_text().splitlines():
    line = line.split("#")[0].strip()
    if line:
      name, version = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", line).groups()
      pins[name.lower()] = Version(version)
  return pins


def test_lowest_constraints_pin_every_lower_bound():
  bounds, pins = _lower_bounds(), _pins()
  assert {"jax", "flax", "optax", "chex"} <= set(bounds)
  assert {name: pins.get(name) for name in bounds} == bounds
  # jaxlib is jax's: the oldest jax runs with the jaxlib of its release.
  assert pins["jaxlib"] == pins["jax"]
  assert set(pins) == set(bounds) | {"jaxlib"}, "a pin without a bound in pyproject.toml"


def test_ci_tests_both_ends_of_the_range():
  ci = (ROOT / ".ci" / "run").read_text()
  assert "--constraint .ci/constraints-lowest.txt" in ci
  assert re.search(r"test_env lowest python3\.11\b", ci)
  assert re.search(r"test_env newest ", ci)
