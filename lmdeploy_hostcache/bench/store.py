"""The store row of ``bench transfer``: Mooncake Store put/get throughput on loopback.

Starts its own ``mooncake_master`` on 127.0.0.1 (``l3.master.LoopbackMaster``), opens one client
(TCP, ``P2PHANDSHAKE``) that also contributes the segment, and times, per block size, a batch of
``blocks`` checksummed block objects through ``L3Client.put_blocks`` and back through
``L3Client.get_blocks`` (encode + checksum + store round trip + verify: what the engine's chain
pays per block). Each round uses fresh keys and removes them afterwards (``force``), so every
put really writes; figures are medians of ``repeats`` rounds, bytes counted as payload bytes.
Loopback through one client is a lower bound for the network part and an upper bound for
nothing: the same machine plays client and segment owner.

Invariant: the master and the client are stopped before ``store_rows`` returns, on every path.
"""
from __future__ import annotations

import os
import statistics
import time

KIB = 1024


def store_rows(sizes_kib: list[int], blocks: int, repeats: int) -> tuple[list[dict], str | None]:
    """(rows, None) or ([], why-not) when the Mooncake client cannot run here."""
    from ..tier.digest import Namespace, chain_digests
    from ..l3.backend import open_mooncake
    from ..l3.client import L3Client
    from ..l3.config import parse_l3_section
    from ..l3.keys import StoreKeyspace
    from ..l3.master import LoopbackMaster, loopback_env, mooncake_import_error

    why = mooncake_import_error()
    if why:
        return [], why
    loopback_env()
    biggest = max(sizes_kib) * KIB * blocks
    segment_mb = max(64, 2 * biggest // (1 << 20) + 16)
    rows = []
    with LoopbackMaster() as master:
        cfg = parse_l3_section({"master_address": master.address, "global_segment_gb": segment_mb / 1024,
                                "local_buffer_gb": max(32, biggest // (1 << 20) + 16) / 1024,
                                "timeout_ms": 60_000})
        client = L3Client(open_mooncake(cfg), timeout_s=cfg.timeout_s, buffer_bytes=cfg.local_buffer_bytes)
        try:
            for kib in sizes_kib:
                nbytes = kib * KIB
                payloads = [os.urandom(nbytes) for _ in range(blocks)]
                put_t, get_t = [], []
                for r in range(repeats):
                    space = StoreKeyspace(Namespace(model="bench", block_size=16, kv_format=f"r{r}/{kib}"))
                    digests, tokens = chain_digests(space.namespace, list(range(16 * blocks)))
                    t0 = time.perf_counter()
                    stored = client.put_blocks(space, digests, tokens, payloads, strict=True)
                    t1 = time.perf_counter()
                    got = client.get_blocks(space, digests, tokens, nbytes)
                    t2 = time.perf_counter()
                    if not all(stored) or [bytes(g) for g in got] != payloads:
                        raise RuntimeError(f"store round trip of {kib} KiB blocks was not byte-exact")
                    put_t.append(t1 - t0)
                    get_t.append(t2 - t1)
                    client.backend.batch_remove(space.keys(digests), True)
                total = nbytes * blocks
                rows.append({"block_kib": kib, "blocks": blocks, "bytes": total,
                             "put_gbps": total / statistics.median(put_t) / 1e9,
                             "get_gbps": total / statistics.median(get_t) / 1e9,
                             "put_ms_per_block": 1e3 * statistics.median(put_t) / blocks,
                             "get_ms_per_block": 1e3 * statistics.median(get_t) / blocks})
        finally:
            client.close()
    return rows, None
