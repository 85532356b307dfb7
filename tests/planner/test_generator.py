"""The planner's built-in workload families (``planner.generator``): chained block ids, the traffic
shape each family promises, determinism per seed, and one clear error per bad parameter."""
from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from lmdeploy_hostcache.eviction_eval import chains_from_trace
from lmdeploy_hostcache.planner.generator import (AGENT_ORDERS, WORKLOAD_FAMILIES, AgentWorkload, ChatWorkload,
                                                  DocumentWorkload, generate, generate_agents, generate_documents,
                                                  random_workload, workload_from_params, workload_params)


def _prefix_len(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def test_documents_share_their_document_and_nothing_after_it():
    w = DocumentWorkload(documents=12, requests=300, zipf=1.0, seed=4)
    t = generate_documents(w)
    chains_from_trace(t)                       # raises if an id ever follows two different parents
    assert len(t.requests) == 300 and t.block_size == 64
    ts = [r.timestamp for r in t.requests]
    assert ts == sorted(ts)
    docs = Counter()
    for r in t.requests:
        full = r.full_blocks(t.block_size)
        assert full == len(r.hash_ids) - 1     # a partial last block of its own
        assert w.document_blocks[0] + w.own_blocks[0] <= full <= w.document_blocks[1] + w.own_blocks[1]
    seen = {}
    for r in t.requests:
        ids = r.hash_ids
        # the shared part is a whole document: two requests share a prefix only through one
        for other in seen.values():
            k = _prefix_len(ids, other)
            if k:
                docs[ids[0]] += 1
                assert ids[:k] == other[:k] and k <= w.document_blocks[1]
                break
        seen[ids[0]] = ids
    assert len(seen) <= 12
    top = Counter(r.hash_ids[0] for r in t.requests).most_common(1)[0][1]
    flat = Counter(r.hash_ids[0] for r in generate_documents(DocumentWorkload(documents=12, requests=300, zipf=0.0,
                                                                                seed=4)).requests)
    assert top > max(flat.values())            # the skew concentrates requests on the top document


def test_document_drift_moves_the_popular_document():
    t = generate_documents(DocumentWorkload(documents=50, requests=4000, zipf=1.5, drift=1000, seed=2))
    tops = [Counter(r.hash_ids[0] for r in t.requests[i:i + 1000]).most_common(1)[0][0] for i in range(0, 4000, 1000)]
    assert len(set(tops)) > 1
    still = generate_documents(DocumentWorkload(documents=50, requests=4000, zipf=1.5, drift=0, seed=2))
    tops = [Counter(r.hash_ids[0] for r in still.requests[i:i + 1000]).most_common(1)[0][0] for i in range(0, 4000, 1000)]
    assert len(set(tops)) == 1


@pytest.mark.parametrize("order", AGENT_ORDERS)
def test_agent_sessions_grow_by_their_own_blocks(order):
    w = AgentWorkload(sessions=5, growth_blocks=3, order=order, restart=0.0, switch=0.5, requests=200, seed=1)
    t = generate_agents(w)
    chains_from_trace(t)
    last = {}
    for r in t.requests:
        full = r.hash_ids[:r.full_blocks(t.block_size)]
        prev = last.get(r.session)
        if prev is not None:                   # no restart: the whole previous context, then 3 new blocks
            assert full[:len(prev)] == prev and len(full) == len(prev) + 3
        last[r.session] = full
    sessions = [r.session for r in t.requests]
    if order == "cycle":
        assert sessions[:10] == [0, 1, 2, 3, 4] * 2
    assert set(sessions) == set(range(5))


def test_agent_bursts_stay_on_one_session_without_switches_and_restarts_start_over():
    t = generate_agents(AgentWorkload(sessions=6, order="bursts", switch=0.0, restart=0.0, requests=50, seed=3))
    assert {r.session for r in t.requests} == {0}
    t = generate_agents(AgentWorkload(sessions=2, order="cycle", restart=1.0, requests=20, seed=3))
    firsts = [r.hash_ids[0] for r in t.requests]
    assert len(set(firsts)) == 20              # every request restarted its session: nothing shared


def test_one_token_blocks_have_no_partial_block():
    for t in (generate_documents(DocumentWorkload(documents=3, requests=20, block_size=1)),
              generate_agents(AgentWorkload(sessions=2, requests=20, block_size=1))):
        for r in t.requests:
            assert r.full_blocks(1) == len(r.hash_ids) == r.input_length


def test_random_workloads_are_reproducible_and_valid():
    for fam in WORKLOAD_FAMILIES:
        a = [random_workload(fam, random.Random(9)) for _ in range(2)]
        assert a[0] == a[1]
        assert random_workload(fam, random.Random(10)) != a[0]
    rng = random.Random(0)
    kinds = {fam: type(random_workload(fam, rng)) for fam in WORKLOAD_FAMILIES}
    assert kinds == {"chat": ChatWorkload, "documents": DocumentWorkload, "agents": AgentWorkload}
    t = generate(AgentWorkload(requests=30))
    assert generate(AgentWorkload(requests=30)).requests == t.requests
    with pytest.raises(ValueError, match="unknown workload family 'scan'"):
        random_workload("scan", rng)
    with pytest.raises(TypeError, match="not a built-in workload"):
        generate("chat")


@pytest.mark.parametrize("cls, field, value", [
    (DocumentWorkload, "documents", 0), (DocumentWorkload, "zipf", -1.0), (DocumentWorkload, "drift", -5),
    (DocumentWorkload, "document_blocks", (5, 2)), (DocumentWorkload, "own_blocks", (-1, 2)),
    (DocumentWorkload, "block_size", True), (AgentWorkload, "sessions", 0), (AgentWorkload, "order", "lifo"),
    (AgentWorkload, "restart", 1.5), (AgentWorkload, "start_blocks", (0, 3)), (AgentWorkload, "mean_gap_s", -1.0),
])
def test_bad_workload_parameters_name_the_field(cls, field, value):
    with pytest.raises(ValueError, match=field):
        cls(**{field: value})


def test_workloads_from_command_line_text_parse_every_field_type():
    w = workload_from_params("documents", {"documents": "50", "zipf": "1.25", "document_blocks": "3, 9"}, seed=7)
    assert w == DocumentWorkload(documents=50, zipf=1.25, document_blocks=(3, 9), seed=7)
    assert workload_from_params("agents", {"order": "cycle"}) == AgentWorkload(order="cycle")
    assert workload_from_params("chat", {}, seed=3) == ChatWorkload(seed=3)
    assert "seed" not in workload_params("chat") and "mean_turns" in workload_params("chat")


@pytest.mark.parametrize("family, params, match", [
    ("agents", {"foo": "1"}, "agent workload has no parameter 'foo'; it has: sessions"),
    ("agents", {"seed": "1"}, "no parameter 'seed'"),
    ("chat", {"sessions": "1.5"}, "chat workload: sessions must be an int, got '1.5'"),
    ("chat", {"mean_turns": "nan"}, "mean_turns must be a finite number"),
    ("chat", {"user_tokens": "5"}, "user_tokens must be a range LO,HI of ints"),
    ("documents", {"documents": "0"}, "document workload: documents must be a positive int"),
    ("agents", {"order": "lifo"}, "agent workload: order must be one of"),
    ("chat", {"sessions": "9" * 5000}, r"sessions must be an int, got '9{40}'\.\.\. \(5,000 characters\)$"),
])
def test_bad_workload_text_names_the_field(family, params, match):
    with pytest.raises(ValueError, match=match):
        workload_from_params(family, params)


def test_planner_docs_name_every_workload_field():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "planner.md").read_text()
    missing = [f"{fam}.{f}" for fam in WORKLOAD_FAMILIES for f in workload_params(fam) if f"`{f}`" not in doc]
    assert not missing, f"docs/planner.md does not name {missing}"


@pytest.mark.parametrize("workload", [
    ChatWorkload(sessions=200, seed=3),
    ChatWorkload(sessions=60, mean_think_s=0.0, mean_session_gap_s=0.0, seed=4),   # every request at t=0
    ChatWorkload(sessions=80, mean_think_s=2000.0, mean_session_gap_s=0.5, seed=5),  # sessions interleave widely
    DocumentWorkload(documents=40, requests=300, drift=50, seed=6),
    AgentWorkload(sessions=5, requests=300, order="random", seed=7),
])
def test_generate_with_a_limit_is_the_head_of_the_full_trace(workload):
    full = generate(workload)
    for limit in (0, 1, 7, 100, len(full), len(full) + 5):
        assert generate(workload, limit=limit).requests == full.head(limit).requests, limit


def test_a_huge_chat_workload_with_a_small_limit_is_cheap():
    import time
    t0 = time.perf_counter()
    trace = generate(ChatWorkload(sessions=3_000_000, seed=1), limit=10)
    assert len(trace) == 10 and time.perf_counter() - t0 < 5.0
    assert trace.requests == generate(ChatWorkload(sessions=200, seed=1)).head(10).requests
