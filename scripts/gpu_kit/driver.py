"""The GPU proof kit's driver: CUDA tests, bench transfer, end-to-end runs, output equality.

usage: python driver.py --out DIR [--budget-s 450] [--steps cuda_tests,bench_transfer,e2e,equality]
                        [--model-dir DIR] [--model-size 1b|tiny] [--sessions N] [--turns N] ...

``run.sh`` calls it on the GPU machine after the offline install. It writes, under ``--out``:

* ``result.json`` (``kitlib.ResultFile``): rewritten after every step and every engine run, so a run
  killed at any point leaves what was measured so far; ``status`` per step: pass / fail / error /
  timeout / skipped;
* ``calibration.json``: the restore-or-recompute figures measured in this run (restore bandwidth,
  prefill rate, engine step), the file ``min_restore_tokens: auto`` reads through
  ``LMDEPLOY_HOSTCACHE_CALIBRATION``;
* ``outputs.json``: every run's generated tokens per request (the equality step's evidence);
* ``kit.log``: the steps' own output (pytest, bench, engine logs), appended as they run.

Every child writes into a fresh work folder of this invocation (``$GPU_KIT_WORK``, default
``/tmp/gpu_kit_work``, then ``call-XXXX``; earlier calls' folders are removed first, the model folder
is kept), and each step deletes its output file before its child starts: a file left by an earlier
call on a warm machine is never read as this call's. A step passes only when its child exited 0
and wrote its file; the child's exit code is recorded (``rc``).

Steps, in order, each in a child process with its own timeout (a hang is killed with its process
group) and never more than what is left of ``--budget-s``:

a. ``cuda_tests``: pytest on ``CUDA_TESTS`` selected by ``-k "cuda or gpu"`` (compiled Triton
   kernels and the CUDA copy engine against their torch/LMDeploy references; the connector's worker
   role on CUDA rows), summarised from JUnit XML.
b. ``bench_transfer``: ``lmdeploy-hostcache bench transfer --json`` (copy engine H2D/D2H vs a plain
   pinned ``copy_``, kernel gather/scatter vs device memcpy).
c. ``e2e``: a random-weight ~1B Llama written locally (``model_writer.py``: shapes from transformers,
   weights drawn on the GPU, safetensors), then the runs in ``--runs`` order (default ``RUNS``), each its own
   ``e2e_worker.py`` process: the GPU cache sized so the replay's working set is ``--ratio`` (4) x
   the cache (``small_*``) or holds everything (``fits_*``); stock LMDeploy (``*_off_*``) vs host
   tier on (``*_on_*``); quant_policy 0 and 4. A run that would not fit in the time left is skipped;
   a run that is no equality reference or calibration run is also skipped when running it would
   leave no time for a reference still to come (``reference_runs``), so a tight budget drops
   candidates, not the run they are compared with.
d. ``equality``: ``compare_token_outputs`` of every tier-on run against stock LMDeploy with the
   large cache at the same quant_policy; any difference fails, naming the request and position.

The result records what code ran (``env.package``: sha256 over the imported package's ``*.py``;
``env.staged_checkout``: ``.gpu_kit/checkout.json`` from ``stage.sh``) and, per tier-on run, the
``min_restore_tokens`` the connector resolved with the calibration it read
(``runs.<name>.restore_threshold``; ``calibration_input``: ``$LMDEPLOY_HOSTCACHE_CALIBRATION``).

Status and exit: ``pass`` (0) when every step that ran passed and nothing asked for is missing;
``fail`` (1) when a step failed, errored or timed out; ``incomplete`` (3) when nothing failed but a
requested run was skipped or output equality was requested and compared nothing (``incomplete``
lists why); 2 on bad arguments; 124 when stopped by a signal.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
import kitlib  # noqa: E402
from kitlib import Budget, ResultFile, WorkloadSpec  # noqa: E402

# The CUDA-only tests, and the CUDA parametrizations of tests that also run on CPU (-k CUDA_TESTS_K).
CUDA_TESTS = ("tests/transfer/test_transfer_cuda.py", "tests/integration/test_connector_worker.py")
CUDA_TESTS_K = "cuda or gpu"
STEP_LIMITS_S = {"cuda_tests": 150, "bench_transfer": 90, "model": 90, "run": 100}
MODEL_SIZES = {
    # ~1.1B parameters (Llama): 16 layers, hidden 2048, 16 heads, 8 KV heads of 128, vocab 32000
    "1b": dict(num_layers=16, hidden_size=2048, intermediate_size=5632, num_attention_heads=16,
               num_key_value_heads=8, vocab_size=32000, max_position_embeddings=8192, dtype="bfloat16"),
    # Llama-3-8B's layer shapes (32 layers, hidden 4096, 32 heads, 8 KV heads of 128, MLP 14336) with the
    # kit's 32000-token vocabulary: ~7.0B parameters, 14 GB of bf16 weights, 128 KiB of KV per token
    "8b": dict(num_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768, dtype="bfloat16"),
    # CPU smoke test of the driver itself (with --cpu-shim)
    "tiny": dict(num_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=320, max_position_embeddings=2048, dtype="float16"),
}
# writing the 8b model's 14 GB of safetensors takes longer than the 1b's 18 s
MODEL_WRITE_LIMITS_S = {"8b": 200}
# name: (tier on, quant_policy, cache: "small" | "fits"); stock references first (equality needs them)
RUNS = (
    ("fits_off_qp0", False, 0, "fits"),
    ("small_on_qp0", True, 0, "small"),
    ("small_off_qp0", False, 0, "small"),
    ("fits_on_qp0", True, 0, "fits"),
    ("fits_off_qp4", False, 4, "fits"),
    ("small_on_qp4", True, 4, "small"),
    ("small_off_qp4", False, 4, "small"),
)
# Opt-in runs (named in --runs, never in the default list): the tier with kept restores off
# (``keep_restored_blocks: false``, exclusive tiers), for an A/B against ``small_on_qp0`` in one lease.
OPTIONAL_RUNS = (
    ("small_onx_qp0", True, 0, "small"),
)
KEEP_RESTORED_OFF = {"small_onx_qp0"}
EQUALITY_PAIRS = (("small_on_qp0", "fits_off_qp0"), ("fits_on_qp0", "fits_off_qp0"),
                  ("small_on_qp4", "fits_off_qp4"), ("small_onx_qp0", "fits_off_qp0"))
# bench transfer's block sizes: the 1b model's 4 MiB block and the 8b model's 8 MiB block are both
# measured (restore_calibration takes the row nearest the model's block; 4 and 16 MiB tie for 8 MiB)
BENCH_SIZES_KIB = (256, 1024, 4096, 8192, 16384)
EXIT_INCOMPLETE = 3


class Log:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, msg: str) -> None:
        line = f"[kit {time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


def run_child(cmd: list[str], timeout_s: float, log: Log, env=None) -> tuple[str, int | None, float]:
    """Run ``cmd`` in its own process group, output appended to the log; ('ok'|'fail'|'timeout', rc, s)."""
    if timeout_s < 1:
        return "timeout", None, 0.0
    log(f"$ {' '.join(cmd)}  (timeout {timeout_s:.0f}s)")
    t0 = time.monotonic()
    with open(log.path, "a", encoding="utf-8") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
        _CHILDREN.add(proc.pid)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.wait()
            return "timeout", None, time.monotonic() - t0
        finally:
            _CHILDREN.discard(proc.pid)
    return ("ok" if rc == 0 else "fail"), rc, time.monotonic() - t0


_CHILDREN: set[int] = set()


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _on_term(res: ResultFile, log: Log):
    """SIGTERM/SIGINT (``timeout`` in run.sh, or the device tool): kill the step's process group (it
    runs in its own session, which nothing else would stop), keep the result, exit."""

    def handler(signum, frame):
        for pid in list(_CHILDREN):
            _kill_group(pid)
        log(f"stopped by signal {signum}: partial results kept")
        res.set("stopped_by_signal", int(signum))
        res.finish("timeout")
        os._exit(124)

    return handler


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="GPU proof kit driver (see module docstring)")
    p.add_argument("--out", required=True, type=Path, help="result folder ($OUT on the GPU machine)")
    p.add_argument("--budget-s", type=float, default=450.0, help="whole run's wall-clock budget (default 450)")
    p.add_argument("--steps", default=",".join(kitlib.STEPS), help=f"comma list from {','.join(kitlib.STEPS)}")
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/gpu_kit_model"))
    p.add_argument("--model-size", choices=sorted(MODEL_SIZES), default="1b")
    p.add_argument("--runs", default=",".join(r[0] for r in RUNS),
                   help="comma list of e2e runs (default all of RUNS; OPTIONAL_RUNS only when named)")
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--system-tokens", type=int, default=256)
    p.add_argument("--first-user-tokens", type=int, default=1024)
    p.add_argument("--user-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--ratio", type=float, default=4.0, help="working set / GPU cache of the small runs (default 4)")
    p.add_argument("--concurrency", type=int, default=1,
                   help="requests in flight (default 1: batch-1 decode keeps greedy outputs comparable)")
    p.add_argument("--host-cache-gb", type=float, default=4.0)
    p.add_argument("--min-restore-tokens", default="0",
                   help="the tier-on runs' min_restore_tokens: an integer >= 0 (default 0: restore every hit) "
                        "or auto (its figures from LMDEPLOY_HOSTCACHE_CALIBRATION, inherited by the runs)")
    p.add_argument("--run-timeout-s", type=float, default=STEP_LIMITS_S["run"],
                   help=f"limit of one engine run (default {STEP_LIMITS_S['run']})")
    p.add_argument("--eager", choices=("on", "off"), default="on",
                   help="LMDeploy eager_mode (default on: no CUDA-graph capture time per engine)")
    p.add_argument("--cpu-shim", action="store_true", help="CPU smoke test of the driver (fake CUDA); no figure "
                   "it prints is a GPU figure")
    p.add_argument("--fake-engine", action="store_true", help="tests only: e2e runs use fake_engine.py (no model)")
    args = p.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    bad = [s for s in steps if s not in kitlib.STEPS]
    if bad or not steps:
        p.error(f"--steps: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(kitlib.STEPS)}")
    args.steps = steps
    names = [r[0] for r in RUNS + OPTIONAL_RUNS]
    runs = [s.strip() for s in args.runs.split(",") if s.strip()]
    bad = [r for r in runs if r not in names]
    if bad:
        p.error(f"--runs: unknown {', '.join(bad)}; choose from {', '.join(names)}")
    if len(set(runs)) != len(runs):
        p.error(f"--runs: {', '.join(sorted({r for r in runs if runs.count(r) > 1}))} named twice")
    args.runs = runs
    mrt = args.min_restore_tokens.strip()
    if mrt != "auto" and not mrt.isdigit():
        p.error(f"--min-restore-tokens must be an integer >= 0 or auto, got {args.min_restore_tokens!r}")
    args.min_restore_tokens = mrt if mrt == "auto" else int(mrt)
    for name in ("budget_s", "ratio", "host_cache_gb", "run_timeout_s"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    if args.concurrency < 1 or args.block_size < 1:
        p.error("--concurrency and --block-size must be >= 1")
    try:
        args.spec = WorkloadSpec(sessions=args.sessions, turns=args.turns, system_tokens=args.system_tokens,
                                 first_user_tokens=args.first_user_tokens, user_tokens=args.user_tokens,
                                 new_tokens=args.new_tokens, vocab=256)
    except ValueError as exc:
        p.error(str(exc))
    return args


def plan_runs(args) -> list[dict]:
    """The e2e runs' settings (GPU cache sizes from the workload, see kitlib.gpu_blocks_for)."""
    spec, bs = args.spec, args.block_size
    small = kitlib.gpu_blocks_for(spec, bs, args.ratio, args.concurrency)
    fits = kitlib.working_set_blocks(spec, bs) + small  # everything stays, with the small cache's headroom
    session_len = kitlib.final_context_tokens(spec) + 2 * bs
    out = []
    by_name = {r[0]: r for r in RUNS + OPTIONAL_RUNS}
    for name in args.runs:  # in the order given: a first-use cost falls on whichever run comes first
        _, tier, qp, cache = by_name[name]
        out.append({"name": name, "tier": tier, "quant_policy": qp, "cache": cache,
                    "num_gpu_blocks": small if cache == "small" else fits, "block_size": bs,
                    "host_cache_gb": args.host_cache_gb if tier else 0,
                    "min_restore_tokens": args.min_restore_tokens,
                    "eager_mode": args.eager == "on", "concurrency": args.concurrency, "session_len": session_len,
                    "keep_restored_blocks": name not in KEEP_RESTORED_OFF,
                    "calibrate": name == "fits_off_qp0"})
    return out


def environment(probe: bool = True) -> dict:
    """Python, torch/triton/CUDA/GPU/LMDeploy versions (probe: a child with the runs' environment),
    and what code runs: ``package`` (``kitlib.tree_sha256`` of the ``lmdeploy_hostcache`` the children
    import), ``kit_scripts`` (this folder's ``*.py``), ``staged_checkout`` (``.gpu_kit/checkout.json``
    from stage.sh, if present) and whether the package hashes agree. ``repo_commit`` is the copy's git
    HEAD, which can be stale or absent on the GPU machine: the hashes are the evidence."""
    env = {"python": sys.version.split()[0], "repo_commit": None}
    try:
        env["repo_commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                            text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    manifest = REPO / ".gpu_kit" / "wheels" / "manifest.json"
    if manifest.exists():
        env["kit_commit"] = json.loads(manifest.read_text()).get("commit")
    if probe:
        env.update(_probe())
    pkg_dir = env.get("hostcache_dir")
    if not pkg_dir:
        spec = importlib.util.find_spec("lmdeploy_hostcache")
        pkg_dir = str(Path(spec.origin).parent) if spec is not None and spec.origin else None
    env["package"] = kitlib.tree_sha256(pkg_dir) if pkg_dir else {"root": None, "files": 0, "sha256": None}
    env["kit_scripts"] = kitlib.tree_sha256(HERE, "*.py")
    staged = REPO / ".gpu_kit" / "checkout.json"
    if staged.exists():
        try:
            env["staged_checkout"] = json.loads(staged.read_text())
            env["package_matches_staged"] = (env["staged_checkout"].get("package") or {}).get("sha256") == \
                env["package"]["sha256"]
        except ValueError as exc:
            env["staged_checkout"] = {"error": f"unreadable: {exc}"}
    return env


_PROBE_CODE = (
    "import json,os,torch,triton\n"
    "d={'torch':torch.__version__,'triton':triton.__version__,'cuda':torch.version.cuda,"
    "'gpu':torch.cuda.get_device_name() if torch.cuda.is_available() else None}\n"
    "try:\n import lmdeploy; d['lmdeploy']=lmdeploy.__version__\nexcept Exception as e: d['lmdeploy']=repr(e)\n"
    "try:\n import lmdeploy_hostcache as h; d['hostcache_dir']=os.path.dirname(os.path.abspath(h.__file__))\n"
    "except Exception as e: d['hostcache_error']=repr(e)\n"
    "print(json.dumps(d))")


def _probe(code: str = _PROBE_CODE, python: str = sys.executable) -> dict:
    """The probe child's JSON; on failure ``probe_error`` with its exit code and ``probe_stderr`` (its
    last 3,000 characters: a failed ``import torch`` names itself there)."""
    try:
        proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, LMDEPLOY_HOSTCACHE_DISABLE="1"), cwd=REPO)
    except (OSError, subprocess.SubprocessError) as exc:
        return {"probe_error": repr(exc)}
    lines = proc.stdout.strip().splitlines()
    try:
        out = json.loads(lines[-1])
        if not isinstance(out, dict):
            raise ValueError(f"not a JSON object: {lines[-1][:100]}")
        return out
    except (IndexError, ValueError) as exc:
        return {"probe_error": f"probe exited {proc.returncode} without its JSON line ({exc!r})",
                "probe_stderr": proc.stderr[-3000:], "probe_stdout": proc.stdout[-500:]}


def _fresh(path: Path) -> None:
    """Remove ``path`` before a child writes it: a file from an earlier call is never this call's."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- steps -----------------------------------------------------------------------------------------

def step_cuda_tests(args, res: ResultFile, budget: Budget, log: Log, work: Path) -> None:
    xml = work / "cuda_tests.xml"
    cmd = [sys.executable, "-m", "pytest", *CUDA_TESTS, "-k", CUDA_TESTS_K, "-q", "-rA", "-p", "no:cacheprovider",
           f"--junitxml={xml}"]
    res.step("cuda_tests", "running", tests=list(CUDA_TESTS))
    _fresh(xml)
    outcome, rc, secs = run_child(cmd, budget.step_timeout(STEP_LIMITS_S["cuda_tests"], 60), log)
    try:
        summary = kitlib.parse_junit(xml) if xml.exists() else None
    except Exception as exc:  # noqa: BLE001 - a truncated XML (pytest killed while writing it)
        summary, parse_error = None, repr(exc)
    else:
        parse_error = None
    if outcome == "timeout":
        res.step("cuda_tests", "timeout", seconds=secs, rc=rc, summary=summary)
    elif summary is None:
        res.step("cuda_tests", "error", seconds=secs, rc=rc,
                 error=f"pytest (exit {rc}) wrote no readable JUnit XML (see kit.log)"
                 + (f": {parse_error}" if parse_error else ""))
    else:
        ok = rc == 0 and summary["failed"] == 0 and summary["errors"] == 0 and summary["passed"] > 0
        note = None
        if not summary["passed"]:
            note = "no test passed (all skipped: no CUDA device?)"
        elif rc != 0 and not summary["failed"] and not summary["errors"]:
            note = f"pytest exited {rc} although its XML lists no failure (see kit.log)"
        res.step("cuda_tests", "pass" if ok else "fail", seconds=secs, rc=rc, summary=summary, note=note)


def step_bench(args, res: ResultFile, budget: Budget, log: Log, work: Path) -> dict | None:
    out = work / "bench_transfer.json"
    code = ("import sys,json,argparse,contextlib\n"
            "from lmdeploy_hostcache.bench import transfer as t\n"
            "p=argparse.ArgumentParser(); t.add_arguments(p); a=p.parse_args(sys.argv[2:])\n"
            "buf=__import__('io').StringIO()\n"
            "with contextlib.redirect_stdout(buf): rc=t.run(a)\n"
            "open(sys.argv[1],'w').write(buf.getvalue()); sys.exit(rc)\n")
    cmd = [sys.executable, "-c", code, str(out), "--json", "--no-quant", "--repeats", "9",
           "--sizes-kib", ",".join(map(str, BENCH_SIZES_KIB)), "--blocks", "32", "--layers", "16", "--cuda-only"]
    res.step("bench_transfer", "running")
    _fresh(out)
    outcome, rc, secs = run_child(cmd, budget.step_timeout(STEP_LIMITS_S["bench_transfer"], 60), log)
    data = None
    if out.exists() and out.stat().st_size:
        try:
            data = json.loads(out.read_text())
        except ValueError:
            data = None
    if outcome == "timeout":
        res.step("bench_transfer", "timeout", seconds=secs, rc=rc)
        return None
    if outcome != "ok":
        res.step("bench_transfer", "fail", seconds=secs, rc=rc, result=data,
                 error=f"bench transfer exited {rc} (see kit.log)")
        return None
    if data is None:
        res.step("bench_transfer", "error", seconds=secs, rc=rc, error="bench transfer wrote no JSON (see kit.log)")
        return None
    status = "pass" if data.get("cuda") else "fail"
    res.step("bench_transfer", status, seconds=secs, rc=rc, result=data,
             note=None if data.get("cuda") else "no CUDA rows: no CUDA device in this run")
    return data if status == "pass" else None


def _write_model(args, budget: Budget, log: Log) -> bool:
    cfg = MODEL_SIZES[args.model_size]
    marker = args.model_dir / "kit_model.json"
    if marker.exists() and json.loads(marker.read_text()) == cfg:
        log(f"model already written: {args.model_dir}")
        return True
    if marker.exists():
        marker.unlink()
    outcome, rc, secs = run_child([sys.executable, str(HERE / "model_writer.py"), str(args.model_dir),
                                   json.dumps(cfg)], budget.step_timeout(MODEL_WRITE_LIMITS_S.get(args.model_size, STEP_LIMITS_S["model"]), 60),
                                   log)
    if outcome == "ok":
        marker.write_text(json.dumps(cfg))
    log(f"model write: {outcome} in {secs:.1f}s")
    return outcome == "ok"


def step_e2e(args, res: ResultFile, budget: Budget, log: Log, work: Path) -> dict:
    runs = plan_runs(args)
    spec = args.spec
    wl_path = work / "workload.json"
    wl_path.write_text(json.dumps(kitlib.make_workload(spec)))
    info = {"model_size": args.model_size, "model": MODEL_SIZES[args.model_size], "workload": spec.to_dict(),
            "working_set_blocks": kitlib.working_set_blocks(spec, args.block_size),
            "gpu_blocks_small": next((r["num_gpu_blocks"] for r in runs if r["cache"] == "small"), None),
            "gpu_blocks_fits": next((r["num_gpu_blocks"] for r in runs if r["cache"] == "fits"), None),
            "ratio": args.ratio, "runs": {r["name"]: {"status": "pending"} for r in runs}}
    if info["gpu_blocks_small"]:
        info["ratio_achieved"] = info["working_set_blocks"] / info["gpu_blocks_small"]
    res.step("e2e", "running", **info)
    if not args.fake_engine and not _write_model(args, budget, log):
        res.step("e2e", "error", error="writing the random-weight model failed (see kit.log)")
        return {}
    outputs: dict[str, dict] = {}
    durations: list[float] = []
    refs = reference_runs(runs, args.steps)
    info["reference_runs"] = sorted(refs)
    for i, r in enumerate(runs):
        need = max(max(durations) if durations else 0.0, 20.0)
        later_refs = [x["name"] for x in runs[i + 1:] if x["name"] in refs]
        reserve = 0.0 if r["name"] in refs else need * len(later_refs)
        left = budget.left()
        if left - 45 < need:
            info["runs"][r["name"]] = {"status": "skipped", "reason": f"{left:.0f}s left of the budget"}
        elif left - 45 - reserve < need:
            info["runs"][r["name"]] = {"status": "skipped", "reason": f"{left:.0f}s left of the budget, kept for "
                                       f"the reference run(s) still to come: {', '.join(later_refs)}"}
        if info["runs"][r["name"]].get("status") == "skipped":
            log(f"run {r['name']}: skipped ({info['runs'][r['name']]['reason']})")
            res.step("e2e", "running", runs=info["runs"])
            continue
        out = work / f"run_{r['name']}.json"
        cmd = [sys.executable, str(HERE / "e2e_worker.py"), "--model", str(args.model_dir), "--run", json.dumps(r),
               "--workload", str(wl_path), "--out", str(out)]
        if args.cpu_shim:
            cmd.append("--cpu-shim")
        if args.fake_engine:
            cmd.append("--fake-engine")
        _fresh(out)
        outcome, rc, secs = run_child(cmd, budget.step_timeout(args.run_timeout_s, 40), log)
        durations.append(secs)
        data = _read_run(out, outcome, rc, secs)
        outputs[r["name"]] = data.pop("outputs", None) or {}
        data["seconds"] = secs
        info["runs"][r["name"]] = data
        thr = data.get("restore_threshold") or {}
        log(f"run {r['name']}: {data.get('status')} (exit {rc}) in {secs:.1f}s "
            f"ttft p50 {(data.get('ttft') or {}).get('p50')} host {data.get('host_tier', {}).get('restored_tokens')}"
            + (f" min_restore_tokens {thr.get('configured')!r} -> {thr.get('connector')} "
               f"(calibration: {thr.get('calibration_source')})" if thr else ""))
        res.step("e2e", "running", runs=info["runs"])
        (args.out / "outputs.json").write_text(json.dumps(outputs) + "\n")
    statuses = [v.get("status") for v in info["runs"].values()]
    ok = statuses and all(s in ("ok", "skipped") for s in statuses) and "ok" in statuses
    res.step("e2e", "pass" if ok else "fail", runs=info["runs"], comparison=compare_runs(info["runs"]))
    return outputs


def reference_runs(runs: list[dict], steps) -> set[str]:
    """Runs others depend on: the reference of an equality pair whose candidate is also planned (when
    ``equality`` is a step), and the calibration run."""
    names = {r["name"] for r in runs}
    refs = {ref for cand, ref in EQUALITY_PAIRS if "equality" in steps and cand in names and ref in names}
    return refs | {r["name"] for r in runs if r.get("calibrate")}


def _read_run(out: Path, outcome: str, rc, secs: float) -> dict:
    """One worker's result: its file, unless it timed out; ``ok`` only when it also exited 0."""
    if outcome == "timeout":
        return {"status": "timeout", "seconds": secs, "rc": rc}
    try:
        data = json.loads(out.read_text()) if out.exists() else None
    except ValueError as exc:
        data = {"status": "error", "error": f"unreadable result file: {exc}"}
    if not isinstance(data, dict):
        data = {"status": "error", "error": f"no result file (worker exited {rc})"}
    if rc != 0 and data.get("status") == "ok":
        data["status"] = "error"
        data["error"] = f"worker exited {rc} although its file says ok"
    data["rc"] = rc
    return data


def compare_runs(runs: dict) -> dict:
    """TTFT p50 speedup (tier off / on) and throughput ratio, per quant_policy, where both ran."""
    out = {}
    for qp in (0, 4):
        off, on = runs.get(f"small_off_qp{qp}", {}), runs.get(f"small_on_qp{qp}", {})
        if off.get("status") == "ok" and on.get("status") == "ok" and on["ttft"]["p50"]:
            out[f"qp{qp}_small_ttft_p50_speedup"] = off["ttft"]["p50"] / on["ttft"]["p50"]
            out[f"qp{qp}_small_ttft_p99_speedup"] = off["ttft"]["p99"] / on["ttft"]["p99"]
    f_off, f_on = runs.get("fits_off_qp0", {}), runs.get("fits_on_qp0", {})
    if f_off.get("status") == "ok" and f_on.get("status") == "ok" and f_off.get("output_tokens_per_s"):
        out["qp0_fits_throughput_on_over_off"] = f_on["output_tokens_per_s"] / f_off["output_tokens_per_s"]
    return out


def step_equality(outputs: dict, res: ResultFile) -> dict:
    from lmdeploy_hostcache.testing.compare import compare_token_outputs

    compared, missing = {}, []
    for cand, ref in EQUALITY_PAIRS:
        if outputs.get(cand) and outputs.get(ref):
            c = compare_token_outputs(outputs[ref], outputs[cand])
            d = c.to_dict()
            d["reference"], d["candidate"] = ref, cand
            d["summary"] = c.summary()
            compared[f"{cand}_vs_{ref}"] = d
        else:
            missing.append(f"{cand}_vs_{ref}")
    eq = {"compared": compared, "not_compared": missing}
    if not compared:
        res.step("equality", "skipped", reason="no pair of runs to compare", **eq)
    else:
        ok = all(v["identical"] for v in compared.values())
        res.step("equality", "pass" if ok else "fail", **eq)
    return eq


def _fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def summary_table(data: dict) -> str:
    """A short text summary of a result (what the device tool's output tail shows)."""
    lines = [f"gpu: {(data.get('env') or {}).get('gpu')}  status: {data.get('status')}"]
    for why in data.get("incomplete") or ():
        lines.append(f"  incomplete: {why}")
    for name, st in data["steps"].items():
        extra = ""
        if name == "cuda_tests" and st.get("summary"):
            sm = st["summary"]
            extra = f" passed {sm['passed']} failed {sm['failed']} errors {sm['errors']} skipped {sm['skipped']}"
        lines.append(f"  {name}: {st['status']}{extra}")
    for r in ((data["steps"]["bench_transfer"].get("result") or {}).get("cuda") or []):
        lines.append(f"  bench {r['block_kib']}KiB x{r['blocks']}: H2D engine {r['engine_h2d_gbps']:.1f} / plain "
                     f"{r['plain_h2d_gbps']:.1f} GB/s, D2H engine {r['engine_d2h_gbps']:.1f} / plain "
                     f"{r['plain_d2h_gbps']:.1f}, gather/scatter vs d2d {r['kernel_gather_vs_memcpy']:.2f}/"
                     f"{r['kernel_scatter_vs_memcpy']:.2f}")
    lines.append(f"  {'run':<14} {'status':<8} {'ttft p50 ms':>11} {'ttft p99 ms':>11} {'out tok/s':>10} "
                 f"{'prefill tok/s':>13} {'restored':>9}")
    for name, r in (data["steps"]["e2e"].get("runs") or {}).items():
        t = r.get("ttft") or {}
        ms = {k: None if t.get(k) is None else t[k] * 1e3 for k in ("p50", "p99")}
        lines.append(f"  {name:<14} {r.get('status', '-'):<8} {_fmt(ms['p50'], '.2f'):>11} {_fmt(ms['p99'], '.2f'):>11} "
                     f"{_fmt(r.get('output_tokens_per_s'), '.1f'):>10} {_fmt(r.get('prefill_tokens_per_s'), '.0f'):>13} "
                     f"{_fmt((r.get('host_tier') or {}).get('restored_tokens'), 'd'):>9}")
    for name, r in (data["steps"]["e2e"].get("runs") or {}).items():
        thr = r.get("restore_threshold")
        if thr:
            lines.append(f"  {name}: min_restore_tokens {thr.get('configured')!r} -> {thr.get('connector')} "
                         f"(calibration: {thr.get('calibration_source')})")
    for name, c in (data["steps"]["equality"].get("compared") or {}).items():
        lines.append(f"  equality {name}: {c['summary']}")
    if data.get("calibration"):
        c = data["calibration"]
        lines.append(f"  calibration: restore {c['restore_gbps']:.1f} GB/s, prefill {c['prefill_tokens_per_s']:.0f} "
                     f"tok/s, step {c['restore_overhead_ms']:.2f} ms")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget_s)
    log = Log(args.out / "kit.log")
    res = ResultFile(args.out / "result.json", argv=sys.argv[1:] if argv is None else argv)
    work = fresh_work_dir(Path(os.environ.get("GPU_KIT_WORK", "/tmp/gpu_kit_work")))
    res.set("work_dir", str(work))
    res.set("calibration_input", calibration_input(args.min_restore_tokens))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_term(res, log))
    for name in kitlib.STEPS:
        if name not in args.steps:
            res.step(name, "skipped", reason="not in --steps")
    res.set("env", environment(probe=not args.fake_engine))
    log(f"env: {json.dumps(res.data['env'])}")
    bench = e2e_outputs = eq = None
    try:
        if "cuda_tests" in args.steps:
            step_cuda_tests(args, res, budget, log, work)
        if "bench_transfer" in args.steps:
            bench = step_bench(args, res, budget, log, work)
        if "e2e" in args.steps:
            e2e_outputs = step_e2e(args, res, budget, log, work)
        if "equality" in args.steps:
            eq = step_equality(e2e_outputs or {}, res)
    except Exception as exc:  # noqa: BLE001 - keep what was measured; the error goes in the result
        import traceback

        res.set("driver_error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}")
        log(f"driver error: {exc!r}")
    e2e = res.data["steps"]["e2e"]
    runs = e2e.get("runs") or {}
    cal_src = (runs.get("fits_off_qp0") or {}).get("calibration") or {}
    block_bytes = None
    if args.model_size in MODEL_SIZES:
        m = MODEL_SIZES[args.model_size]
        head_dim = m["hidden_size"] // m["num_attention_heads"]
        block_bytes = m["num_layers"] * 2 * args.block_size * m["num_key_value_heads"] * head_dim * 2
    cal = kitlib.restore_calibration(bench, cal_src.get("prefill_tokens_per_s"), cal_src.get("decode_step_ms"),
                                     block_bytes, (res.data.get("env") or {}).get("gpu"),
                                     f"random-weight llama {args.model_size}")
    if cal_src and not cal_src.get("prefill_tokens_per_s"):
        res.set("calibration_note", f"no calibration.json: a fresh {cal_src.get('prefill_prompt_tokens')}-token prompt "
                f"was not measurably slower than a {cal_src.get('prefill_short_tokens')}-token one, so no "
                "marginal prefill rate; restores of fewer tokens cannot pay on this model and GPU")
    if cal is not None and not (args.cpu_shim or args.fake_engine):
        (args.out / "calibration.json").write_text(json.dumps(cal, indent=2) + "\n")
    res.set("calibration", cal)
    res.set("targets", kitlib.evaluate_targets(bench, e2e if e2e.get("runs") else None, eq))
    if args.cpu_shim or args.fake_engine:
        res.set("note", "CPU test run (faked CUDA runtime or fake engine): no figure here is a GPU figure")
    res.finish("fail" if res.data.get("driver_error") else None,
               incomplete=kitlib.incomplete_reasons(args.steps, res.data["steps"]["e2e"], eq))
    log(f"done: {res.data['status']}; steps: "
        + ", ".join(f"{k}={v['status']}" for k, v in res.data["steps"].items())
        + "".join(f"; incomplete: {why}" for why in res.data.get("incomplete") or ()))
    print(json.dumps({"status": res.data["status"], "incomplete": res.data.get("incomplete"),
                      "targets": res.data["targets"]}, indent=1))
    print(summary_table(res.data))
    return {"pass": 0, "incomplete": EXIT_INCOMPLETE}.get(res.data["status"], 1)


def fresh_work_dir(root: Path) -> Path:
    """A new ``call-*`` folder under ``root`` for this invocation's files (earlier calls' removed)."""
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob("call-*"):
        shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix="call-", dir=root))


def calibration_input(min_restore_tokens) -> dict:
    """The calibration file the runs inherit (``$LMDEPLOY_HOSTCACHE_CALIBRATION``): path, sha256 and
    content, or that none is set (``auto`` then uses restore_cost.ASSUMED)."""
    from_env = os.environ.get("LMDEPLOY_HOSTCACHE_CALIBRATION", "").strip() or None
    out = {"min_restore_tokens": min_restore_tokens, "env": from_env}
    if from_env is None:
        out["note"] = "LMDEPLOY_HOSTCACHE_CALIBRATION not set: auto uses restore_cost.ASSUMED (not measured)"
        return out
    path = Path(from_env)
    out["exists"] = path.is_file()
    if out["exists"]:
        out["sha256"] = _file_sha256(path)
        try:
            out["content"] = json.loads(path.read_text())
        except ValueError as exc:
            out["content_error"] = str(exc)[:200]
    return out


if __name__ == "__main__":
    sys.exit(main())
