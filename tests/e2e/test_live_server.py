"""A live ``lmdeploy serve api_server`` with the host tier, on CPU, driven by the openai client.

Two real servers on 127.0.0.1 (``lmdeploy_hostcache.testing.server``), the tiny Llama and
its byte-level tokenizer with a chat template, greedy decoding, three interleaved two-turn
chats (the client sends the whole history each turn):
- stock: stock LMDeploy (``LMDEPLOY_HOSTCACHE_DISABLE=1``), 256 GPU blocks (every prefix
  stays on the GPU) -> the reference;
- tier: ``--host-cache-gb 1``, 8 GPU blocks of 16 tokens, so prefixes are demoted and
  restored; its replies must equal stock's, ``/metrics`` must show the host-tier counters
  moving; then ``POST /sleep`` + ``POST /wakeup`` and the same chats again: the replies must
  still equal stock's (the host tier must not restore bytes from before the sleep) while
  the tier demotes and restores again; finally the server must stop cleanly (exit within
  the grace period, no process of its group left: the trace capture's helper process included,
  since the tier server captures its requests, and the capture must then hold all of them).
"""
import json
import re
import time

import pytest

from lmdeploy_hostcache.testing.compare import compare_token_outputs
from lmdeploy_hostcache.testing.models import write_tiny_model
from lmdeploy_hostcache.testing.server import api_server

pytestmark = pytest.mark.e2e

openai = pytest.importorskip("openai")

COMMON = ["--cache-block-seq-len", "16", "--session-len", "1024", "--max-batch-size", "2", "--log-level", "INFO"]
CHATS = {  # conversation -> user texts, one per turn (ASCII: one token per character)
    "A": ["the quick brown fox jumps over the lazy dog", "and then?"],
    "B": ["pack my box with five dozen liquor jugs now", "why so?"],
    "C": ["how vexingly quick daft zebras jump at noon", "really!"],
}
MAX_TOKENS = 2


def _converse(client, model):
    """Run the chats round-robin; {request id: generated token ids} (LMDeploy's
    ``return_token_ids``; the reply text goes back into the history)."""
    history = {k: [] for k in CHATS}
    replies = {}
    for turn in range(2):
        for conv, texts in CHATS.items():
            history[conv].append({"role": "user", "content": texts[turn]})
            resp = client.chat.completions.create(model=model, messages=history[conv], max_tokens=MAX_TOKENS,
                                                  temperature=0,
                                                  extra_body={"top_k": 1, "ignore_eos": True, "return_token_ids": True,
                                                              "skip_special_tokens": False})
            choice = resp.choices[0]
            ids = (choice.model_extra or {}).get("output_ids")
            assert resp.usage.completion_tokens == MAX_TOKENS and len(ids) == MAX_TOKENS, resp
            replies[f"{conv}{turn}"] = [int(t) for t in ids]
            history[conv].append({"role": "assistant", "content": choice.message.content or ""})
    return replies


def _host_counters(srv) -> dict[str, float]:
    status, body = srv.get("/metrics")
    assert status == 200
    out = {}
    for m in re.finditer(r"^lmdeploy:host_cache_(\w+?)(?:_total)?\{[^}]*\} ([0-9.e+-]+)$", body, re.M):
        out[m.group(1)] = float(m.group(2))
    return out


def _counters_after(srv, key, above, timeout=60.0):
    """/metrics is refreshed on LMDeploy's stats interval: poll until ``key`` passes ``above``."""
    deadline = time.monotonic() + timeout
    while True:
        c = _host_counters(srv)
        if c.get(key, -1) > above or time.monotonic() > deadline:
            return c
        time.sleep(1.0)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return str(write_tiny_model(tmp_path_factory.mktemp("serve") / "tinylm-chat", "llama", seed=1))


def test_live_server_host_tier_openai_chat_metrics_sleep_wakeup(chat_model, tmp_path):
    t0 = time.perf_counter()
    # the reference is stock LMDeploy: the package's import hook is switched off in that server
    with api_server(chat_model, host_cache_gb=None, extra_args=["--num-gpu-blocks", "256"] + COMMON,
                    env={"LMDEPLOY_HOSTCACHE_DISABLE": "1"}, log_dir=str(tmp_path)) as stock:
        client = openai.OpenAI(base_url=stock.base_url, api_key="none")
        model = client.models.list().data[0].id
        reference = _converse(client, model)
        assert "host_cache" not in stock.get("/metrics")[1]
    assert stock.clean_exit, f"stock server left {stock.leftover_pids}"
    t_stock = time.perf_counter() - t0

    cfg = tmp_path / "hostcache.yaml"
    capture = tmp_path / "capture.jsonl"      # trace capture on (its helper process: capture_offload's default)
    cfg.write_text(f"min_restore_tokens: 0\npin_memory: false\ncapture: {capture}\n")
    t1 = time.perf_counter()
    with api_server(chat_model, host_cache_gb=1, host_cache_config=str(cfg),
                    extra_args=["--num-gpu-blocks", "8"] + COMMON, log_dir=str(tmp_path)) as srv:
        assert "host tier" in srv.log().lower() or "host-tier" in srv.log().lower()
        client = openai.OpenAI(base_url=srv.base_url, api_key="none")
        model = client.models.list().data[0].id
        before = _converse(client, model)
        c1 = _counters_after(srv, "restored_tokens", 0)
        cmp1 = compare_token_outputs(reference, before)
        print(f"[e2e server] before sleep: {cmp1.summary()}; counters {c1}")
        assert cmp1.identical, (reference, before)
        assert c1["restored_tokens"] > 0 and c1["demotions"] > 0 and c1["restore_failures"] == 0, c1

        assert srv.post("/sleep?level=1")[0] == 200
        assert '"is_sleeping":true' in srv.get("/is_sleeping")[1].replace(" ", "")
        assert srv.post("/wakeup")[0] == 200, srv.log(3000)
        assert '"is_sleeping":false' in srv.get("/is_sleeping")[1].replace(" ", "")

        after = _converse(client, model)
        c2 = _counters_after(srv, "restored_tokens", c1["restored_tokens"])
        cmp2 = compare_token_outputs(reference, after)
        print(f"[e2e server] after sleep/wakeup: {cmp2.summary()}; counters {c2}")
        assert cmp2.identical, (reference, after)
        assert c2["restored_tokens"] > c1["restored_tokens"] and c2["demotions"] > c1["demotions"], (c1, c2)
        assert c2["restore_failures"] == 0, c2
    assert srv.clean_exit, f"host-tier server left {srv.leftover_pids}"
    # every request of both rounds captured, whole lines only, and the helper reported no failure
    records = [json.loads(line) for line in capture.read_text().splitlines()]
    assert len(records) == 2 * len(reference) and all(r["block_size"] == 16 for r in records)
    assert all(len(r["hash_ids"]) == r["input_length"] // 16 and r["output_length"] == MAX_TOKENS for r in records)
    assert "trace capture stopped" not in srv.log() and "helper process is not running" not in srv.log()
    # the stop signals the server's whole process group: the helper outlives it and exits 0 at close
    assert "capture helper process exited with code" not in srv.log() and "did not finish" not in srv.log()
    print(f"[e2e timing] stock server {t_stock:.1f} s, host-tier server {time.perf_counter() - t1:.1f} s")
