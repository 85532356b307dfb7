"""Output blocks the trace names (``output_hash_ids``, issue 12): an OpenAI chat client's next turn re-sends the
previous prompt and its reply; LMDeploy's trie kept the reply's full blocks, so that turn hits them. A capture
names them; ``plan`` reads, checks and replays them (one request at a time, with lifetimes, on the step clock),
and the chat generator names them too. Without the field every replay is as before."""
import json

import pytest

from lmdeploy_hostcache.cli import main
from lmdeploy_hostcache.planner.concurrency import Lifetimes, replay_concurrent
from lmdeploy_hostcache.planner.engine_steps import EngineSteps, replay_stepped
from lmdeploy_hostcache.planner.generator import ChatWorkload, generate_chat
from lmdeploy_hostcache.planner.replay import distinct_blocks, prepare_trace, replay
from lmdeploy_hostcache.planner.traces import Request, Trace, read_mooncake

BS = 16


def _resent(named=True, gap=200.0, between=()):
    """Turn 1: 40 prompt tokens (2 full blocks) and 48 generated (the KV of 87 tokens: 3 full blocks past the
    prompt's); turn 2 re-sends both and 8 new tokens (96: 6 full blocks, 5 matchable). ``between``: requests
    arriving between the two turns."""
    first = Request(0.5, 40, 48, (1, 2, 90), "c", output_hash_ids=(3, 4, 5) if named else None)
    second = Request(gap, 96, 4, (1, 2, 3, 4, 5, 6), "c", output_hash_ids=() if named else None)
    return Trace("resend", BS, [first, *between, second])


def test_every_replay_credits_a_re_sent_reply_with_the_blocks_the_turn_before_left():
    for named, hits in ((True, 5), (False, 2)):     # turn 2 matches its prompt's 2 blocks, + the reply's 3
        pr = prepare_trace(_resent(named))
        assert bool(pr[0].out_digests) == named
        assert replay(pr, 31, 16, "lru", BS).gpu_hit_blocks == hits
        assert replay_concurrent(pr, 31, 16, "lru", BS, Lifetimes(1.0, 1e15), host_write_s=1.5).gpu_hit_blocks == hits
        stepped = replay_stepped(pr, 31, 16, "lru", BS, Lifetimes(1.0, 1e15), engine=EngineSteps(4, 4, 512),
                                 host_write_s=1.5)
        assert stepped.gpu_hit_blocks == hits
    # the output blocks chain after the prompt's full blocks: the second turn's digests of the same ids
    pr = prepare_trace(_resent())
    assert pr[0].out_digests == pr[1].digests[2:5] and pr[0].out_bytes == pr[1].block_bytes[2:5]


def test_demoted_reply_blocks_are_restored_from_the_host_tier():
    """A 6-block GPU tier: another request between the turns (4 full blocks and a partial one) pushes the
    reply's blocks (the LRU leaves) down to the host tier, and the next turn restores them from there. One
    request at a time the other request takes 4 blocks (the reply's 3 are demoted); with lifetimes it also
    holds one for its partial block, so the prompt's second block goes down too."""
    other = Request(100.0, 70, 1, (20, 21, 22, 23, 24), "o")
    for named, plain, lived in ((True, (2, 3), (1, 4)), (False, (2, 0), (1, 1))):
        st = replay(prepare_trace(_resent(named, between=(other,))), 6, 16, "lru", BS)
        assert (st.gpu_hit_blocks, st.host_hit_blocks) == plain
        st = replay_concurrent(prepare_trace(_resent(named, between=(other,))), 6, 16, "lru", BS,
                               Lifetimes(1.0, 1e15), host_write_s=1.5)
        assert (st.gpu_hit_blocks, st.host_hit_blocks) == lived


def test_the_same_reply_cached_twice_is_shared_not_stored_again():
    """Two identical requests with identical outputs (greedy decoding) end with the same output blocks:
    LMDeploy's trie deduplicates them; ghost digests (no field) are two chains."""
    for named, stored in ((True, 3), (False, 6)):
        reqs = [Request(t, 40, 48, (1, 2, 90), "c", output_hash_ids=(3, 4, 5) if named else None) for t in (0.5, 80.5)]
        st = replay_concurrent(prepare_trace(Trace("twice", BS, reqs)), 31, 16, "lru", BS, Lifetimes(1.0, 1e15))
        assert st.output_blocks == stored and st.gpu_hit_blocks == 2
    # the distinct blocks (a tier at least this large never evicts) count the named output blocks
    assert distinct_blocks(prepare_trace(Trace("twice", BS, reqs))) == 2
    named = [Request(0.5, 40, 48, (1, 2, 90), "c", output_hash_ids=(3, 4, 5))]
    assert distinct_blocks(prepare_trace(Trace("one", BS, named))) == 2 + 3


def _write(tmp_path, records, name="cap.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _record(**kw):
    rec = {"timestamp": 1000.0, "input_length": 40, "output_length": 48, "hash_ids": [1, 2],
           "output_hash_ids": [3, 4, 5], "block_size": BS, "capture": "abcd0123"}
    rec.update(kw)
    return {k: v for k, v in rec.items() if v is not None}


def test_the_reader_carries_the_field_and_refuses_a_bad_one_naming_file_line_and_field(tmp_path):
    t = read_mooncake(_write(tmp_path, [_record(), _record(output_hash_ids=None, output_length=1)]))
    assert [r.output_hash_ids for r in t.requests] == [(3, 4, 5), None]
    bad = [
        (dict(output_hash_ids=[3, 4]), r"cap.jsonl:2: field 'output_hash_ids' has 2 ids but input_length 40 and "
                                       r"output_length 48 leave 3 full blocks of 16"),
        (dict(output_hash_ids=[3, 4, 5], output_length=8), r"field 'output_hash_ids' has 3 ids .* leave 0"),
        (dict(output_hash_ids="3,4,5"), r"cap.jsonl:2: field 'output_hash_ids' must be a list of ints, got str"),
        (dict(output_hash_ids=[3, -4, 5]), r"field 'output_hash_ids' must hold ints >= 0, found -4"),
        (dict(output_hash_ids=[3, True, 5]), r"field 'output_hash_ids' must hold ints >= 0, found True"),
        (dict(output_hash_ids=[3, 2**64, 5]), r"field 'output_hash_ids' holds an id of 65 bits"),
        (dict(hash_ids=[1]), r"field 'output_hash_ids' continues the prompt's 2 full blocks, but 'hash_ids' names "
                             r"only 1"),
    ]
    for fields, message in bad:
        with pytest.raises(ValueError, match=message):
            read_mooncake(_write(tmp_path, [_record(), _record(**fields)]))
    with pytest.raises(ValueError, match="request 0: output_hash_ids has 2 ids but input_length 40"):
        Trace("t", BS, [Request(0.0, 40, 48, (1, 2), 0, output_hash_ids=(3, 4))])


def test_plan_reads_a_capture_with_the_field_and_credits_the_re_sent_reply(tmp_path, capsys):
    records = [_record(), _record(timestamp=200000.0, input_length=96, output_length=4, hash_ids=[1, 2, 3, 4, 5, 6],
                                  output_hash_ids=[])]
    older = [{k: v for k, v in r.items() if k != "output_hash_ids"} for r in records]   # a capture without it
    for path, gpu_hits in ((_write(tmp_path, records), 5), (_write(tmp_path, older, "older.jsonl"), 2)):
        for extra in ((), ("--engine-steps",)):
            assert main(["plan", str(path), "--json", "--quiet", "--gpu-blocks", "31", "--host-blocks", "16",
                         "--decode-tokens-per-s", "1", *extra]) == 0
            o = json.loads(capsys.readouterr().out)
            assert o["gpu_hit_blocks"] == o["with_concurrency"]["gpu_hit_blocks"] == gpu_hits


def test_the_chat_generator_names_each_reply_by_the_ids_the_next_turn_gives_it():
    trace = generate_chat(ChatWorkload(sessions=40, seed=2))
    by_session = {}
    for r in trace.requests:
        by_session.setdefault(r.session, []).append(r)
    followed = 0
    for turns in by_session.values():
        for a, b in zip(turns, turns[1:]):
            full = a.input_length // trace.block_size
            assert b.input_length >= a.input_length + a.output_length          # the next turn holds the reply
            assert b.hash_ids[:full + len(a.output_hash_ids)] == a.hash_ids[:full] + a.output_hash_ids
            followed += bool(a.output_hash_ids)
    assert followed > 50
    # the replays credit them: more GPU hits than with the reply's blocks unnamed
    stripped = Trace(trace.name, trace.block_size,
                     [Request(r.timestamp, r.input_length, r.output_length, r.hash_ids, r.session)
                      for r in trace.requests])
    with_ids = replay(prepare_trace(trace), 400, 0, "lru", trace.block_size)
    without = replay(prepare_trace(stripped), 400, 0, "lru", trace.block_size)
    assert with_ids.gpu_hit_blocks > without.gpu_hit_blocks
