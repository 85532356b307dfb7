"""A stub LMDeploy node for the loopback routing tests (run as a script; binds 127.0.0.1 only).

Speaks what the proxy forwards (``/v1/models``, ``/health``, ``/v1/chat/completions``,
``/v1/completions``) and publishes its cache state (``/hostcache/cache_state``).  A request is
tokenized with LMDeploy's own prompt processor (the tiny model's tokenizer and chat template,
as a real node does), its blocks chained with the project's ``ChainHasher`` in the node's
``Namespace`` and served by the planner's two-tier model (``TwoTierCache``: an LRU GPU tier
over the real ``HostIndex`` host tier); both tiers feed a ``FeedPublisher`` through
``HostIndex.add_listener``.  Test controls: ``POST /stub/control`` ``{"feed": "on"|"off"|"error",
"delay": seconds, "fail": bool}`` (``fail``: every completion answers HTTP 500); ``GET /stub/stats``.
"""
from __future__ import annotations

import argparse
import asyncio
import threading

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from lmdeploy_hostcache.tier.digest import Namespace, chain_digests
from lmdeploy_hostcache.planner.replay import PreparedRequest, TwoTierCache
from lmdeploy_hostcache.planner.traces import Request as TraceRequest
from lmdeploy_hostcache.routing.feed import FEED_PATH, FeedPublisher
from lmdeploy_hostcache.routing.table import GPU, HOST


def build_processor(model_path: str):
    from lmdeploy.model import get_chat_template
    from lmdeploy.serve.processors.multimodal import MultimodalProcessor
    from lmdeploy.tokenizer import Tokenizer

    return MultimodalProcessor(Tokenizer(model_path), get_chat_template(model_path, None))


async def encode(processor, path: str, body: dict) -> list[int]:
    if path.endswith("/chat/completions"):
        out = await processor.get_prompt_input(prompt=body["messages"], do_preprocess=True)
    else:
        out = await processor.get_prompt_input(prompt=body["prompt"], do_preprocess=False)
    return list(out["input_ids"])


def prepared(ns: Namespace, tokens: list[int], session=None) -> PreparedRequest:
    bs = ns.block_size
    digests, blocks = chain_digests(ns, tokens)
    # session -1: no session key (the router gets none, as the proxy for a request without session_id/user)
    r = TraceRequest(0.0, len(tokens), 1, tuple(range(len(digests))), session if session is not None else -1)
    return PreparedRequest(r, tuple(digests), tuple(blocks), max(len(tokens) - 1, 0) // bs,
                           -(-len(tokens) // bs), ns.root)


def make_app(args) -> FastAPI:
    app = FastAPI()
    ns = Namespace(model=args.model_identity, block_size=args.block_size, kv_format="native/kb64",
                   tenant_salt=args.salt)
    cache = TwoTierCache(args.gpu_blocks, args.host_blocks, "lru", args.block_size)
    pub = FeedPublisher(gpu_blocks=args.gpu_blocks, host_blocks=args.host_blocks, namespace=ns,
                        fingerprint={"model": args.model_identity, "kv_format": "native/kb64", "tp": 1},
                        host_weight=0.2)
    cache.gpu.add_listener(*pub.listener(GPU))
    cache.host.add_listener(*pub.listener(HOST))
    processor = build_processor(args.model_path)
    lock = threading.Lock()
    state = {"feed": "off" if args.no_feed else "on", "delay": 0.0, "log": []}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": args.model_name, "object": "model"}]}

    @app.get("/health")
    def health():
        return {}

    async def serve(raw: Request):
        body = await raw.json()
        if state.get("fail"):
            return JSONResponse({"object": "error", "message": "stub node failure", "code": 500}, status_code=500)
        tokens = await encode(processor, raw.url.path, body)
        if state["delay"]:
            await asyncio.sleep(state["delay"])
        with lock:
            g, h = cache.serve(prepared(ns, tokens))
            state["log"].append({"tag": body.get("tag"), "gpu": g, "host": h,
                                 "prompt_blocks": -(-len(tokens) // args.block_size)})
        return JSONResponse({"id": "stub", "object": "chat.completion", "model": args.model_name,
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": "ok"}, "text": "ok"}],
                             "usage": {"prompt_tokens": len(tokens), "completion_tokens": 1},
                             "hostcache": {"node": args.name, "gpu_hit_blocks": g, "host_hit_blocks": h}})

    app.post("/v1/chat/completions")(serve)
    app.post("/v1/completions")(serve)

    @app.get(FEED_PATH)
    def feed(epoch: str | None = None, since: int | None = None):
        if state["feed"] == "off":
            return JSONResponse({"detail": "no feed"}, status_code=404)
        if state["feed"] == "error":
            return JSONResponse({"detail": "feed failing"}, status_code=500)
        with lock:
            return pub.poll(epoch, since)

    @app.post("/stub/control")
    async def control(raw: Request):
        body = await raw.json()
        for k in ("feed", "delay", "fail"):
            if k in body:
                state[k] = body[k]
        return {"ok": True}

    @app.get("/stub/stats")
    def stats():
        with lock:
            st = cache.stats
            return {"name": args.name, "requests": st.requests, "prompt_blocks": st.prompt_blocks,
                    "gpu_hit_blocks": st.gpu_hit_blocks, "host_hit_blocks": st.host_hit_blocks,
                    "seq": pub.seq, "epoch": pub.epoch, "log": state["log"]}

    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--model-path", required=True)
    p.add_argument("--model-name", default="tiny")
    p.add_argument("--model-identity", default="tiny")
    p.add_argument("--salt", default="")
    p.add_argument("--gpu-blocks", type=int, default=64)
    p.add_argument("--host-blocks", type=int, default=0)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--no-feed", action="store_true")
    args = p.parse_args()
    uvicorn.run(make_app(args), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
