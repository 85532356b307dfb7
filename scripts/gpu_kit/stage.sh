#!/usr/bin/env bash
# Stage the GPU proof kit on a CPU machine with PyPI access (no GPU needed), then check it.
#
#   bash scripts/gpu_kit/stage.sh            # -> .gpu_kit/wheels/*.whl + manifest.json, checkout.json, check.json
#
# Downloads cp312 manylinux x86_64 wheels (--no-deps) of everything in requirements.txt (LMDeploy
# 0.18.0 and what its PyTorch engine path imports that the GPU image lacks), rewrites LMDeploy's wheel
# without TurboMind's binaries, builds this package's wheel, and runs check.py (size <= 60 MiB,
# installable on CPython 3.12, every import of the engine path resolved). Exit status: check.py's.
# The GPU machine then runs `bash scripts/gpu_kit/run.sh` with carry=[".gpu_kit"] (README, "GPU proof kit").
set -euo pipefail
cd "$(dirname "$0")/../.."
KIT=${GPU_KIT_DIR:-.gpu_kit}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || { echo "stage.sh: $PY not found (run scripts/setup.sh first, or set PYTHON)" >&2; exit 2; }
# Downloads live outside the kit: the kit folder travels to the GPU machine (64 MiB limit) and
# LMDeploy's original wheel alone is about 100 MiB.
DL=${GPU_KIT_DOWNLOAD:-${XDG_CACHE_HOME:-$HOME/.cache}/lmdeploy-hostcache-gpu-kit}
mkdir -p "$DL" "$KIT"
echo "[gpu_kit] downloading cp312 manylinux wheels into $DL" >&2
# Wheels of earlier runs that requirements.txt no longer names would be staged too: start clean.
rm -f "$DL"/*.whl
PLATS=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATS="$PLATS --platform $p"
done
timeout 900 "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp $PLATS -d "$DL" -r scripts/gpu_kit/requirements.txt
echo "[gpu_kit] stripping LMDeploy's TurboMind binaries, building lmdeploy-hostcache's wheel" >&2
# checkout.json: git describe --always --dirty, sha256 of `git diff HEAD` and of the untracked package
# files, sha256 of lmdeploy_hostcache/**/*.py (the driver hashes what it imports and reports both)
"$PY" scripts/gpu_kit/stage.py --download "$DL" --dest "$KIT/wheels" --checkout-json "$KIT/checkout.json"
echo "[gpu_kit] checking the staged set" >&2
"$PY" scripts/gpu_kit/check.py --kit "$KIT"
