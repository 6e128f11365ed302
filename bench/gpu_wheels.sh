#!/usr/bin/env bash
# Downloads, into .whl/, the wheels bench/gpu.py needs beyond what the GPU machine's image has (its python3 is 3.12
# with torch, timm, tensorstore, fsspec, safetensors, peft, pillow, numpy; not zarr, pydantic or redis).
# Run from the repository root, here, with internet access to PyPI; bench/README.md has the command that uses them.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
# the versions this checkout's venv runs (.venv), so the GPU run uses what the tests here used
pins=$(.venv/bin/python - <<'PY'
from importlib.metadata import version
names = ["zarr", "numcodecs", "donfig", "google-crc32c", "pydantic", "pydantic-core", "pydantic-settings",
         "python-dotenv", "typing-inspection", "annotated-types", "typing-extensions", "redis"]
print(" ".join(f"{n}=={version(n)}" for n in names))
PY
)
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  $pins 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
ls .whl
