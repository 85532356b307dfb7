#!/usr/bin/env bash
# Idempotent set-up of a development/CI environment in .venv/ at the repository root.
#
# CPU machines (CI, laptops): torch CPU wheel, lmdeploy 0.18.0 without its CUDA
# dependencies (plus the light packages its scheduler/engine imports need),
# triton (kernels run under TRITON_INTERPRET=1), this package in editable mode
# and the test tools.  GPU users do not need this script: see README "Install".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
STAMP=.venv/.hostcache-setup-v1
if [ -f "$STAMP" ] && [ "$STAMP" -nt setup.py ] && [ "$STAMP" -nt scripts/setup.sh ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip -q --disable-pip-version-check"
echo "[setup] torch (CPU wheel)" >&2
$PIP install "torch==2.13.0"
echo "[setup] lmdeploy 0.18.0 (--no-deps) and the light dependencies its imports need" >&2
$PIP install --no-deps "lmdeploy==0.18.0"
$PIP install numpy tqdm pydantic transformers mmengine-lite psutil requests pybase64 pillow pyzmq shortuuid
$PIP install --no-deps xgrammar apache-tvm-ffi
echo "[setup] triton, lmdeploy-hostcache (editable) and test tools" >&2
$PIP install "triton==3.6.0" xxhash PyYAML matplotlib prometheus_client pytest hypothesis
$PIP install --no-deps -e .
touch "$STAMP"
echo "[setup] done: .venv ready" >&2
