"""Multi-turn conversations through LMDeploy's real ``Engine`` (in a process of their own).

A *spec* (JSON-able dict) names a model, one or more engine *runs* and a *script* of
turns; every run replays the same script on a fresh engine and reports, per request id,
the generated token ids, plus the engine's prefix-cache and host-tier counters::

    {"model": "/path/to/tiny", "cpu_shim": true, "threads": 1,
     "runs": [{"name": "stock", "engine": {"num_gpu_blocks": 256, ...}},
              {"name": "tier", "engine": {"num_gpu_blocks": 8, ...},
               "host_cache": {"host_cache_gb": 0.01, "config": {"min_restore_tokens": 0}}}],
     "script": [{"conv": "A", "new": [ids...], "max_new_tokens": 3}, ...]}

A run may name its own ``"model"``. Engines of one process share its warm-up: the first
engine of a process pays for Triton's interpreter seeing each kernel for the first time
(on the 2-core CI machine ~2x the time of later engines), so tests group runs.

Turn semantics: a conversation's prompt is its previous prompt + the reply generated for
it + this turn's ``new`` ids (what a chat client sends back), so every turn after the
first shares a prefix with earlier work. Request ids are ``f"{conv}{turn}"``. Decoding is
greedy (``top_k=1``, ``ignore_eos``), one request at a time, so the outputs depend only on
the KV the engine attends to. Consecutive turns with the same ``"wave"`` (an int; one turn per
conversation in a wave) are sent together, each in its own session, and run concurrently; a
wave's ``gpu_prefix_hit_tokens`` are reported on its first turn (None on the others). On CPU
a request's output depends on what it is batched with unless the spec sets
``"batch_invariant": true`` (``batch_invariant.install`` in the child), so compare concurrent
runs with it on. ``engine`` keys are ``PytorchEngineConfig`` fields; the defaults
(``ENGINE_DEFAULTS``) are what a CPU run needs (``eager_mode``, ``device_type cuda``, prefix
caching on). ``host_cache`` turns the host tier on through ``with_host_cache`` (works whether
or not the import hook ran). ``inject`` names a fault
(``INJECTIONS``) for negative controls; ``copy_delay_polls`` (0-8) makes every host-tier copy
complete that many worker polls late (as a GPU copy may); a run's ``max_loads_copying`` and
``max_load_records`` are the most loads LMDeploy had copying, and tracked (copying or waiting
for or in their prefill), at once (``_track_peak_loads``). ``"disable_extension": true`` runs the child with
``LMDEPLOY_HOSTCACHE_DISABLE=1``: stock LMDeploy, the package's import hook never runs (the
result's ``extension_hooked`` says which), so it is the reference for "equal to stock".

``run_in_subprocess(spec)`` runs ``python -m lmdeploy_hostcache.testing.engine_runner``
and returns its JSON result; with ``cpu_shim`` the child installs the CPU shim first, so
the calling process (a pytest session) is never modified. The child leaves with
``os._exit`` after writing its result: LMDeploy's engine threads are not joined at
interpreter shutdown. Bad specs are refused with one line naming the field (exit 2).
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import Any

__all__ = ["ENGINE_DEFAULTS", "SpecError", "multi_turn_script", "run_in_subprocess", "run_spec", "validate_spec"]

ENGINE_DEFAULTS: dict[str, Any] = dict(eager_mode=True, device_type="cuda", block_size=16,
                                       enable_prefix_caching=True, max_batch_size=2, session_len=1024,
                                       max_prefill_token_num=1024)


def multi_turn_script(conversations: int = 3, turns: int = 2, first_tokens: int = 40, later_tokens: int = 8,
                      max_new_tokens: int = 3, seed: int = 0, low: int = 32, high: int = 127) -> list[dict]:
    """Round-robin turns of ``conversations`` chats (turn 0 of each, then turn 1 of each, ...):
    ``first_tokens`` new ids in a chat's first turn, ``later_tokens`` after; ids drawn
    uniformly from ``[low, high)`` (printable ASCII for the tiny byte-level tokenizer)."""
    import random

    rnd = random.Random(seed)
    names = [chr(ord("A") + i) for i in range(conversations)]
    return [dict(conv=c, new=[rnd.randrange(low, high) for _ in range(first_tokens if t == 0 else later_tokens)],
                 max_new_tokens=max_new_tokens) for t in range(turns) for c in names]


# Fault injections (negative controls: prove that an equality check can fail).
# zero_host_slots_on_load: the CPU copy engine zeroes each host slot just before loading it,
# so every restore writes zero KV into the GPU blocks (tokens still verify: the index is intact).
# reverse_blocks_on_load: a load of several blocks writes them into its GPU pages in reverse order
# (right bytes, wrong pages): caught only where a page is read at its own position, e.g. a later
# prompt that shares a restored chain's first blocks and not the rest.
INJECTIONS = ("zero_host_slots_on_load", "reverse_blocks_on_load")


class SpecError(ValueError):
    """A malformed spec; the message names the field."""


def validate_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A checked copy of ``spec`` (SpecError naming the field on any problem)."""
    if not isinstance(spec, Mapping):
        raise SpecError("spec must be a JSON object")
    out = dict(spec)
    if not isinstance(out.get("model"), str) or not out["model"]:
        raise SpecError("spec.model must be a model directory path")
    runs = out.get("runs")
    if not isinstance(runs, list) or not runs:
        raise SpecError("spec.runs must be a non-empty list")
    names = set()
    for i, run in enumerate(runs):
        if not isinstance(run, Mapping) or not isinstance(run.get("name"), str):
            raise SpecError(f"spec.runs[{i}] must be an object with a string 'name'")
        if run["name"] in names:
            raise SpecError(f"spec.runs[{i}].name {run['name']!r} is repeated")
        names.add(run["name"])
        if not isinstance(run.get("engine", {}), Mapping):
            raise SpecError(f"spec.runs[{i}].engine must be an object of PytorchEngineConfig fields")
        hc = run.get("host_cache")
        if hc is not None and not isinstance(hc, Mapping):
            raise SpecError(f"spec.runs[{i}].host_cache must be an object or null")
        if run.get("inject") not in (None, *INJECTIONS):
            raise SpecError(f"spec.runs[{i}].inject must be one of {INJECTIONS} or null")
        delay = run.get("copy_delay_polls", 0)
        if not isinstance(delay, int) or isinstance(delay, bool) or not 0 <= delay <= 8:
            raise SpecError(f"spec.runs[{i}].copy_delay_polls must be an integer from 0 to 8")
        if "model" in run and (not isinstance(run["model"], str) or not run["model"]):
            raise SpecError(f"spec.runs[{i}].model must be a model directory path")
        unknown = set(run) - {"name", "model", "engine", "host_cache", "inject", "copy_delay_polls"}
        if unknown:
            raise SpecError(f"spec.runs[{i}] has unknown keys {sorted(unknown)}")
    if out.get("disable_extension") and any(r.get("host_cache") is not None for r in runs):
        raise SpecError("spec.disable_extension runs stock LMDeploy only: no run may set host_cache")
    script = out.get("script")
    if not isinstance(script, list) or not script:
        raise SpecError("spec.script must be a non-empty list of turns")
    for i, turn in enumerate(script):
        if not isinstance(turn, Mapping) or not isinstance(turn.get("conv"), str):
            raise SpecError(f"spec.script[{i}].conv must be a string")
        new = turn.get("new")
        if not isinstance(new, list) or not new or not all(isinstance(t, int) and t >= 0 for t in new):
            raise SpecError(f"spec.script[{i}].new must be a non-empty list of token ids")
        n = turn.get("max_new_tokens", 1)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise SpecError(f"spec.script[{i}].max_new_tokens must be an integer >= 1")
        wave = turn.get("wave")
        if wave is not None and (not isinstance(wave, int) or isinstance(wave, bool)):
            raise SpecError(f"spec.script[{i}].wave must be an integer or absent")
    for group in _waves(script):
        convs = [turn["conv"] for turn in group]
        if len(set(convs)) != len(convs):
            raise SpecError(f"spec.script: wave {group[0]['wave']} has more than one turn of one conversation "
                            f"({sorted(convs)}): a turn's prompt needs its conversation's previous reply")
    if not isinstance(out.get("batch_invariant", False), bool):
        raise SpecError("spec.batch_invariant must be true or false")
    if out.get("batch_invariant") and not out.get("cpu_shim", True):
        raise SpecError("spec.batch_invariant needs the CPU shim (cpu_shim true)")
    return out


def _waves(script: list[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
    """The script's turns in the groups sent together: consecutive turns with the same ``wave``; a turn
    without one is a group of its own."""
    groups: list[list[Mapping[str, Any]]] = []
    for turn in script:
        wave = turn.get("wave")
        if groups and wave is not None and groups[-1][0].get("wave") == wave:
            groups[-1].append(turn)
        else:
            groups.append([turn])
    return groups


def _engine_config(run: Mapping[str, Any]):
    from lmdeploy import PytorchEngineConfig

    from ..integration.engine_config import with_host_cache

    kwargs = dict(ENGINE_DEFAULTS)
    kwargs.update(run.get("engine") or {})
    cfg = PytorchEngineConfig(**kwargs)
    hc = run.get("host_cache")
    if hc is not None:
        cfg = with_host_cache(cfg, host_cache_gb=hc.get("host_cache_gb"), config=hc.get("config"))
    return cfg


def _trie_hit_tokens(engine) -> int | None:
    stats = getattr(getattr(getattr(engine, "scheduler", None), "block_trie", None), "stats", None)
    return getattr(stats, "num_hit_tokens", None)


def _track_peak_loads(engine) -> dict[str, int]:
    """``{"copying": n, "records": m}``, kept up to date as each load starts: the most loads LMDeploy's load
    coordinator had copying at once (records in phase LOADING), and the most it tracked at once (a record stays
    through the load's prefill: READY, then PREFILLING); empty without a coordinator.  LMDeploy 0.18 admits a
    load only when the *free* blocks cover its whole prefill beside the other loads' tails
    (``KVLoadCoordinator.can_admit_load``), so on a squeezed cache copies rarely overlap, while a load often
    starts beside another request's loaded prefix still waiting for or in its prefill."""
    peak: dict[str, int] = {}
    coordinator = getattr(getattr(engine, "scheduler", None), "kv_load_coordinator", None)
    if coordinator is None or not hasattr(coordinator, "_loads"):
        return peak
    peak.update(copying=0, records=0)
    start_load = coordinator.start_load

    def counted_start_load(*args, **kwargs):
        out = start_load(*args, **kwargs)
        records = coordinator._loads.values()
        peak["copying"] = max(peak["copying"], sum(1 for r in records if r.phase.name == "LOADING"))
        peak["records"] = max(peak["records"], len(records))
        return out

    coordinator.start_load = counted_start_load
    return peak


@contextlib.contextmanager
def _injected(kind: str | None):
    if kind is None:
        yield
        return
    from ..transfer.copy_engine import CpuCopyEngine

    original = CpuCopyEngine._load

    def zeroing_load(self, slots, blocks):
        for slot in slots:
            self.pool.slot_view(slot).zero_()
        return original(self, slots, blocks)

    def reversing_load(self, slots, blocks):
        return original(self, slots, list(reversed(blocks)))

    CpuCopyEngine._load = zeroing_load if kind == "zero_host_slots_on_load" else reversing_load
    try:
        yield
    finally:
        CpuCopyEngine._load = original


@contextlib.contextmanager
def _copies_delayed(polls: int):
    """Every host-tier copy of the run completes ``polls`` worker polls late (``CpuCopyEngine``'s ``delay_polls``,
    as the harness's ``copy_delay_polls``): loads and demotions stay in flight across steps."""
    if not polls:
        yield
        return
    from ..integration.worker import HostTierWorker

    original = HostTierWorker.__init__

    def delayed_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.engine_kwargs["delay_polls"] = polls

    HostTierWorker.__init__ = delayed_init
    try:
        yield
    finally:
        HostTierWorker.__init__ = original


def _one_run(model: str, run: Mapping[str, Any], script: list[Mapping[str, Any]]) -> dict[str, Any]:
    with _injected(run.get("inject")), _copies_delayed(int(run.get("copy_delay_polls", 0))):
        return _one_run_impl(model, run, script)


def _one_run_impl(model: str, run: Mapping[str, Any], script: list[Mapping[str, Any]]) -> dict[str, Any]:
    from lmdeploy import GenerationConfig
    from lmdeploy.pytorch.engine import Engine

    from ..integration.metrics_export import host_tier_snapshot

    t0 = time.perf_counter()
    engine = Engine.from_pretrained(model, engine_config=_engine_config(run))
    try:
        peak_loads = _track_peak_loads(engine)
        inst = engine.create_instance()
        build_s = time.perf_counter() - t0
        history: dict[str, list[int]] = {}
        turns: dict[str, int] = {}
        outputs: dict[str, list[int]] = {}
        per_request: dict[str, dict[str, Any]] = {}
        session_id = 0
        for group in _waves(script):
            sent = []
            for turn in group:
                conv = turn["conv"]
                session_id += 1
                rid = f"{conv}{turns.get(conv, 0)}"
                turns[conv] = turns.get(conv, 0) + 1
                gen = GenerationConfig(max_new_tokens=int(turn.get("max_new_tokens", 1)), do_sample=False, top_k=1,
                                       ignore_eos=True)
                sent.append((rid, session_id, history.get(conv, []) + list(turn["new"]), gen))
            hits0 = _trie_hit_tokens(engine)
            t1 = time.perf_counter()
            if len(sent) == 1:
                answers = [_infer(inst, *sent[0][1:])]
            else:
                answers = inst.req_sender.run_until_complete(_infer_together(engine, sent))
            hits1 = _trie_hit_tokens(engine)
            seconds = round(time.perf_counter() - t1, 3)
            for k, ((rid, _, prompt, _), turn, (tokens, status)) in enumerate(zip(sent, group, answers)):
                if status is None or status.name != "FINISH":
                    # a refused request (a prompt longer than the GPU cache holds: INPUT_LENGTH_ERROR) answers no
                    # tokens; compared as output it would read as a host-tier mismatch, or as agreement with
                    # another engine refused the same way
                    raise RuntimeError(f"run {run['name']!r}: request {rid} ({len(prompt)} prompt tokens) ended "
                                       f"with {getattr(status, 'name', 'no answer')}, not FINISH")
                outputs[rid] = tokens
                hits = (hits1 - hits0) if hits0 is not None and k == 0 else None
                per_request[rid] = dict(prompt_tokens=len(prompt), seconds=seconds, gpu_prefix_hit_tokens=hits,
                                        wave=turn.get("wave"))
                history[turn["conv"]] = prompt + tokens
        snap = host_tier_snapshot(getattr(engine.scheduler, "kv_connector", None))
        return dict(name=run["name"], outputs=outputs, requests=per_request, host_tier=snap,
                    gpu_prefix_hit_tokens=_trie_hit_tokens(engine), max_loads_copying=peak_loads.get("copying"),
                    max_load_records=peak_loads.get("records"),
                    build_s=round(build_s, 2),
                    seconds=round(time.perf_counter() - t0, 2))
    finally:
        engine.close()


def _infer(inst, session_id: int, prompt: list[int], gen) -> tuple[list[int], Any]:
    """One request alone: its tokens and final status; its session ended."""
    tokens: list[int] = []
    status = None
    for out in inst.stream_infer(session_id, prompt, gen_config=gen):
        tokens += [int(t) for t in out.token_ids]  # stream outputs are deltas
        status = out.status
    inst.end(session_id)
    return tokens, status


async def _infer_together(engine, sent: list[tuple]) -> list[tuple[list[int], Any]]:
    """``sent``'s requests (rid, session, prompt, generation config) at once, an instance each."""
    import asyncio

    async def one(session_id: int, prompt: list[int], gen) -> tuple[list[int], Any]:
        inst = engine.create_instance()
        tokens: list[int] = []
        status = None
        async for out in inst.async_stream_infer(session_id, prompt, gen_config=gen):
            tokens += [int(t) for t in out.token_ids]
            status = out.status
        await inst.async_end(session_id)
        return tokens, status

    return list(await asyncio.gather(*(one(*request[1:]) for request in sent)))


def run_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Run every engine of ``spec`` in this process (the CPU shim must already be installed
    when the machine has no GPU). Returns ``{"runs": {name: result}, "seconds": total}``."""
    spec = validate_spec(spec)
    t0 = time.perf_counter()
    results = {run["name"]: _one_run(run.get("model", spec["model"]), run, spec["script"]) for run in spec["runs"]}
    # whether this interpreter ran the package's post-import hook (False under LMDEPLOY_HOSTCACHE_DISABLE=1)
    hooked = "lmdeploy_hostcache.integration.autoload" in sys.modules
    return dict(runs=results, seconds=round(time.perf_counter() - t0, 2), extension_hooked=hooked)


def run_in_subprocess(spec: Mapping[str, Any], timeout: float = 600, python: str | None = None) -> dict[str, Any]:
    """Run ``spec`` in a child interpreter; its JSON result. RuntimeError carries the child's log tail."""
    spec = validate_spec(spec)
    with tempfile.TemporaryDirectory(prefix="hostcache-e2e-") as tmp:
        spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")
        with open(spec_path, "w") as fh:
            json.dump(spec, fh)
        env = dict(os.environ)
        env.pop("LMDEPLOY_HOSTCACHE_DISABLE", None)
        if spec.get("disable_extension"):
            env["LMDEPLOY_HOSTCACHE_DISABLE"] = "1"
        if spec.get("cpu_shim", True):
            env["TRITON_INTERPRET"] = "1"
        from .server import die_with_parent

        proc = subprocess.run([python or sys.executable, "-m", __name__, spec_path, out_path], capture_output=True,
                              text=True, timeout=timeout, env=env, preexec_fn=die_with_parent)
        if proc.returncode != 0 or not os.path.exists(out_path):
            raise RuntimeError(f"engine runner exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")
        with open(out_path) as fh:
            return json.load(fh)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m lmdeploy_hostcache.testing.engine_runner SPEC.json OUT.json", file=sys.stderr)
        return 2
    try:
        with open(argv[0]) as fh:
            spec = validate_spec(json.load(fh))
    except (OSError, json.JSONDecodeError, SpecError) as exc:
        print(f"error: {argv[0]}: {exc}", file=sys.stderr)
        return 2
    if spec.get("cpu_shim", True):
        from . import cpu_shim

        shim_args = dict(fake_sms=int(spec.get("fake_sms", 8)))
        if spec.get("ccl_backend"):
            shim_args.update(ccl_backend=spec["ccl_backend"], fake_devices=int(spec.get("fake_devices", 2)))
        # processes LMDeploy spawns (TP workers) re-import this module as __mp_main__ (below)
        os.environ[_CHILD_SHIM_ENV] = json.dumps(shim_args)
        cpu_shim.install(**shim_args)
        if spec.get("batch_invariant"):
            os.environ[_CHILD_BATCH_INVARIANT_ENV] = "1"
            from . import batch_invariant

            batch_invariant.install()
    import torch

    torch.set_num_threads(int(spec.get("threads", 1)))
    result = run_spec(spec)
    with open(argv[1], "w") as fh:
        json.dump(result, fh)
    return 0


_CHILD_SHIM_ENV = "HOSTCACHE_CPU_SHIM_ARGS"
_CHILD_BATCH_INVARIANT_ENV = "HOSTCACHE_BATCH_INVARIANT"

if __name__ == "__mp_main__" and os.environ.get(_CHILD_SHIM_ENV):
    from . import cpu_shim as _shim

    _shim.install(**json.loads(os.environ[_CHILD_SHIM_ENV]))
    if os.environ.get(_CHILD_BATCH_INVARIANT_ENV):
        from . import batch_invariant as _batch_invariant

        _batch_invariant.install()

if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # LMDeploy's engine threads are not joined at interpreter shutdown
