"""One end-to-end engine run of the GPU proof kit: LMDeploy's real PyTorch engine, one configuration.

usage: python e2e_worker.py --model DIR --run JSON --workload FILE --out FILE [--cpu-shim]

``--run`` is one run's settings (``driver.RUNS`` builds them)::

    {"name": "small_on_qp0", "tier": true, "quant_policy": 0, "num_gpu_blocks": 250, "block_size": 64,
     "host_cache_gb": 8, "min_restore_tokens": 0, "eager_mode": true, "concurrency": 1,
     "calibrate": false}

``tier: false`` runs stock LMDeploy (``LMDEPLOY_HOSTCACHE_DISABLE=1`` is set before anything is
imported, so the extension never loads); ``tier: true`` installs the post-import hook first (what the
``.pth`` does after ``pip install``) and configures the connector with ``with_host_cache``.

The replay (``replay``) sends the workload's turns round by round (``kitlib.make_workload``): turn
``t`` of a session is the system prompt, the session's earlier user messages and this run's own
earlier outputs, then the new user message; greedy decoding, ``ignore_eos``, ``new_tokens`` per turn.
Per request it records the time to the first token (TTFT), the total latency and the output tokens.
``--out`` gets: status, per-request rows, TTFT p50/p99, prefill tokens/s (uncached prompt tokens over
the TTFTs), output tokens/s over the replay's wall time, the GPU prefix-cache hit tokens, and with
the tier on the connector's counters (host hits, restored tokens, restore latency). ``calibrate``
adds the marginal prefill rate of fresh prompts (between 256 tokens and ``CALIBRATION_MAX_PROMPT``,
16384, or the session length less 32 if shorter) and the decode step time (for ``restore_cost``).
With the tier on, ``restore_threshold`` (``restore_threshold``) records the ``min_restore_tokens``
the connector resolved, the same figure resolved again here with ``restore_cost`` from the
connector's own inputs, and the calibration it came from (``$LMDEPLOY_HOSTCACHE_CALIBRATION`` or
the assumed figures).

The replay takes any engine object with ``create_instance()`` whose instances have LMDeploy's
``async_stream_infer``; tests drive it with a fake (``tests/gpu_kit``).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from kitlib import latency_summary, request_id  # noqa: E402


async def _one_request(inst, session_id: int, prompt: list[int], gen_config, clock) -> dict:
    t0 = clock()
    first = None
    tokens: list[int] = []
    status = None
    async for out in inst.async_stream_infer(session_id, prompt, gen_config=gen_config):
        status = getattr(out.status, "name", str(out.status))
        if out.token_ids:
            if first is None:
                first = clock()
            tokens.extend(int(t) for t in out.token_ids)
    t1 = clock()
    return {"ttft": (first - t0) if first is not None else None, "latency": t1 - t0, "tokens": tokens,
            "status": status}


async def replay(engine, workload: dict, gen_config, concurrency: int = 1, clock=time.perf_counter,
                 stats=None) -> dict:
    """Replay ``workload`` through ``engine``; returns per-request rows and outputs.

    ``stats()`` (optional) returns the engine's GPU prefix-cache hit tokens so far; rows then carry the
    tokens each request found cached (exact with ``concurrency == 1``).
    """
    system, users, order = workload["system"], workload["users"], workload["order"]
    outputs: dict[str, list[int]] = {}
    rows: list[dict] = []
    sid = [0]
    insts = [engine.create_instance() for _ in range(max(1, concurrency))]
    start = clock()
    for turn, perm in enumerate(order):
        queue = list(perm)

        async def worker(inst):
            while queue:
                s = queue.pop(0)
                prompt = list(system)
                for t in range(turn):
                    prompt += users[s][t] + outputs[request_id(s, t)]
                prompt += users[s][turn]
                sid[0] += 1
                before = stats() if stats else None
                r = await _one_request(inst, sid[0], prompt, gen_config, clock)
                after = stats() if stats else None
                rid = request_id(s, turn)
                outputs[rid] = r["tokens"]
                cached = (after - before) if stats and concurrency == 1 else None
                rows.append({"id": rid, "prompt_tokens": len(prompt), "output_tokens": len(r["tokens"]),
                             "ttft": r["ttft"], "latency": r["latency"], "status": r["status"],
                             "gpu_cached_tokens": cached})

        await asyncio.gather(*(worker(i) for i in insts))
    wall = clock() - start
    return {"rows": rows, "outputs": outputs, "wall_s": wall}


def summarize(rep: dict) -> dict:
    rows = rep["rows"]
    ttfts = [r["ttft"] for r in rows if r["ttft"] is not None]
    out_tokens = sum(r["output_tokens"] for r in rows)
    uncached = [(r["prompt_tokens"] - (r["gpu_cached_tokens"] or 0), r["ttft"]) for r in rows
                if r["ttft"] is not None]
    ttft_sum = sum(t for _, t in uncached)
    return {
        "requests": len(rows),
        "failed_requests": [r["id"] for r in rows if r["status"] not in ("SUCCESS", "FINISH")],
        "ttft": latency_summary(ttfts),
        "latency": latency_summary(r["latency"] for r in rows),
        "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
        "output_tokens": out_tokens,
        "wall_s": rep["wall_s"],
        "output_tokens_per_s": out_tokens / rep["wall_s"] if rep["wall_s"] > 0 else None,
        "prefill_tokens_per_s": (sum(n for n, _ in uncached) / ttft_sum) if ttft_sum > 0 else None,
        "prefill_tokens_per_s_note": "prompt tokens minus GPU-prefix-cache hits (host restores count as "
                                     "uncached), over the sum of TTFTs",
    }


# The longest calibration prompt: long enough that its prefill stands out of a 7B step's fixed cost
# on an H200 (2,048 did not, run 3 of 2026-12-04), bounded by the run's session length.
CALIBRATION_MAX_PROMPT = 16384


async def calibrate(engine, gen_cls, vocab: int, clock=time.perf_counter, prompt_len: int = 2048,
                    repeats: int = 3, short_len: int = 256) -> dict:
    """Marginal prefill rate of fresh prompts and decode step time ((t(17) - t(1)) / 16).

    The prefill rate a restore competes with is the *marginal* one: what each recomputed token
    adds to the first token's time. TTFT also holds a fixed cost (an engine step's CPU work, which
    on a fast GPU hides a short prefill entirely), so the rate is measured between two fresh prompt
    lengths (``kitlib.marginal_prefill``), interleaved, each after a warm-up.
    """
    import random

    from kitlib import marginal_prefill

    rng = random.Random(12345)
    inst = engine.create_instance()
    sid = 10 ** 6
    short_len = max(1, min(short_len, prompt_len // 2))
    ttfts: dict[int, list[float]] = {short_len: [], prompt_len: []}
    one = gen_cls(max_new_tokens=1, do_sample=False, top_k=1, ignore_eos=True)
    for k in range(repeats + 1):  # the first round is a warm-up
        for n in (short_len, prompt_len):
            sid += 1
            r = await _one_request(inst, sid, [rng.randrange(vocab) for _ in range(n)], one, clock)
            if k and r["ttft"]:
                ttfts[n].append(r["ttft"])
    steps = []
    many = gen_cls(max_new_tokens=17, do_sample=False, top_k=1, ignore_eos=True)
    for _ in range(repeats):
        prompt = [rng.randrange(vocab) for _ in range(16)]
        sid += 1
        a = await _one_request(inst, sid, prompt, one, clock)
        sid += 1
        b = await _one_request(inst, sid, [*prompt[:-1], (prompt[-1] + 1) % vocab], many, clock)
        steps.append((b["latency"] - a["latency"]) / 16)
    steps.sort()
    out = marginal_prefill(short_len, ttfts[short_len], prompt_len, ttfts[prompt_len])
    out.update({"decode_step_ms": steps[len(steps) // 2] * 1e3 if steps else None, "repeats": repeats})
    return out


def _connector(engine):
    sched = getattr(engine, "scheduler", None)
    conn = getattr(sched, "kv_connector", None)
    return getattr(conn, "scheduler_side", None)


def restore_threshold(engine, cfg: dict) -> dict | None:
    """The tier's restore-or-recompute threshold in this engine, None without a connector.

    ``connector``: the ``min_restore_tokens`` the connector applies (resolved at its construction);
    ``resolved``: ``restore_cost.resolve_min_restore_tokens`` on the connector's configured value and
    bytes per token (its ``block_transfer_bytes / block_size``) with the calibration this process
    reads (``calibration_source``: the file named by ``$LMDEPLOY_HOSTCACHE_CALIBRATION``, or the
    assumed figures); ``agrees``: the two are equal. The calibration only matters for ``auto``.
    """
    conn = _connector(engine)
    if conn is None:
        return None
    from lmdeploy_hostcache import restore_cost

    configured = getattr(getattr(conn, "hostcache", None), "min_restore_tokens", cfg.get("min_restore_tokens", 0))
    block_bytes, block_size = getattr(conn, "block_transfer_bytes", 0), getattr(conn, "block_size", 0)
    bytes_per_token = block_bytes / block_size if block_size else 0.0
    out = {"configured": configured, "connector": getattr(conn, "min_restore_tokens", None),
           "bytes_per_token": bytes_per_token, "uses_calibration": str(configured).strip().lower() == "auto",
           "calibration_env": os.environ.get(restore_cost.ENV_CALIBRATION, "").strip() or None}
    try:
        cal = restore_cost.load_calibration()
        out["calibration_source"] = cal.source
        out["calibration"] = cal.to_dict()
        out["resolved"] = restore_cost.resolve_min_restore_tokens(configured, bytes_per_token, cal)
    except (restore_cost.CalibrationError, ValueError, TypeError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["agrees"] = out.get("resolved") == out["connector"] if out["connector"] is not None else None
    return out


def _gpu_hit_tokens(engine):
    trie = getattr(getattr(engine, "scheduler", None), "block_trie", None)
    stats = getattr(trie, "stats", None)
    return None if stats is None else int(stats.num_hit_tokens)


def _build_real(args, cfg: dict, result: dict):
    """LMDeploy's engine for ``cfg`` (stock, or with the host tier); returns (engine, GenerationConfig)."""
    if not cfg.get("tier"):
        os.environ["LMDEPLOY_HOSTCACHE_DISABLE"] = "1"
    if args.cpu_shim:
        from lmdeploy_hostcache.testing import cpu_shim

        cpu_shim.install()
    if cfg.get("tier"):
        from lmdeploy_hostcache.integration import autoload

        autoload.install()
    import torch
    from lmdeploy import GenerationConfig, PytorchEngineConfig
    from lmdeploy.messages import QuantPolicy
    from lmdeploy.pytorch.engine import Engine

    ec = PytorchEngineConfig(
        eager_mode=bool(cfg.get("eager_mode", True)), block_size=int(cfg["block_size"]),
        enable_prefix_caching=True, num_gpu_blocks=int(cfg["num_gpu_blocks"]),
        quant_policy=QuantPolicy(int(cfg["quant_policy"])), max_batch_size=max(4, int(cfg.get("concurrency", 1))),
        session_len=int(cfg["session_len"]), max_prefill_token_num=int(cfg.get("max_prefill_token_num", 4096)))
    if cfg.get("tier"):
        from lmdeploy_hostcache.integration.activate import status as activation_status
        from lmdeploy_hostcache.integration.engine_config import with_host_cache

        ec = with_host_cache(ec, host_cache_gb=float(cfg["host_cache_gb"]),
                             config={"min_restore_tokens": cfg.get("min_restore_tokens", 0), "host_kv_format": "same",
                                     "keep_restored_blocks": bool(cfg.get("keep_restored_blocks", True))})
    t0 = time.perf_counter()
    engine = Engine.from_pretrained(args.model, engine_config=ec)
    result["engine_build_s"] = time.perf_counter() - t0
    if cfg.get("tier"):
        result["activation"] = activation_status()
        if _connector(engine) is None:
            raise RuntimeError("tier requested but the engine has no host-tier connector (activation: "
                               f"{result['activation']['status']}: {result['activation']['reason']})")
    result["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return engine, GenerationConfig


def run(args) -> dict:
    cfg = json.loads(args.run)
    result = {"name": cfg.get("name"), "status": "error", "config": cfg}
    workload = json.loads(Path(args.workload).read_text())
    spec = workload["spec"]
    if args.fake_engine:
        import fake_engine

        engine, gen_cls = fake_engine.build(cfg), fake_engine.GenerationConfig
        result["gpu"] = None
        result["fake_engine"] = True
    else:
        engine, gen_cls = _build_real(args, cfg, result)
    gen = gen_cls(max_new_tokens=int(spec["new_tokens"]), do_sample=False, top_k=1, ignore_eos=True)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        if cfg.get("calibrate"):
            plen = max(16, min(CALIBRATION_MAX_PROMPT, int(cfg["session_len"]) - 32))
            result["calibration"] = loop.run_until_complete(calibrate(engine, gen_cls, int(spec["vocab"]),
                                                                      prompt_len=plen))
        if cfg.get("tier"):
            result["restore_threshold"] = restore_threshold(engine, cfg)
        conn0 = _connector(engine)
        base = dict(conn0.stats()) if conn0 is not None else None
        hits0 = _gpu_hit_tokens(engine)
        rep = loop.run_until_complete(replay(engine, workload, gen, int(cfg.get("concurrency", 1)),
                                             stats=(lambda: _gpu_hit_tokens(engine)) if hits0 is not None else None))
        result.update(summarize(rep))
        hits1 = _gpu_hit_tokens(engine)
        result["gpu_prefix_hit_tokens"] = None if hits0 is None else hits1 - hits0
        conn = _connector(engine)
        if conn is not None:
            st = conn.stats()
            d = {k: st[k] - base.get(k, 0) for k in st if isinstance(st[k], (int, float))
                 and not k.startswith(("restore_latency", "host_slots"))}
            d["restore_latency_mean_s"] = st.get("restore_latency_mean_s")
            d["restore_latency_max_s"] = st.get("restore_latency_max_s")
            d["host_slots"] = st.get("host_slots")
            d["host_slots_used"] = st.get("host_slots_used")
            result["host_tier"] = d
            lat = st.get("restore_latency_mean_s") or 0
            cnt = st.get("restore_latency_count") or 0
            if lat and cnt and d.get("bytes_to_gpu"):
                result["host_tier"]["restore_gbps_effective"] = d["bytes_to_gpu"] / (lat * cnt) / 1e9
        result["rows"] = rep["rows"]
        result["outputs"] = rep["outputs"]
        result["status"] = "fail" if result["failed_requests"] else "ok"
    finally:
        try:
            engine.close()
        except Exception:  # noqa: BLE001 - closing must not hide the result
            result["close_error"] = traceback.format_exc(limit=3)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="one end-to-end engine run of the GPU proof kit")
    parser.add_argument("--model", required=True)
    parser.add_argument("--run", required=True, help="JSON settings of this run")
    parser.add_argument("--workload", required=True, help="workload JSON (kitlib.make_workload)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--cpu-shim", action="store_true",
                        help="CPU smoke test only: fake CUDA with lmdeploy_hostcache.testing.cpu_shim")
    parser.add_argument("--fake-engine", action="store_true",
                        help="tests only: a deterministic fake engine (fake_engine.py), no LMDeploy")
    args = parser.parse_args(argv)
    try:
        result = run(args)
    except Exception as exc:  # noqa: BLE001 - the driver reads the error from the file
        result = {"status": "error", "error": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc(limit=8)}
        try:
            result["config"] = json.loads(args.run)
        except ValueError:
            pass
    Path(args.out).write_text(json.dumps(result, default=str) + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if result.get("status") == "ok" else 1)  # skip interpreter teardown (engine threads)


if __name__ == "__main__":
    main()
