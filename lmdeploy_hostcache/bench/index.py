"""Digest + host-index cost per block, against LMDeploy's own BlockTrie.match on the same prompt.

What is timed (every figure is a median over ``--repeats`` rounds, divided by the block count;
the rounds interleave our operations with LMDeploy's so machine noise hits both alike):

* ``digest``: ``chain_digests`` over the prompt (xxh3-128 chain + token bytes per block);
* ``index lookup``: ``HostIndex.lookup`` with every block resident (dict walk + exact token
  compare per block);
* ``host lookup`` = digest + index lookup in one timed region: the scheduler's whole cost of
  asking the host tier "how many blocks do you hold?" for a prompt it has not hashed before.
  This is the figure compared with LMDeploy;
* ``BlockTrie.match``: LMDeploy 0.18's real ``Scheduler`` built on CPU (prefix caching on), its
  trie holding the same blocks; one ``match`` call on a fresh sequence of the same prompt.  It
  does its own hashing (``hash(tuple(tokens))`` per block), the child-dict walk, an exact
  ``np.array_equal`` per block and the ref/access-time bookkeeping of the matched blocks;
* ``prepare_load``: pinning + touching the looked-up blocks (our counterpart of match's refcount
  bookkeeping), shown separately because the scheduler pays it only for blocks it will load;
* ``insert``: ``prepare_store`` + ``complete_store(ok)`` into free slots; ``insert+evict``: the
  same into a full index (each store evicts one leaf-first victim); ``evict``: ``evict(n)``.

``metadata_bytes_per_block`` is a tracemalloc measurement: everything a ``HostIndex`` (slot
allocator, policy, dicts, sets, ``HostBlock`` objects, digest ints and the stored token bytes)
still holds after N blocks were hashed and inserted and the caller's own lists were dropped,
divided by N.

``--scale N`` (0: off) adds an index of N single-block chains (every block an eviction candidate, the
policy's heaviest case), each block touched ``SCALE_TOUCHES`` times in turn: the mean and the slowest
single touch (a touch that pays for a whole-heap rebuild shows here), and the index's bytes per block
after those touches (tracemalloc), per policy of ``--scale-policies``.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import tracemalloc
from typing import Callable

import numpy as np

from ..planner.cli import _nonneg_int
from ..tier.digest import Namespace, chain_digests
from ..tier.host_index import HostIndex

LOOKUP_RATIO_TARGET = 0.5
METADATA_BYTES_TARGET = 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--blocks", type=int, default=512, help="full blocks in the prompt (default 512)")
    parser.add_argument("--block-size", type=int, default=64, help="tokens per block (default 64)")
    parser.add_argument("--repeats", type=int, default=25, help="timed rounds; medians are reported (default 25)")
    parser.add_argument("--metadata-blocks", type=int, default=4096,
                        help="blocks inserted for the tracemalloc metadata measurement (default 4096)")
    parser.add_argument("--vocab", type=int, default=128256, help="token ids are drawn from [0, vocab)")
    parser.add_argument("--seed", type=_nonneg_int, default=0, help="RNG seed of the prompt tokens")
    parser.add_argument("--scale", type=int, default=0, metavar="N",
                        help="also fill an index of N single-block chains, touch every block 4 times, and report "
                             "the slowest single touch and bytes per block (default 0: off)")
    parser.add_argument("--scale-policies", nargs="+", default=["lru"], metavar="POLICY",
                        help="eviction policies of the --scale index (default lru)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


MAX_PROMPT_TOKENS = 1 << 28   # 2 GiB of int64 token ids: far past any model's context


def _check_args(args: argparse.Namespace) -> None:
    # upper bounds: the bench allocates arrays of these sizes, so a typo must not ask for terabytes
    # block size 2 at least: the prompt is one token past its full blocks, which at block size 1 is one more block
    for name, low, high in (("blocks", 1, 10**8), ("block_size", 2, 1 << 16), ("repeats", 1, 10**6),
                            ("metadata_blocks", 1, 10**8), ("vocab", 2, 2**32),   # vocab: tokens are uint32
                            ("scale", 0, 10**8)):
        value = getattr(args, name)
        if not low <= value <= high:
            raise ValueError(f"--{name.replace('_', '-')} must be in [{low}, {high}], got {value}")
    for name in ("blocks", "metadata_blocks"):   # a prompt (or the metadata index's tokens) of that many int64 ids
        tokens = getattr(args, name) * args.block_size
        if tokens > MAX_PROMPT_TOKENS:
            raise ValueError(f"--{name.replace('_', '-')} x --block-size must be at most {MAX_PROMPT_TOKENS:,} tokens, "
                             f"got {tokens:,}")
    from ..tier.eviction import POLICIES

    bad = [p for p in args.scale_policies if p not in POLICIES]
    if bad:
        raise ValueError(f"--scale-policies: unknown {', '.join(bad)}; choose from {', '.join(sorted(POLICIES))}")


def _timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` took, with the cyclic GC held off (it would land on either side)."""
    gc.disable()
    try:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    finally:
        gc.enable()


def _filled_index(num_slots: int, namespace: Namespace, digests: list[int], blocks: list[bytes]) -> HostIndex:
    idx = HostIndex(num_slots)
    parent = namespace.root
    for d, b in zip(digests, blocks):
        if idx.prepare_store(d, parent, b) is None:
            raise RuntimeError("benchmark setup: prepare_store refused a block of an index with free slots")
        idx.complete_store(d, True)
        parent = d
    return idx


def _insert_chain(idx: HostIndex, parent: int, digests: list[int], blocks: list[bytes]) -> None:
    for d, b in zip(digests, blocks):
        idx.prepare_store(d, parent, b)
        idx.complete_store(d, True)
        parent = d


class _LMDeployTrie:
    """LMDeploy's real Scheduler on CPU whose BlockTrie holds every block of ``tokens``."""

    def __init__(self, tokens: np.ndarray, block_size: int, num_blocks: int) -> None:
        import torch
        from lmdeploy.pytorch.config import CacheConfig, SchedulerConfig
        from lmdeploy.pytorch.messages import SequenceMeta
        from lmdeploy.pytorch.paging.scheduler import Scheduler
        from lmdeploy.pytorch.strategies.ar.sequence import ARSequenceStrategy

        n_tokens = len(tokens)
        cache_config = CacheConfig(max_batches=4, block_size=block_size, num_cpu_blocks=0,
                                   num_gpu_blocks=2 * num_blocks + 64, enable_prefix_caching=True,
                                   device_type="cpu", max_prefill_token_num=n_tokens + block_size)
        scheduler_config = SchedulerConfig(max_batches=4, max_session_len=n_tokens + 2 * block_size)
        self.scheduler = Scheduler(scheduler_config, cache_config,
                                   seq_meta=SequenceMeta(block_size, strategy=ARSequenceStrategy()))
        self.trie = self.scheduler.block_trie
        self._tokens = torch.from_numpy(tokens)
        # Admission attaches the prompt's full blocks to the trie; ending the session leaves them
        # cached there with only the trie's own reference, as after a finished request.
        self.scheduler.add_session(0)
        self.scheduler.sessions[0].add_sequence(self._tokens)
        running = self.scheduler.schedule(is_prefill=True).running
        if len(running) != 1:
            raise RuntimeError(f"LMDeploy scheduler admitted {len(running)} sequences, expected 1")
        self.scheduler.end_session(0)
        self.session = self.scheduler.add_session(1)
        self.num_blocks = num_blocks
        self.free_blocks_at_rest = self.scheduler.block_manager.get_num_free_gpu_blocks()

    def fresh_sequence(self):
        return self.session.add_sequence(self._tokens)

    def match(self, seq) -> None:
        self.trie.match(seq)

    def release(self, seq) -> int:
        """Drop a matched sequence (untimed); returns how many blocks its match took."""
        matched = len(seq.logical_blocks)
        self.session.remove_sequence(seq)
        free = self.scheduler.block_manager.get_num_free_gpu_blocks()
        if free != self.free_blocks_at_rest:
            raise RuntimeError(f"LMDeploy block refs leaked: {free} free GPU blocks, expected "
                               f"{self.free_blocks_at_rest}")
        return matched


def measure_metadata_bytes(namespace: Namespace, num_blocks: int, prompt_blocks: int, seed: int,
                           vocab: int) -> dict[str, float]:
    """Bytes a HostIndex holds per resident block (tracemalloc, see the module docstring).

    Blocks come from ``ceil(num_blocks / prompt_blocks)`` independent prompts (chains), each
    hashed inside the traced region so the digest ints and token bytes the index keeps count.
    """
    rng = np.random.default_rng(seed + 1)
    n_chains = -(-num_blocks // prompt_blocks)
    prompts = [rng.integers(0, vocab, size=prompt_blocks * namespace.block_size, dtype=np.int64)
               for _ in range(n_chains)]
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        idx = HostIndex(num_blocks)
        empty = tracemalloc.get_traced_memory()[0] - base
        inserted = 0
        for p in prompts:
            digests, blocks = chain_digests(namespace, p)
            take = min(len(digests), num_blocks - inserted)
            _insert_chain(idx, namespace.root, digests[:take], blocks[:take])
            inserted += take
            del digests, blocks
        gc.collect()
        total = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    if len(idx) != num_blocks:
        raise RuntimeError(f"metadata measurement inserted {len(idx)} blocks, expected {num_blocks}")
    idx.check_invariants()
    return {
        "metadata_bytes_per_block": total / num_blocks,
        "metadata_bytes_per_block_excl_empty_index": (total - empty) / num_blocks,
        "metadata_empty_index_bytes_per_slot": empty / num_blocks,
        "metadata_blocks_measured": num_blocks,
        "metadata_token_bytes_per_block": namespace.block_size * 4,
    }


SCALE_TOUCHES = 4


def _scale_index(num_blocks: int, policy: str, seed: int) -> tuple[HostIndex, float, float]:
    """An index of ``num_blocks`` single-block chains, each block touched ``SCALE_TOUCHES`` times in turn;
    also the summed and the slowest single touch (s)."""
    import random

    rnd = random.Random(seed)
    idx = HostIndex(num_blocks, policy=policy)
    digests = []
    for _ in range(num_blocks):
        d = rnd.getrandbits(128)
        idx.prepare_store(d, 7, rnd.randbytes(8))
        idx.complete_store(d, True)
        digests.append(d)
    worst = total = 0.0
    clock = time.perf_counter
    for _ in range(SCALE_TOUCHES):
        for d in digests:
            t0 = clock()
            idx.touch((d,))
            dt = clock() - t0
            total += dt
            worst = max(worst, dt)
    return idx, total, worst


def measure_scale(num_blocks: int, policy: str, seed: int) -> dict[str, float]:
    """``_scale_index`` twice: untraced, for the mean and the slowest single touch; then under tracemalloc
    (its timings discarded), for the bytes per block the index holds after the touches (its token bytes are
    8 per block here)."""
    idx, total, worst = _scale_index(num_blocks, policy, seed)
    idx.check_invariants()
    del idx
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        idx, _, _ = _scale_index(num_blocks, policy, seed)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    touches = SCALE_TOUCHES * num_blocks
    return {"policy": policy, "blocks": num_blocks, "touches": touches, "mean_touch_us": total / touches * 1e6,
            "slowest_touch_ms": worst * 1e3, "bytes_per_block_after_touches": held / num_blocks}


def measure(args: argparse.Namespace) -> dict[str, object]:
    _check_args(args)
    bs, nb, repeats = args.block_size, args.blocks, args.repeats
    namespace = Namespace(model="bench/index", block_size=bs)
    rng = np.random.default_rng(args.seed)
    # One token past the last full block: LMDeploy always recomputes the last prompt token, so
    # its match covers all ``nb`` blocks only when the prompt has one more token than they hold.
    tokens = rng.integers(0, args.vocab, size=nb * bs + 1, dtype=np.int64)

    lmd = _LMDeployTrie(tokens, bs, nb)
    digests, blocks = chain_digests(namespace, tokens)
    if len(digests) != nb:
        raise RuntimeError(f"chain_digests gave {len(digests)} blocks, expected {nb}")
    other_digests, other_blocks = chain_digests(
        namespace, rng.integers(0, args.vocab, size=nb * bs, dtype=np.int64))

    full = _filled_index(nb, namespace, digests, blocks)
    samples: dict[str, list[float]] = {k: [] for k in (
        "digest", "index_lookup", "host_lookup", "blocktrie_match", "prepare_load",
        "insert", "insert_evict", "evict")}
    matched_blocks = set()
    looked_up = set()
    for _ in range(repeats):
        # --- LMDeploy: a fresh sequence per match (its match mutates the sequence).
        seq = lmd.fresh_sequence()
        samples["blocktrie_match"].append(_timed(lambda: lmd.match(seq)))
        matched_blocks.add(lmd.release(seq))
        # --- ours, on the very array the trie reads (int64 numpy, as in SchedulerSequence).
        prompt = seq.valid_ids
        samples["digest"].append(_timed(lambda: chain_digests(namespace, prompt)))
        samples["index_lookup"].append(_timed(lambda: looked_up.add(full.lookup(digests, blocks))))

        def host_lookup() -> None:
            d, b = chain_digests(namespace, prompt)
            looked_up.add(full.lookup(d, b))

        samples["host_lookup"].append(_timed(host_lookup))
        samples["prepare_load"].append(_timed(lambda: full.prepare_load(digests)))
        full.complete_load(digests, success=False)  # untimed: unpin, blocks stay resident
        # --- insert into free slots, evict everything, insert into a full index.
        idx = HostIndex(nb)
        samples["insert"].append(_timed(lambda: _insert_chain(idx, namespace.root, digests, blocks)))
        samples["insert_evict"].append(
            _timed(lambda: _insert_chain(idx, namespace.root, other_digests, other_blocks)))
        if idx.stats.evictions != nb:
            raise RuntimeError(f"insert into a full index evicted {idx.stats.evictions} blocks, expected {nb}")
        evicted = []
        samples["evict"].append(_timed(lambda: evicted.append(idx.evict(nb))))
        if evicted != [nb] or len(idx):
            raise RuntimeError(f"evict({nb}) removed {evicted}, {len(idx)} blocks left")
        idx.check_invariants()
    if matched_blocks != {nb}:
        raise RuntimeError(f"BlockTrie.match matched {sorted(matched_blocks)} blocks, expected {nb}")
    if looked_up != {nb}:
        raise RuntimeError(f"HostIndex.lookup returned {sorted(looked_up)} blocks, expected {nb}")
    full.check_invariants()

    per_block = {k: statistics.median(v) * 1e6 / nb for k, v in samples.items()}
    spread = {k: (min(v) * 1e6 / nb, max(v) * 1e6 / nb) for k, v in samples.items()}
    result: dict[str, object] = {
        "host_lookup_us_per_block": per_block["host_lookup"],
        "blocktrie_match_us_per_block": per_block["blocktrie_match"],
        "lookup_ratio": per_block["host_lookup"] / per_block["blocktrie_match"],
        "digest_us_per_block": per_block["digest"],
        "index_lookup_us_per_block": per_block["index_lookup"],
        "index_lookup_ratio": per_block["index_lookup"] / per_block["blocktrie_match"],
        "prepare_load_us_per_block": per_block["prepare_load"],
        "insert_us_per_block": per_block["insert"],
        "insert_evict_us_per_block": per_block["insert_evict"],
        "evict_us_per_block": per_block["evict"],
    }
    result.update(measure_metadata_bytes(namespace, args.metadata_blocks, nb, args.seed, args.vocab))
    result.update({
        "lookup_ratio_target": LOOKUP_RATIO_TARGET,
        "metadata_bytes_target": METADATA_BYTES_TARGET,
        "lookup_ratio_ok": result["lookup_ratio"] <= LOOKUP_RATIO_TARGET,
        "metadata_ok": result["metadata_bytes_per_block"] <= METADATA_BYTES_TARGET,
        "blocks": nb,
        "block_size": bs,
        "prompt_tokens": len(tokens),
        "repeats": repeats,
        "min_max_us_per_block": spread,
        "python": sys.version.split()[0],
    })
    result["scale"] = [measure_scale(args.scale, p, args.seed) for p in args.scale_policies] if args.scale else []
    return result


_ROWS = (
    ("digest (xxh3-128 chain + token bytes)", "digest_us_per_block"),
    ("index lookup (512 resident, tokens verified)", "index_lookup_us_per_block"),
    ("host lookup = digest + index lookup", "host_lookup_us_per_block"),
    ("LMDeploy BlockTrie.match (its hash + walk + refs)", "blocktrie_match_us_per_block"),
    ("prepare_load (pin + touch), not in the ratio", "prepare_load_us_per_block"),
    ("insert: prepare_store + complete_store", "insert_us_per_block"),
    ("insert into a full index (evicts one each)", "insert_evict_us_per_block"),
    ("evict (leaf-first, LRU)", "evict_us_per_block"),
)


def format_table(r: dict[str, object]) -> str:
    lines = [f"bench index: {r['prompt_tokens']}-token prompt = {r['blocks']} blocks of {r['block_size']} "
             f"tokens (+1 token, recomputed by LMDeploy), median of {r['repeats']} interleaved rounds",
             f"{'operation':<52}{'us/block':>10}{'min':>9}{'max':>9}"]
    spread = r["min_max_us_per_block"]
    for label, key in _ROWS:
        lo, hi = spread[key.removesuffix("_us_per_block")]
        lines.append(f"{label:<52}{r[key]:>10.3f}{lo:>9.3f}{hi:>9.3f}")
    ok = lambda flag: "ok" if flag else "MISSED"  # noqa: E731
    lines += [
        "",
        f"lookup_ratio = host lookup / BlockTrie.match = {r['lookup_ratio']:.3f} "
        f"(target <= {r['lookup_ratio_target']}: {ok(r['lookup_ratio_ok'])}); "
        f"index lookup alone: {r['index_lookup_ratio']:.3f}",
        f"metadata: {r['metadata_bytes_per_block']:.0f} bytes per host block over "
        f"{r['metadata_blocks_measured']} blocks (target <= {r['metadata_bytes_target']}: "
        f"{ok(r['metadata_ok'])}); {r['metadata_token_bytes_per_block']} of them are the stored tokens, "
        f"{r['metadata_empty_index_bytes_per_slot']:.0f} the empty index per slot",
        "",
        "Both sides start from token ids (int64 numpy, the sequence's own valid_ids) and verify every",
        "matched block exactly. BlockTrie.match also takes a ref and updates access time per block;",
        "our counterpart is prepare_load, paid only for blocks actually loaded, shown above.",
    ]
    for sc in r.get("scale", ()):
        lines.append(f"scale ({sc['policy']}): {sc['blocks']:,} single-block chains, {sc['touches']:,} touches: "
                     f"mean {sc['mean_touch_us']:.2f} us, slowest single touch {sc['slowest_touch_ms']:.1f} ms; "
                     f"{sc['bytes_per_block_after_touches']:.0f} bytes per block after (8 of them tokens)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        result = measure(args)
    except ValueError as exc:
        print(f"error: bench index: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(format_table(result))
    return 0
