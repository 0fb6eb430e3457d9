#!/usr/bin/env bash
# The built artefacts, as a user gets them: build the sdist and, from it, the wheel; check
# what they hold (every module of jaxdrop/ and the LICENSE in the wheel, the example and the
# changelog in the sdist); install the wheel (not editable, with its dependencies) in a fresh
# virtual environment and run .ci/smoke.py from outside the source tree; then
# `train.py --help` from the unpacked sdist, with the [train] extra installed.
# Uses the active Python (installs `build` into it); needs network access only for pip (or a
# warm cache). About a minute on 2 cores with a warm cache.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
start=$SECONDS
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python -m pip install --quiet build
# No --sdist/--wheel: build makes the sdist, then the wheel from the unpacked sdist, so a
# file that the sdist lacks is missing from the wheel too and fails the check below.
if ! python -m build --outdir "$work/dist" . > "$work/build.log" 2>&1; then
  cat "$work/build.log"
  exit 1
fi
wheel=$(ls "$work"/dist/*.whl)
sdist=$(ls "$work"/dist/*.tar.gz)
echo "built $(basename "$wheel") and $(basename "$sdist")"

# The wheel holds every module of the package, nothing else beside its metadata, and the
# license text, declared as PEP 639 says.
python - "$wheel" <<'PY'
import email.parser, pathlib, sys, zipfile
wheel = zipfile.ZipFile(sys.argv[1])
names = wheel.namelist()
print("wheel contents:\n  " + "\n  ".join(names))
modules = {p.as_posix() for p in pathlib.Path("jaxdrop").rglob("*.py")}
missing = sorted(modules - set(names))
assert not missing, f"modules missing from the wheel: {missing}"
assert "jaxdrop/py.typed" in names, "no py.typed in the wheel"
dist_info = {n.split("/")[0] for n in names if ".dist-info/" in n}
assert len(dist_info) == 1, dist_info
(dist_info,) = dist_info
stray = sorted(n for n in names if not n.startswith(("jaxdrop/", dist_info + "/")))
assert not stray, f"files outside the package in the wheel: {stray}"
assert f"{dist_info}/licenses/LICENSE" in names, "no LICENSE in the wheel"
assert wheel.read(f"{dist_info}/licenses/LICENSE") == pathlib.Path("LICENSE").read_bytes()
meta = email.parser.Parser().parsestr(wheel.read(f"{dist_info}/METADATA").decode())
assert meta["License-Expression"] == "Apache-2.0", meta["License-Expression"]
assert meta.get_all("License-File") == ["LICENSE"], meta.get_all("License-File")
PY
listing=$(tar -tzf "$sdist")
for needed in LICENSE CHANGELOG.md README.md train.py train_lib/data.py jaxdrop/__init__.py; do
  grep -qx "jaxdrop-[^/]*/$needed" <<< "$listing" || { echo "no $needed in the sdist" >&2; exit 1; }
done

python -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --upgrade pip
"$work/venv/bin/python" -m pip install --quiet "$wheel"
(cd "$work" && "$work/venv/bin/python" "$root/.ci/smoke.py")

# train.py and train_lib/ ship in the sdist only; --help imports them and their [train]
# dependencies (installed from the wheel's metadata: the sdist would only rebuild the same
# wheel). Run from the sdist, the script imports the sdist's own jaxdrop/.
tar -xzf "$sdist" -C "$work"
src=$(ls -d "$work"/jaxdrop-*/)
"$work/venv/bin/python" -m pip install --quiet "$wheel[train]"
(cd "$src" && "$work/venv/bin/python" train.py --help > /dev/null)
echo "smoke: train.py --help runs from the sdist"
echo "smoke: wheel and sdist checked in $((SECONDS - start)) s"
