"""Concurrent requests with the host tier through LMDeploy 0.18's real PyTorch engine, on CPU.

``test_engine_hosttier`` sends one request at a time.  Here four conversations send each turn together (a
*wave*: ``engine_runner``'s ``wave``), so the host tier serves requests that share steps: a load starts beside
other requests' loaded prefixes still waiting for or in their prefill (LMDeploy's load coordinator tracks more
than one at once: checked; it admits a load only when its *free* blocks cover the whole prefill beside the other
loads' tails, so on this squeezed cache two copies seldom run at the same moment), requests wait for room while
another's load holds blocks, demotions land while loads are in flight, and a request may ask for a prefix whose
demotion has not landed yet (it then recomputes that part: counted in ``lookups_behind_demotion``).  Every
host-tier copy lands two worker polls late (``copy_delay_polls``, as a GPU copy may), so loads and demotions stay
in flight across steps.  A last wave forks four new conversations off the first block of the four others, so a
restored page is also read on its own.  The tier engine's GPU cache holds 12 blocks of 16 tokens (four first
turns need 16), the stock engine 256, with the extension disabled.

The two engines batch the requests differently (a load takes steps, a squeezed cache admits fewer at once),
and on CPU LMDeploy's forward is batch dependent in fp16's last bits, so both children run with
``batch_invariant`` (row-by-row linear, a fixed decode-attention split): a request's tokens then depend only
on its prompt and the KV it attends to, and a lossless host tier must give stock LMDeploy's outputs token for
token.  The negative control, under the same concurrency: multi-block loads written into their pages in
reverse order (right bytes, wrong pages: only the forks can catch it): the comparison can fail.
"""
import time

import pytest

from lmdeploy_hostcache.testing.compare import compare_token_outputs
from lmdeploy_hostcache.testing.engine_runner import multi_turn_script, run_in_subprocess
from lmdeploy_hostcache.testing.models import write_tiny_model

pytestmark = pytest.mark.e2e

CONVERSATIONS = 4
TURNS = 3
BLOCK = 16


def _script() -> list[dict]:
    """Four conversations, each turn of all four sent together (a wave); then a last wave of four new
    conversations (E-H) whose prompts share only the first block of A's to D's: they read a restored chain's first
    page on its own, at its own position, so a restore that put the right bytes in the wrong pages shows."""
    turns = multi_turn_script(conversations=CONVERSATIONS, turns=TURNS, first_tokens=40, later_tokens=8,
                              max_new_tokens=2, seed=0)
    script = [dict(turn, wave=k // CONVERSATIONS) for k, turn in enumerate(turns)]
    forks = multi_turn_script(conversations=CONVERSATIONS, turns=1, first_tokens=24, max_new_tokens=2, seed=1)
    for fork, name, source in zip(forks, "EFGH", turns):
        script.append(dict(fork, conv=name, new=source["new"][:BLOCK] + fork["new"], wave=TURNS))
    return script


SCRIPT = _script()
ENGINE = dict(max_batch_size=CONVERSATIONS)
HOST = dict(host_cache_gb=0.01, config=dict(min_restore_tokens=0, pin_memory=False))
DELAY_POLLS = 2          # every host-tier copy lands two worker polls late: loads stay in flight across steps


def _run(model, runs, stock):
    t0 = time.perf_counter()
    spec = dict(model=model, fake_sms=2, threads=1, batch_invariant=True, runs=runs, script=SCRIPT,
                disable_extension=stock)
    out = run_in_subprocess(spec, timeout=900)
    for name, r in out["runs"].items():
        print(f"[e2e timing] concurrent {name}: engine build {r['build_s']} s, run {r['seconds']} s")
    print(f"[e2e timing] child process ({'stock LMDeploy' if stock else 'with the extension'}) wall "
          f"{time.perf_counter() - t0:.1f} s")
    assert out["extension_hooked"] is not stock
    return out["runs"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    model = str(write_tiny_model(tmp_path_factory.mktemp("tiny") / "tinylm-llama", "llama", seed=0))
    stock = _run(model, [dict(name="stock", engine=dict(ENGINE, num_gpu_blocks=256))], stock=True)
    tier = dict(name="tier", engine=dict(ENGINE, num_gpu_blocks=12), host_cache=HOST, copy_delay_polls=DELAY_POLLS)
    reversed_ = dict(tier, name="reversed", inject="reverse_blocks_on_load")
    return {**stock, **_run(model, [tier, reversed_], stock=False)}


def test_concurrent_requests_with_the_host_tier_equal_stock(runs):
    stock, tier = runs["stock"], runs["tier"]
    cmp = compare_token_outputs(stock["outputs"], tier["outputs"])
    ht = tier["host_tier"]
    print(f"[e2e] concurrent waves of {CONVERSATIONS}: {cmp.summary()}; at most {tier['max_loads_copying']} loads "
          f"copying and {tier['max_load_records']} tracked at once; host tier {ht}")
    assert cmp.total_requests == len(SCRIPT) and cmp.total_tokens == sum(t["max_new_tokens"] for t in SCRIPT)
    assert cmp.identical, cmp.summary()
    assert ht["restored_tokens"] > 0 and ht["restore_failures"] == 0 and ht["demotion_failures"] == 0, ht
    # a load started while another request's loaded prefix still waited for or ran its prefill; the squeezed
    # engine lost prefixes from the GPU and the host tier made up for them
    assert tier["max_load_records"] >= 2
    assert tier["gpu_prefix_hit_tokens"] < stock["gpu_prefix_hit_tokens"]
    assert stock["max_load_records"] == 0
    # every prefix token stock LMDeploy reused came from the GPU or a restore, except in turns whose lookup met a
    # block still being demoted (a request asking for a prefix the step before evicted): those recompute the
    # rest of their prefix (at most the whole prompt), and the outputs stay equal
    short = stock["gpu_prefix_hit_tokens"] - tier["gpu_prefix_hit_tokens"] - ht["restored_tokens"]
    longest = max(r["prompt_tokens"] for r in tier["requests"].values())
    print(f"[e2e] prefix tokens recomputed against stock: {short}; turns behind a demotion: "
          f"{ht['lookups_behind_demotion']}")
    assert 0 <= short <= ht["lookups_behind_demotion"] * longest, (short, ht)


def test_negative_control_under_concurrency(runs):
    """Restores of the right bytes into the wrong pages (a multi-block load written in reverse page order), under
    the same concurrency, must change outputs: the equality can fail.  Only a page read at its own position shows
    it, so the forks must differ.  (Restores of zeroed bytes, which every restoring turn shows, are the serial
    test's control, ``test_engine_hosttier``; under this concurrency they changed 9 of 16 requests when run.)"""
    stock, bad = runs["stock"], runs["reversed"]
    cmp = compare_token_outputs(stock["outputs"], bad["outputs"])
    print(f"[e2e] concurrent, reversed restores: {cmp.summary()}")
    assert bad["host_tier"]["restored_tokens"] > 0 and bad["max_load_records"] >= 2
    firsts = [rid for rid in stock["outputs"] if rid[0] < "E" and rid.endswith("0")]
    assert not any(rid in cmp.first_difference for rid in firsts)   # the first turns restore nothing
    assert any(rid[0] >= "E" for rid in cmp.first_difference), cmp.summary()
