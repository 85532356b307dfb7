"""Pure helpers of the GPU proof kit's driver (no torch, no LMDeploy: tested on CPU in tests/gpu_kit).

* ``percentile`` / ``latency_summary``: p50/p99 (linear interpolation between closest ranks, as
  ``numpy.percentile``'s default), mean, max, count.
* ``ResultFile``: the kit's ``result.json``, rewritten atomically (temp file + rename) after every
  change, so a run killed at any point leaves the last complete state; ``status`` of the run and of
  each step says how far it got.
* ``parse_junit``: pytest's JUnit XML -> counts and the failing tests with their messages.
* ``make_workload`` / ``working_set_blocks`` / ``gpu_blocks_for``: the multi-turn replay and the GPU
  cache size that makes its working set ``ratio`` times the cache.
* ``restore_calibration``: restore bandwidth (bench transfer's copy-engine H2D at the block size
  nearest the model's), marginal prefill rate (``marginal_prefill``) and step time (e2e calibration) -> the JSON that
  ``lmdeploy_hostcache.restore_cost`` reads through ``LMDEPLOY_HOSTCACHE_CALIBRATION``.
* ``evaluate_targets``: the issue's targets, each ``pass``/``fail``/``not measured`` with its figure.
* ``incomplete_reasons``: why a run in which nothing failed still proved less than was asked
  (a requested engine run skipped, output equality requested but nothing compared); the run's
  status is then ``incomplete``, never ``pass``.
* ``tree_sha256`` / ``checkout_state``: what code a result tested (a hash of the package sources
  the run imported; at staging, ``git describe --dirty`` and hashes of the uncommitted changes).

Invariants: every figure in a result comes from the run that wrote it; a target is never ``pass``
without its measured figure next to it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path

SCHEMA = "lmdeploy-hostcache-gpu-kit/1"
STEPS = ("cuda_tests", "bench_transfer", "e2e", "equality")
RESERVED_BLOCKS = 2
STEP_STATUSES = ("pending", "running", "pass", "fail", "error", "timeout", "skipped")
# a whole run: ``incomplete`` when nothing failed but something asked for was not measured
RUN_STATUSES = ("running", "pass", "incomplete", "fail", "timeout", "error")


# -- statistics ------------------------------------------------------------------------------------

def percentile(values, q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``, linear between closest ranks; NaN if empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile: q must be within 0..100, got {q}")
    xs = sorted(float(v) for v in values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def latency_summary(values) -> dict:
    """count, p50, p99, mean, max of ``values`` (seconds); ``None`` figures when empty."""
    xs = [float(v) for v in values]
    if not xs:
        return {"count": 0, "p50": None, "p99": None, "mean": None, "max": None}
    return {"count": len(xs), "p50": percentile(xs, 50), "p99": percentile(xs, 99),
            "mean": sum(xs) / len(xs), "max": max(xs)}


# -- result file -----------------------------------------------------------------------------------

def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class ResultFile:
    """``result.json`` of one kit run, written atomically after every change."""

    def __init__(self, path: str | os.PathLike, argv=None):
        self.path = Path(path)
        self.data = {
            "schema": SCHEMA, "status": "running", "started": _now(), "finished": None,
            "argv": list(argv or []), "env": {},
            "steps": {name: {"status": "pending"} for name in STEPS},
            "calibration": None, "targets": {},
        }
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".result.", dir=self.path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(self.data, fh, indent=2, default=_json_default)
            fh.write("\n")
        os.replace(tmp, self.path)

    def set(self, key: str, value) -> None:
        self.data[key] = value
        self.write()

    def step(self, name: str, status: str, **fields) -> None:
        if name not in self.data["steps"]:
            raise KeyError(f"unknown step {name!r}; steps: {', '.join(self.data['steps'])}")
        if status not in STEP_STATUSES:
            raise ValueError(f"unknown step status {status!r}")
        entry = self.data["steps"][name]
        entry["status"] = status
        entry.update(fields)
        self.write()

    def finish(self, status: str | None = None, incomplete: list[str] | None = None) -> None:
        """Final status: ``status`` if given, else ``fail`` when a step failed, errored or timed out,
        else ``incomplete`` when ``incomplete`` names what was asked but not proven, else ``pass``."""
        if incomplete:
            self.data["incomplete"] = list(incomplete)
        if status is None:
            bad = [s["status"] for s in self.data["steps"].values() if s["status"] in ("fail", "error", "timeout")]
            status = "fail" if bad else "incomplete" if incomplete else "pass"
        self.data["status"] = status
        self.data["finished"] = _now()
        self.write()


def _json_default(obj):
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def validate_result(data: dict) -> list[str]:
    """Problems with a result document's shape (empty list: well formed)."""
    problems = []
    if data.get("schema") != SCHEMA:
        problems.append(f"schema: expected {SCHEMA!r}, got {data.get('schema')!r}")
    if data.get("status") not in RUN_STATUSES:
        problems.append(f"status: unexpected {data.get('status')!r}")
    steps = data.get("steps")
    if not isinstance(steps, dict) or set(steps) != set(STEPS):
        problems.append(f"steps: expected exactly {', '.join(STEPS)}")
    else:
        for name, s in steps.items():
            if s.get("status") not in STEP_STATUSES:
                problems.append(f"steps.{name}.status: unexpected {s.get('status')!r}")
    for key in ("started", "env", "targets"):
        if key not in data:
            problems.append(f"{key}: missing")
    return problems


# -- pytest ----------------------------------------------------------------------------------------

def parse_junit(path: str | os.PathLike) -> dict:
    """Counts (tests, passed, failed, errors, skipped) and failing tests of a pytest JUnit XML file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    out = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    for suite in suites:
        for case in suite.iter("testcase"):
            out["tests"] += 1
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            kinds = {child.tag for child in case}
            if "failure" in kinds or "error" in kinds:
                key = "failed" if "failure" in kinds else "errors"
                out[key] += 1
                node = case.find("failure") if "failure" in kinds else case.find("error")
                msg = (node.get("message") or node.text or "").strip()
                out["failures"].append({"test": name, "message": msg[:500]})
            elif "skipped" in kinds:
                out["skipped"] += 1
            else:
                out["passed"] += 1
    return out


# -- workload --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WorkloadSpec:
    sessions: int = 16
    turns: int = 4
    system_tokens: int = 256      # shared by every session (a system prompt)
    first_user_tokens: int = 1024  # the first turn's user message (a document, say)
    user_tokens: int = 128        # each later user message
    new_tokens: int = 16          # generated per turn (greedy)
    vocab: int = 256              # token ids drawn from [0, vocab)
    seed: int = 0

    def __post_init__(self):
        for name, v in asdict(self).items():
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name in ("seed", "system_tokens") else 1):
                raise ValueError(f"workload: {name} must be an integer >= "
                                 f"{0 if name in ('seed', 'system_tokens') else 1}, got {v!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def make_workload(spec: WorkloadSpec) -> dict:
    """User messages per session and turn (token ids); the replay appends each turn's output.

    Turn ``t`` of session ``s`` sends ``system + u[s][0] + out[s][0] + ... + u[s][t]``. Rounds run
    turn by turn over all sessions (session order shuffled per round with the seed), so between two
    turns of a session every other session runs: with a GPU cache smaller than the working set the
    session's prefix is evicted before it is needed again.
    """
    rng = random.Random(spec.seed)

    def toks(n):
        return [rng.randrange(spec.vocab) for _ in range(n)]

    system = toks(spec.system_tokens)
    users = [[toks(spec.first_user_tokens if t == 0 else spec.user_tokens) for t in range(spec.turns)]
             for _ in range(spec.sessions)]
    order = []
    for _ in range(spec.turns):
        perm = list(range(spec.sessions))
        rng.shuffle(perm)
        order.append(perm)
    return {"spec": spec.to_dict(), "system": system, "users": users, "order": order}


def request_id(session: int, turn: int) -> str:
    return f"s{session}t{turn}"


def final_context_tokens(spec: WorkloadSpec) -> int:
    return (spec.system_tokens + spec.first_user_tokens + (spec.turns - 1) * spec.user_tokens
            + spec.turns * spec.new_tokens)


def working_set_blocks(spec: WorkloadSpec, block_size: int) -> int:
    """Distinct full KV blocks the whole replay produces (the system prompt's blocks shared once)."""
    shared = spec.system_tokens // block_size
    per_session = final_context_tokens(spec) // block_size - shared
    return shared + spec.sessions * per_session


def gpu_blocks_for(spec: WorkloadSpec, block_size: int, ratio: float, concurrency: int = 1) -> int:
    """GPU cache blocks making the working set ``ratio`` x the cache, but enough to run
    ``concurrency`` requests of the longest context at once (plus one block of headroom each, and
    the ``RESERVED_BLOCKS`` LMDeploy 0.18 keeps out of a session's reach: its engine caps a session at
    ``(num_gpu_blocks - 1 reserved) * block_size - block_size`` tokens)."""
    if ratio <= 0:
        raise ValueError(f"ratio must be > 0, got {ratio}")
    need = concurrency * (math.ceil((final_context_tokens(spec) + 1) / block_size) + 1) + RESERVED_BLOCKS
    return max(need, math.ceil(working_set_blocks(spec, block_size) / ratio))


# -- calibration and targets -----------------------------------------------------------------------

# The long calibration prompt must take at least this fraction of the short one's TTFT longer.
MIN_PREFILL_GAIN = 0.25


def marginal_prefill(short_len: int, short_ttfts: list[float], long_len: int, long_ttfts: list[float]) -> dict:
    """Prefill tokens/s between two fresh prompt lengths, from the median TTFT of each.

    ``prefill_tokens_per_s`` = (long - short) / (median TTFT long - median TTFT short): what each
    recomputed token adds. None when the longer prompt was not measurably slower: by less than
    ``MIN_PREFILL_GAIN`` of the short prompt's TTFT (its prefill hid under the fixed cost of a step;
    the H200 run 3 of 2026-12-04 took 1.96 ms more for 2,048 tokens than for 256 at 7B and
    reported 916,001 tokens/s, where its 16k-token prompts showed about 35,000).
    ``whole_prompt_tokens_per_s`` (long prompt tokens over its TTFT, fixed cost included) is kept
    for reference; the H200 runs of 2026-12-04 used it, and it overstates what recompute costs.
    """
    def median(v):
        v = sorted(v)
        return v[len(v) // 2] if v else None

    ts, tl = median(short_ttfts), median(long_ttfts)
    rate = None
    if ts is not None and tl is not None and long_len > short_len and tl - ts >= MIN_PREFILL_GAIN * ts:
        rate = (long_len - short_len) / (tl - ts)
    return {"prefill_tokens_per_s": rate, "prefill_short_tokens": short_len, "prefill_prompt_tokens": long_len,
            "ttft_short_ms": None if ts is None else ts * 1e3, "ttft_long_ms": None if tl is None else tl * 1e3,
            "whole_prompt_tokens_per_s": (long_len / tl) if tl else None}


def restore_calibration(bench: dict | None, prefill_tokens_per_s: float | None, step_ms: float | None,
                        block_bytes: int | None, gpu: str | None, model: str | None) -> dict | None:
    """The JSON ``restore_cost.load_calibration`` reads, from this run's figures; None if any is missing."""
    rows = (bench or {}).get("cuda") or []
    if not rows or not prefill_tokens_per_s or step_ms is None:
        return None
    target = block_bytes or 0
    row = min(rows, key=lambda r: abs(math.log(max(r["block_kib"] * 1024, 1) / max(target, 1)))) if target else \
        max(rows, key=lambda r: r["block_kib"])
    return {"restore_gbps": row["engine_h2d_gbps"], "prefill_tokens_per_s": prefill_tokens_per_s,
            "restore_overhead_ms": step_ms, "gpu": gpu, "model": model,
            "restore_gbps_from": f"bench transfer: copy engine H2D, {row['blocks']} blocks of {row['block_kib']} KiB",
            "measured": _now()}


def _target(ok, value, want: str) -> dict:
    if ok is None:
        return {"status": "not measured", "value": value, "target": want}
    return {"status": "pass" if ok else "fail", "value": value, "target": want}


def evaluate_targets(bench: dict | None, e2e: dict | None, equality: dict | None) -> dict:
    """The issue's targets from this run's figures (``not measured`` where a figure is missing)."""
    out = {}
    rows = [r for r in ((bench or {}).get("cuda") or []) if r.get("blocks", 0) >= 16]
    if rows:
        worst = min(r["engine_h2d_gbps"] / r["plain_h2d_gbps"] for r in rows)
        out["restore_vs_pinned_h2d"] = _target(worst >= 0.8, round(worst, 3), ">= 0.8 for batches >= 16 blocks")
    else:
        out["restore_vs_pinned_h2d"] = _target(None, None, ">= 0.8 for batches >= 16 blocks")
    runs = (e2e or {}).get("runs") or {}

    def p50(name):
        r = runs.get(name) or {}
        return ((r.get("ttft") or {}).get("p50")) if r.get("status") == "ok" else None

    off, on = p50("small_off_qp0"), p50("small_on_qp0")
    speedup = off / on if off and on else None
    out["ttft_p50_speedup_4x_working_set"] = _target(None if speedup is None else speedup >= 3.0,
                                                     None if speedup is None else round(speedup, 3),
                                                     ">= 3x (tier off / tier on, qp0)")

    def tput(name):
        r = runs.get(name) or {}
        return r.get("output_tokens_per_s") if r.get("status") == "ok" else None

    f_off, f_on = tput("fits_off_qp0"), tput("fits_on_qp0")
    loss = 1.0 - f_on / f_off if f_off and f_on else None
    out["throughput_loss_when_fits"] = _target(None if loss is None else loss <= 0.02,
                                               None if loss is None else round(loss, 4), "<= 2%")
    if equality and equality.get("compared"):
        diffs = sum(_differing_requests(c) for c in equality["compared"].values())
        out["token_differences"] = _target(diffs == 0, diffs, "0 (tier on vs stock with a large GPU cache)")
    else:
        out["token_differences"] = _target(None, None, "0 (tier on vs stock with a large GPU cache)")
    return out


def _differing_requests(c: dict) -> int:
    """Requests that differ in one comparison: mismatching, missing from the candidate, or present in
    the candidate only (``extra_requests``); at least 1 when the comparison says not identical."""
    ids = set(c.get("mismatching_requests") or ()) | set(c.get("missing_requests") or ()) | \
        {("extra", r) for r in (c.get("extra_requests") or ())}
    if not ids and c.get("identical") is False:
        return 1
    return len(ids)


def incomplete_reasons(steps: list[str], e2e_step: dict | None, equality: dict | None) -> list[str]:
    """What a run asked for but did not measure (empty: nothing missing).

    * a requested engine run skipped (the budget ran out before it) or never started;
    * output equality requested (``equality`` in ``steps``) but no pair of runs compared.
    """
    out = []
    runs = (e2e_step or {}).get("runs") or {}
    if "e2e" in steps:
        skipped = [n for n, r in runs.items() if (r or {}).get("status") in ("skipped", "pending")]
        if skipped:
            out.append("requested runs not run: " + ", ".join(
                f"{n} ({runs[n].get('reason') or runs[n].get('status')})" for n in skipped))
    if "equality" in steps and not (equality or {}).get("compared"):
        out.append("output equality requested but no pair of runs was compared"
                   + (f" (not compared: {', '.join(equality['not_compared'])})"
                      if (equality or {}).get("not_compared") else ""))
    return out


# -- what code ran ---------------------------------------------------------------------------------

def tree_sha256(root: str | os.PathLike, pattern: str = "**/*.py") -> dict:
    """sha256 over the files under ``root`` matching ``pattern`` (sorted relative paths, each path and
    its bytes hashed), the file count and the root; ``sha256`` None when ``root`` is not a folder."""
    root = Path(root)
    if not root.is_dir():
        return {"root": str(root), "files": 0, "sha256": None}
    h = hashlib.sha256()
    files = sorted(p for p in root.glob(pattern) if p.is_file() and "__pycache__" not in p.parts)
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(p.read_bytes())
        h.update(b"\0")
    return {"root": str(root), "files": len(files), "sha256": h.hexdigest()}


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, timeout=60)


def checkout_state(repo: str | os.PathLike, package: str = "lmdeploy_hostcache",
                   untracked_paths=("lmdeploy_hostcache", "scripts/gpu_kit")) -> dict:
    """The checkout as it is now: HEAD, ``git describe --always --dirty``, sha256 of ``git diff HEAD``
    (uncommitted changes to tracked files), the untracked files under ``untracked_paths`` with a
    sha256 over them, and ``tree_sha256`` of the package's sources (what the driver recomputes over
    the package it imports on the GPU machine). Git fields are None where git or the repo is missing."""
    repo = Path(repo)
    out = {"head": None, "describe": None, "diff_sha256": None, "diff_bytes": None,
           "untracked": [], "untracked_sha256": None, "package": tree_sha256(repo / package), "at": _now()}
    try:
        head = _git(repo, "rev-parse", "HEAD")
        if head.returncode != 0:
            out["git_error"] = head.stderr.decode(errors="replace").strip()[:300]
            return out
        out["head"] = head.stdout.decode().strip()
        out["describe"] = _git(repo, "describe", "--always", "--dirty").stdout.decode().strip() or None
        diff = _git(repo, "diff", "HEAD", "--binary")
        out["diff_sha256"], out["diff_bytes"] = hashlib.sha256(diff.stdout).hexdigest(), len(diff.stdout)
        listed = _git(repo, "ls-files", "--others", "--exclude-standard", "-z", "--", *untracked_paths)
        names = sorted(n for n in listed.stdout.decode(errors="replace").split("\0") if n)
        h = hashlib.sha256()
        for n in names:
            h.update(n.encode() + b"\0")
            try:
                h.update((repo / n).read_bytes())
            except OSError:
                pass
            h.update(b"\0")
        out["untracked"], out["untracked_sha256"] = names, h.hexdigest()
    except (OSError, subprocess.SubprocessError) as exc:
        out["git_error"] = repr(exc)
    return out


class Budget:
    """Wall-clock budget of the whole run: each step gets min(its own limit, what is left - reserve)."""

    def __init__(self, total_s: float, clock=time.monotonic):
        self.clock = clock
        self.start = clock()
        self.total_s = float(total_s)

    def left(self) -> float:
        return self.total_s - (self.clock() - self.start)

    def step_timeout(self, own_limit_s: float, reserve_s: float = 0.0) -> float:
        return max(0.0, min(own_limit_s, self.left() - reserve_s))
