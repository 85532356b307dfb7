"""Trace readers, the bundled trace and the chat generator."""
import gzip
import hashlib
import json
import re

import pytest

from lmdeploy_hostcache.planner.cli import bundled_trace_path
from lmdeploy_hostcache.planner.generator import ChatWorkload, generate_chat
from lmdeploy_hostcache.planner.traces import derive_session, read_mooncake, read_weka, sniff_format


def _assert_chained(trace):
    """Two requests share block i only if they share blocks 0..i (the chaining rule)."""
    seen: dict[int, tuple[int, ...]] = {}
    for r in trace.requests:
        for i, h in enumerate(r.hash_ids):
            prefix = r.hash_ids[:i]
            assert seen.setdefault(h, prefix) == prefix, f"block id {h} follows two different prefixes"


def test_bundled_trace_is_the_unmodified_original(shared_traces):
    data = gzip.decompress(bundled_trace_path().read_bytes())
    original = (shared_traces / "mooncake" / "conversation_trace.jsonl").read_bytes()
    assert data == original
    prov = (bundled_trace_path().parent / "PROVENANCE.md").read_text()
    assert hashlib.sha256(data).hexdigest() in prov
    assert "kvcache-ai/Mooncake" in prov and "FAST25-release/traces" in prov and "Apache" in prov
    assert (bundled_trace_path().parent / "LICENSE-APACHE-2.0").read_bytes() == \
        (shared_traces / "mooncake" / "LICENSE-APACHE-2.0").read_bytes()


def test_read_bundled_mooncake():
    t = read_mooncake(bundled_trace_path())
    assert len(t) == 12031 and t.block_size == 512
    assert all(r.hash_ids[0] == 0 for r in t.requests[:100])
    assert [r.timestamp for r in t.requests] == sorted(r.timestamp for r in t.requests)
    r = t.requests[0]
    assert r.input_length == 6758 and r.prompt_blocks(512) == 14 == len(r.hash_ids)
    assert r.full_blocks(512) == 13 and r.matchable_blocks(512) == 13
    _assert_chained(t.head(2000))


def test_mooncake_errors_name_line_and_field(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"timestamp": 0, "input_length": 600, "output_length": 1, "hash_ids": [0, 1]}\n'
                 '{"timestamp": 5, "input_length": 600, "output_length": 1, "hash_ids": [0, "x"]}\n')
    with pytest.raises(ValueError, match=r"t.jsonl:2: field 'hash_ids'"):
        read_mooncake(p)
    p.write_text('{"timestamp": 0, "output_length": 1, "hash_ids": [0]}\n')
    with pytest.raises(ValueError, match=r":1: missing field 'input_length'"):
        read_mooncake(p)
    p.write_text('{"timestamp": 0, "input_length": 512, "hash_ids": [0, 1]}\n')
    with pytest.raises(ValueError, match=r"2 hash_ids for input_length 512"):
        read_mooncake(p)
    p.write_text('not json\n')
    with pytest.raises(ValueError, match=r":1: not JSON"):
        read_mooncake(p)


def test_mooncake_exact_multiple_is_never_fully_matchable(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"timestamp": 0, "input_length": 1024, "output_length": 1, "hash_ids": [0, 1]}\n')
    r = read_mooncake(p).requests[0]
    assert r.full_blocks(512) == 2 and r.matchable_blocks(512) == 1  # last token is always recomputed


def test_weka_merge_offsets_ids_and_staggers(shared_traces):
    files = sorted((shared_traces / "weka_sample").glob("trace_*.json"))
    t = read_weka(files, stagger_s=100.0)
    assert t.block_size == 64
    by_session: dict[str, set[int]] = {}
    for r in t.requests:
        by_session.setdefault(r.session.split("/")[0], set()).update(r.hash_ids)
        assert len(r.hash_ids) == r.input_length // 64  # WEKA lists full blocks only
    sets = list(by_session.values())
    assert len(sets) == 6
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            assert not sets[i] & sets[j], "session files must not share block ids after merging"
    firsts = sorted(min(r.timestamp for r in t.requests if r.session.split("/")[0] == s) for s in by_session)
    assert firsts == [0.0, 100.0, 200.0, 300.0, 400.0, 500.0]
    expected = 0
    for f in files:
        for r in json.loads(f.read_text())["requests"]:
            expected += len(r["requests"]) if "hash_ids" not in r else 1  # sub-agents: their requests
    assert len(t) == expected
    assert any("/" in r.session for r in t.requests), "sub-agent requests must be flattened in"
    _assert_chained(t)


def test_weka_rejects_mixed_block_sizes(tmp_path):
    a = tmp_path / "a.json"
    b = tmp_path / "b.json"
    a.write_text(json.dumps({"block_size": 64, "requests": [{"t": 0, "in": 128, "hash_ids": [1, 2]}]}))
    b.write_text(json.dumps({"block_size": 32, "requests": [{"t": 0, "in": 64, "hash_ids": [1, 2]}]}))
    with pytest.raises(ValueError, match="block_size 32 differs"):
        read_weka([a, b])
    b.write_text(json.dumps({"block_size": 64, "requests": [{"t": 0, "hash_ids": [1]}]}))
    with pytest.raises(ValueError, match=re.escape("requests[0]: missing field 'in'")):
        read_weka([a, b])
    with pytest.raises(ValueError, match="stagger_s"):
        read_weka([a], stagger_s=-1)


def test_sniff_format(tmp_path, shared_traces):
    assert sniff_format(bundled_trace_path()) == "mooncake"
    assert sniff_format(next((shared_traces / "weka_sample").glob("*.json"))) == "weka"
    p = tmp_path / "x.csv"
    p.write_text("a,b\n")
    with pytest.raises(ValueError, match="neither"):
        sniff_format(p)


def test_derive_session():
    assert derive_session([0, 7, 8]) == 7 and derive_session([5]) == 5 and derive_session([]) == -1


def test_chat_generator_is_deterministic_and_chained():
    w = ChatWorkload(sessions=60, seed=3)
    a, b = generate_chat(w), generate_chat(w)
    assert [r.hash_ids for r in a.requests] == [r.hash_ids for r in b.requests]
    assert generate_chat(ChatWorkload(sessions=60, seed=4)).requests != a.requests
    _assert_chained(a)
    # every later turn of a session extends the previous turn's full blocks
    last: dict = {}
    for r in a.requests:
        prev = last.get(r.session)
        if prev is not None:
            n = prev.full_blocks(64)
            assert r.hash_ids[:n] == prev.hash_ids[:n]
            assert r.input_length > prev.input_length + prev.output_length
        last[r.session] = r
    # sessions sharing a system prompt share its full blocks
    firsts = {r.hash_ids[0] for r in a.requests}
    assert len(firsts) <= w.system_prompts
    with pytest.raises(ValueError, match="sessions"):
        ChatWorkload(sessions=0)


def test_a_fifo_or_pipe_trace_is_refused_without_reading(tmp_path):
    """A FIFO with no writer used to block `plan` for good, and a pipe (``<(...)``) was reported as an empty trace
    (the format sniff read it once, the reader found nothing left): both are refused before any read."""
    import os

    from lmdeploy_hostcache.planner.traces import read_traces

    fifo = tmp_path / "live.jsonl"
    os.mkfifo(fifo)
    for target in (fifo, tmp_path):
        with pytest.raises(ValueError, match=r"live\.jsonl is a FIFO \(named pipe\), not a regular file"):
            read_traces([target])
    (tmp_path / "gone.jsonl").symlink_to(tmp_path / "missing")
    os.unlink(fifo)
    with pytest.raises(ValueError, match=r"gone\.jsonl: cannot read it"):
        read_traces([tmp_path])


def test_an_unterminated_last_line_is_skipped_only_when_it_is_cut_json(tmp_path):
    """A last line without its newline that is not whole JSON is a write cut short (skipped, reported); one that
    is whole JSON but not a record (a WEKA session file read as Mooncake) is that record's error."""
    good = json.dumps({"timestamp": 0, "input_length": 1024, "output_length": 1, "hash_ids": [1, 2]}) + "\n"
    cut = tmp_path / "cut.jsonl"
    cut.write_text(good + '{"timestamp": 1, "input_len')
    trace = read_mooncake(cut)
    assert len(trace.requests) == 1 and "a write cut short" in trace.read_warnings[0]
    whole = tmp_path / "whole.json"
    whole.write_text(json.dumps({"block_size": 64, "requests": []}))
    with pytest.raises(ValueError, match=r"whole\.json:1: missing field 'hash_ids'"):
        read_mooncake(whole)
