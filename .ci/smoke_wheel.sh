#!/usr/bin/env bash
# The built artefacts, as a user gets them: build the wheel and the sdist, check what the
# wheel holds (every module of jaxdrop/, the LICENSE), install the wheel (not editable) in a
# fresh virtual environment and run .ci/smoke.py from outside the source tree; then
# `train.py --help` from the unpacked sdist, with the sdist's [train] extra installed.
# Uses the active Python; needs network access only for pip (or a warm cache).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python -m pip install --quiet build
python -m build --outdir "$work/dist" . > "$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
wheel=$(ls "$work"/dist/*.whl)
sdist=$(ls "$work"/dist/*.tar.gz)
echo "built $(basename "$wheel") and $(basename "$sdist")"

# The wheel holds every module of the package and the license text.
python - "$wheel" <<'PY'
import pathlib, sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
print("wheel contents:\n  " + "\n  ".join(names))
modules = {p.as_posix() for p in pathlib.Path("jaxdrop").rglob("*.py")}
missing = sorted(modules - set(names))
assert not missing, f"modules missing from the wheel: {missing}"
assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "no LICENSE in the wheel"
PY
listing=$(tar -tzf "$sdist")
for needed in LICENSE CHANGELOG.md train.py train_lib/data.py; do
  grep -qx "jaxdrop-[^/]*/$needed" <<< "$listing" || { echo "no $needed in the sdist" >&2; exit 1; }
done

python -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --upgrade pip
"$work/venv/bin/python" -m pip install --quiet "$wheel"
(cd "$work" && "$work/venv/bin/python" "$root/.ci/smoke.py")

tar -xzf "$sdist" -C "$work"
src=$(ls -d "$work"/jaxdrop-*/)
"$work/venv/bin/python" -m pip install --quiet "$src[train]"
(cd "$src" && "$work/venv/bin/python" train.py --help > /dev/null)
echo "smoke: train.py --help runs from the sdist"
