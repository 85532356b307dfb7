#!/usr/bin/env bash
# Idempotent set-up of a development/CI environment in .venv/ at the repository root.
#
# CPU machines (CI, laptops): torch 2.13.0 CPU wheel (pip's find-links/index settings
# supply it from local disk where the machine has it), lmdeploy 0.18.0 without its CUDA
# dependencies plus the light packages its scheduler/engine imports need, triton 3.6.0
# (kernels run under TRITON_INTERPRET=1), this package in editable mode and the test
# tools. GPU users do not need this script: see README "Install".
#
# Re-running is cheap: a stamp in .venv/ records a hash of this script and setup.py,
# and the installs run again only when either changed or the last run did not finish.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
  echo "[setup] needs Python >= 3.10 (found $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
}
STAMP=.venv/.hostcache-setup
WANT=$(cat setup.py scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && .venv/bin/lmdeploy-hostcache --version >/dev/null 2>&1; then
  echo "[setup] .venv is up to date" >&2
  exit 0
fi
if ! .venv/bin/python -c '' 2>/dev/null; then
  rm -rf .venv
  "$PY" -m venv .venv
fi
rm -f "$STAMP"
PIP=".venv/bin/python -m pip -q --disable-pip-version-check"
echo "[setup] torch 2.13.0 (CPU wheel)" >&2
$PIP install "torch==2.13.0"
echo "[setup] lmdeploy 0.18.0 (--no-deps) and the light dependencies its imports need" >&2
$PIP install --no-deps "lmdeploy==0.18.0"
$PIP install numpy tqdm pydantic transformers mmengine-lite psutil requests pybase64 pillow pyzmq shortuuid
$PIP install --no-deps xgrammar apache-tvm-ffi
echo "[setup] what LMDeploy's servers (api_server, proxy) import, and the openai client the tests drive them with" >&2
$PIP install fastapi uvicorn openai aiohttp einops fire partial_json_parser openai_harmony sentencepiece \
  tiktoken cloudpickle safetensors tokenizers
echo "[setup] Mooncake Store client and master (the shared L3 tier; tests run it on 127.0.0.1)" >&2
$PIP install mooncake-transfer-engine-non-cuda
# mooncake's native module links libibverbs and libnl even for TCP: Debian packages; and `patch`, which the
# guard's tests apply the upstream diffs in patches/ with.
missing_debs=""
for deb in libibverbs1 libnl-3-200 libnl-route-3-200 patch; do
  dpkg -s "$deb" >/dev/null 2>&1 || missing_debs="$missing_debs $deb"
done
if [ -n "$missing_debs" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] apt-get install$missing_debs" >&2
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing_debs >/dev/null
  else
    echo "[setup] warning: Debian packages$missing_debs are missing (the Mooncake Store tests, or the guard's patch tests, will skip); install them as root" >&2
  fi
fi
echo "[setup] triton, lmdeploy-hostcache (editable) and test tools" >&2
$PIP install "triton==3.6.0" xxhash PyYAML matplotlib prometheus_client pytest pytest-xdist hypothesis
$PIP install --no-deps -e .
.venv/bin/lmdeploy-hostcache --version >/dev/null
echo "$WANT" > "$STAMP"
echo "[setup] done: .venv ready" >&2
