"""The host tier end to end through LMDeploy 0.18's real PyTorch engine, on CPU.

Every test runs its engines in a child process (``engine_runner``) with the CPU shim, a
tiny random-weight checkpoint and three interleaved two-turn conversations (each turn's
prompt = previous prompt + reply + new tokens). The *tier* engine's GPU KV cache holds 8
blocks of 16 tokens, so the first turns' prefixes are evicted from the GPU (demoted to
host) before the second turns ask for them; the *stock* engine (no host tier) has 256
blocks and keeps every prefix on the GPU. Both reuse cached KV for the second turns, so
with a lossless host format greedy outputs must be equal token for token, and the tier
engine's GPU hits plus host restores must cover exactly the prefix the stock engine hit.
Two generated tokens per request: the first comes from the prefill (attention over the
restored prefix through LMDeploy's flatten/flash-prefill kernels), the second from a decode
step (paged decode attention over the same blocks). The Llama fp16 engines (stock, tier,
a fault-injected tier, int8 and int4 host formats) and the other configurations run in two
child processes (stock LMDeploy with the extension disabled; the tier engines), which print
each engine's build and run time.
"""
import time

import pytest

from lmdeploy_hostcache.testing.compare import compare_token_outputs
from lmdeploy_hostcache.testing.engine_runner import multi_turn_script, run_in_subprocess
from lmdeploy_hostcache.testing.models import write_tiny_model

pytestmark = pytest.mark.e2e

SQUEEZED_BLOCKS = 8     # 128 tokens: one conversation fits, three do not
ROOMY_BLOCKS = 256
HOST = dict(host_cache_gb=0.01, config=dict(min_restore_tokens=0, pin_memory=False))
SCRIPT = multi_turn_script(conversations=3, turns=2, first_tokens=40, later_tokens=8, max_new_tokens=2, seed=0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {arch: str(write_tiny_model(root / f"tinylm-{arch}", arch, seed=0)) for arch in ("llama", "qwen2")}


def _run(model, runs, timeout=600, stock=False):
    t0 = time.perf_counter()
    spec = dict(model=model, fake_sms=2, threads=1, runs=runs, script=SCRIPT, disable_extension=stock)
    out = run_in_subprocess(spec, timeout=timeout)
    wall = time.perf_counter() - t0
    for name, r in out["runs"].items():
        print(f"[e2e timing] {name}: engine build {r['build_s']} s, run {r['seconds']} s "
              f"({len(r['outputs'])} requests)")
    print(f"[e2e timing] child process ({'stock LMDeploy' if stock else 'with the extension'}) wall {wall:.1f} s")
    assert out["extension_hooked"] is not stock
    return out["runs"]


def _stock(qp):
    return dict(name="stock", engine=dict(num_gpu_blocks=ROOMY_BLOCKS, quant_policy=qp))


def _tier(qp, name="tier", host_kv_format="same"):
    hc = dict(HOST, config=dict(HOST["config"], host_kv_format=host_kv_format))
    return dict(name=name, engine=dict(num_gpu_blocks=SQUEEZED_BLOCKS, quant_policy=qp), host_cache=hc)


def _check_restores(tier, stock):
    ht = tier["host_tier"]
    assert ht is not None, "the host tier is not active in the tier engine"
    assert stock["host_tier"] is None
    assert ht["demotions"] > 0 and ht["restored_tokens"] > 0, ht
    assert ht["restore_failures"] == 0 and ht["demotion_failures"] == 0, ht
    # the squeezed engine really lost prefixes from the GPU, and host restores made up for exactly that
    assert tier["gpu_prefix_hit_tokens"] < stock["gpu_prefix_hit_tokens"]
    assert tier["gpu_prefix_hit_tokens"] + ht["restored_tokens"] == stock["gpu_prefix_hit_tokens"], (tier, stock)


@pytest.fixture(scope="module")
def runs(models):
    """Every engine of this module, in two child processes (engines of a process share the
    interpreter warm-up): per quant policy and architecture a stock engine (stock LMDeploy, the
    extension disabled) and a tier engine, plus on the Llama fp16 cache a tier whose restores are
    zeroed (negative control) and the int8/int4 host formats."""
    def named(run, key, model):
        return dict(run, name=f"{key}/{run['name']}", model=model)

    llama, qwen2 = models["llama"], models["qwen2"]
    configs = (("llama-0", llama, 0), ("llama-4", llama, 4), ("llama-8", llama, 8), ("qwen2-0", qwen2, 0))
    # the reference: stock LMDeploy (LMDEPLOY_HOSTCACHE_DISABLE=1, the package never hooks in)
    stock = _run(llama, [named(_stock(qp), key, model) for key, model, qp in configs], timeout=900, stock=True)
    plan = [named(_tier(qp), key, model) for key, model, qp in configs]
    plan += [named(dict(_tier(0, "zeroed"), inject="zero_host_slots_on_load"), "llama-0", llama),
             named(_tier(0, "int8", "int8"), "llama-0", llama), named(_tier(0, "int4", "int4"), "llama-0", llama)]
    tier = _run(llama, plan, timeout=1200)
    grouped = {}
    for name, result in {**stock, **tier}.items():
        key, run = name.split("/")
        grouped.setdefault(key, {})[run] = result
    return grouped


def _lossless(runs, arch, qp):
    stock, tier = runs["stock"], runs["tier"]
    cmp = compare_token_outputs(stock["outputs"], tier["outputs"])
    print(f"[e2e] {arch} quant_policy={qp} host_kv_format=same: {cmp.summary()}; host tier {tier['host_tier']}")
    assert cmp.total_requests == len(SCRIPT) and cmp.total_tokens == sum(t["max_new_tokens"] for t in SCRIPT)
    assert cmp.identical, cmp.summary()
    _check_restores(tier, stock)


@pytest.mark.parametrize("arch,qp", [("llama", 0), ("llama", 4), ("llama", 8), ("qwen2", 0)],
                         ids=["llama-fp16", "llama-int4kv", "llama-int8kv", "qwen2-fp16"])
def test_lossless_host_tier_equals_stock(runs, arch, qp):
    _lossless(runs[f"{arch}-{qp}"], arch, qp)


def test_negative_control_wrong_restored_kv_changes_outputs(runs):
    """The equality above can fail: zeroing the host slots before each restore (so the GPU
    attends to zero KV for the restored prefix) must change the second turns' outputs."""
    stock, bad = runs["llama-0"]["stock"], runs["llama-0"]["zeroed"]
    cmp = compare_token_outputs(stock["outputs"], bad["outputs"])
    print(f"[e2e] zeroed restores: {cmp.summary()}")
    assert bad["host_tier"]["restored_tokens"] > 0
    firsts = [r for r in stock["outputs"] if r.endswith("0")]
    assert all(r not in cmp.first_difference for r in firsts)  # first turns restore nothing
    assert any(r in cmp.first_difference for r in stock["outputs"] if r.endswith("1")), cmp.summary()


def test_lossy_host_formats_report_agreement(runs):
    runs = runs["llama-0"]
    stock = runs["stock"]
    for fmt in ("int8", "int4"):
        tier = runs[fmt]
        cmp = compare_token_outputs(stock["outputs"], tier["outputs"])
        print(f"[e2e] llama fp16 cache, host_kv_format={fmt}: {cmp.summary()}")
        # lossy: agreement is reported, not required; sanity only
        assert cmp.total_requests == len(SCRIPT) and not cmp.missing_requests and not cmp.extra_requests
        assert all(len(v) == 2 for v in tier["outputs"].values())
        # first turns never touch restored KV, so they must agree exactly
        firsts = {rid: v for rid, v in stock["outputs"].items() if rid.endswith("0")}
        assert compare_token_outputs(firsts, {r: tier["outputs"][r] for r in firsts}).identical
        _check_restores(tier, stock)
    # packed host slots move fewer bytes per restored token than the fp16 cache holds
    # (2 layers x K,V x 2 KV heads x head_dim 16 x 2 bytes = 256 bytes per token)
    per_token = {f: runs[f]["host_tier"]["bytes_to_gpu"] / runs[f]["host_tier"]["restored_tokens"]
                 for f in ("int8", "int4")}
    print(f"[e2e] bytes moved to the GPU per restored token: {per_token} (fp16: 256)")
    assert per_token["int4"] < per_token["int8"] < 256
