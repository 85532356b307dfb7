#!/usr/bin/env bash
# The GPU proof kit's one command, on a lent GPU machine (no network there):
#
#   bash scripts/gpu_kit/run.sh          # device tool: carry=[".gpu_kit"], timeout_s=600
#
# 1. installs the staged wheels (.gpu_kit/wheels, made by scripts/gpu_kit/stage.sh on a CPU machine)
#    offline into /tmp/site;
# 2. runs driver.py: (a) the CUDA tests, (b) bench transfer on CUDA, (c) the end-to-end runs with
#    LMDeploy's PyTorch engine (host tier off/on, quant_policy 0/4, 4x working set, everything fits),
#    (d) greedy output equality; writes $OUT/result.json (rewritten after every step), $OUT/kit.log,
#    $OUT/calibration.json, $OUT/outputs.json.
# Whole run bounded by KIT_BUDGET_S (default 450 s) plus the install; every step has its own timeout.
# Extra arguments go to driver.py (e.g. --steps cuda_tests,bench_transfer).
# Exit status (driver.py's): 0 pass, 1 fail, 3 incomplete (a requested run skipped, or equality asked
# for and nothing compared; result.json's "incomplete" says why), 124 stopped at KIT_TIMEOUT_S,
# 2 no staged wheels or bad arguments.
# Two runs in one device call: give each its own OUT (OUT=$OUT/a ..., OUT=$OUT/b ...); they share
# the model folder (/tmp/gpu_kit_model, written once) and nothing else: each driver call works in a
# fresh folder under /tmp/gpu_kit_work, so no file of the first run is read as the second's.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/out/gpu_kit}
mkdir -p "$OUT"
LOG="$OUT/kit.log"
PY=${PYTHON:-python3}
SITE=${GPU_KIT_SITE:-/tmp/site}
echo "[kit $(date -u +%H:%M:%S)] install: $(ls .gpu_kit/wheels/*.whl 2>/dev/null | wc -l) wheels -> $SITE" | tee -a "$LOG"
if ! ls .gpu_kit/wheels/*.whl >/dev/null 2>&1; then
  echo "run.sh: no staged wheels in .gpu_kit/wheels (stage them on a CPU machine: bash scripts/gpu_kit/stage.sh; carry .gpu_kit)" | tee -a "$LOG" >&2
  printf '{"schema": "lmdeploy-hostcache-gpu-kit/1", "status": "error", "error": "no staged wheels"}\n' > "$OUT/result.json"
  exit 2
fi
timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$SITE" .gpu_kit/wheels/*.whl >>"$LOG" 2>&1
rc=$?
if [ $rc -ne 0 ]; then
  echo "run.sh: offline install failed (rc $rc); see $LOG" | tee -a "$LOG" >&2
  printf '{"schema": "lmdeploy-hostcache-gpu-kit/1", "status": "error", "error": "offline install failed"}\n' > "$OUT/result.json"
  exit 1
fi
# The checkout first: its lmdeploy_hostcache is the code under test (the staged wheel holds the same
# package, a fallback outside a checkout). /tmp/site is no site directory, so no .pth runs from it:
# the tier-on runs install the post-import hook explicitly, as the .pth does after `pip install`.
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 LMDEPLOY_ENABLE_CHECK_ENV=0
unset TRITON_INTERPRET
timeout -k 10 "${KIT_TIMEOUT_S:-480}" "$PY" scripts/gpu_kit/driver.py --out "$OUT" --budget-s "${KIT_BUDGET_S:-450}" "$@"
rc=$?
[ $rc -eq 124 ] && echo "run.sh: driver stopped at ${KIT_TIMEOUT_S:-480}s (partial results in $OUT/result.json)" | tee -a "$LOG"
exit $rc
