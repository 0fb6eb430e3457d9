"""Tests of the public page, jaxdrop/__init__.py: what it lists, and what it loads."""

from __future__ import annotations

import subprocess
import sys

import jaxdrop


def test_all_lists_every_public_name_and_each_resolves():
  for name in jaxdrop.__all__:
    assert getattr(jaxdrop, name) is not None
  assert set(jaxdrop.__all__) <= set(dir(jaxdrop))
  public = {name for name in dir(jaxdrop) if not name.startswith("_")}
  # Everything public is listed, except the helper modules imported here.
  assert public - set(jaxdrop.__all__) <= {"annotations", "importlib", "TYPE_CHECKING", "Any"}


def test_import_does_not_load_flax_optax_or_chex_until_used():
  code = (
      "import sys, jaxdrop\n"
      "heavy = ('flax', 'optax', 'chex')\n"
      "assert not any(m in sys.modules for m in heavy), [m for m in heavy if m in sys.modules]\n"
      "jaxdrop.nnx.Dropout\n"
      "assert 'flax' in sys.modules and 'jaxdrop.nnx' in sys.modules\n"
      "import jaxdrop.linen\n"
      "try:\n"
      "  jaxdrop.no_such_name\n"
      "except AttributeError as error:\n"
      "  assert 'no_such_name' in str(error)\n"
      "else:\n"
      "  raise SystemExit('no AttributeError')\n"
  )
  subprocess.run([sys.executable, "-W", "error", "-c", code], check=True)
