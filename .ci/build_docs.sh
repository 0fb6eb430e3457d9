#!/usr/bin/env bash
# The API reference site (Sphinx + MyST; docs/conf.py says why), warnings as errors: a
# broken reference, a missing page or a malformed docstring fails the build.
# Needs the [docs] extra: pip install -e ".[docs]". Open docs/_build/html/index.html.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf docs/_build
python -m sphinx -W --keep-going -n -q -c docs -b html . docs/_build/html
echo "built docs/_build/html/index.html"
