"""Block gather/scatter and copy-engine bandwidth, measured in this run.

CPU (always): N scattered blocks of a synthetic LMDeploy-shaped packed pool
(``[layers, pages, page_bytes]`` uint8, one row per layer) gathered into one
contiguous staging buffer with the torch path of ``transfer.gather_blocks``,
against one contiguous ``copy_`` of the same number of bytes from the same pool
into the same staging buffer, for several block sizes; the scatter back is timed the same way.  ``cpu_gather_vs_contiguous`` is
the smallest gather/contiguous ratio among block sizes >= 256 KiB (target >= 0.5).
The int8/int4 rows time the quantizing gather (fp16 pages) on one block size.

CUDA (only when ``torch.cuda.is_available()``): the copy engine's D2H (demotions)
and H2D (loads) GB/s against a plain pinned ``copy_`` of equal size, and the
Triton gather/scatter kernels' GB/s against a device-to-device ``copy_`` of equal
size (target >= 0.8 for batches of >= 16 blocks).

Store (unless ``--no-store``): Mooncake Store put/get GB/s per block size on a loopback master
this run starts and stops (``bench/store.py``), next to the host pool's rows above.  Every figure is a median of
``--repeats`` timed rounds; ratios are computed from the same run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

KIB = 1024
GATHER_RATIO_TARGET = 0.5
KERNEL_RATIO_TARGET = 0.8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--blocks", type=int, default=32, help="blocks moved per round (default 32)")
    parser.add_argument("--sizes-kib", type=str, default="64,256,1024,4096",
                        help="block sizes in KiB, comma separated (default 64,256,1024,4096)")
    parser.add_argument("--layers", type=int, default=32, help="rows (layers) per block (default 32)")
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds; medians are reported (default 9)")
    parser.add_argument("--spread", type=int, default=4,
                        help="pool holds spread x blocks; the moved ids are a random subset (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for the CPU rows (default 1: robust on a shared machine)")
    parser.add_argument("--no-quant", action="store_true", help="skip the int8/int4 quantizing rows")
    parser.add_argument("--no-store", action="store_true",
                        help="skip the Mooncake Store rows (they start a mooncake_master on 127.0.0.1)")
    parser.add_argument("--cuda-only", action="store_true",
                        help="skip the CPU rows (the GPU proof kit: device time is scarce); needs CUDA")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


MAX_SIZE_KIB = 1 << 20


class BadArgs(ValueError):
    """A flag value this bench refuses; ``run`` prints it as one ``error:`` line and returns 2."""


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BadArgs(f"--sizes-kib must be comma-separated integers, got {text!r}") from None
    if not sizes or any(not 0 < s <= MAX_SIZE_KIB for s in sizes):
        raise BadArgs(f"--sizes-kib must hold sizes in [1, {MAX_SIZE_KIB}] KiB (1 GiB), got {text!r}")
    return sizes


# (flag, low, high): the pools are allocated up front from these, so a typo must not ask for terabytes
_BOUNDS = (("blocks", 1, 1 << 20), ("layers", 1, 4096), ("repeats", 1, 10**6), ("spread", 1, 1024),
           ("threads", 1, 4096), ("seed", 0, 2**63 - 1))


def _check_args(args: argparse.Namespace, sizes: list[int]) -> None:
    """Refuse (``BadArgs``) a flag out of its range, a block size the layers do not divide, or a pool
    larger than the memory this machine has available."""
    for name, low, high in _BOUNDS:
        value = getattr(args, name)
        if not low <= value <= high:
            raise BadArgs(f"--{name} must be in [{low}, {high}], got {value}")
    if any(kib * KIB % args.layers for kib in sizes):
        raise BadArgs(f"every --sizes-kib block size must be divisible by --layers {args.layers}, got "
                      f"{','.join(map(str, sizes))} KiB")
    # the largest pool plus its staging buffer (the quantizing rows: 2 x blocks of 256 KiB, and staging)
    need = args.blocks * KIB * max((args.spread + 1) * max(sizes), 0 if args.no_quant else 3 * 256)
    try:
        from ..hostmem import read_host_memory

        avail = read_host_memory().usable_available_bytes
    except Exception:  # psutil missing or /proc unreadable: the flag bounds above still hold
        return
    if need > avail:
        raise BadArgs(f"--blocks {args.blocks} with --spread {args.spread} and --sizes-kib up to "
                      f"{max(sizes)} needs {need / 2**30:.1f} GiB of pools, more than the {avail / 2**30:.1f} GiB "
                      f"available on this machine; lower --blocks")


def _interleaved(fns: dict, repeats: int, sync=None, clock=time.perf_counter) -> dict:
    """Per-round times of every fn, the fns run back to back in each round (noise hits all alike)."""
    for fn in fns.values():
        fn()
    if sync:
        sync()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = clock()
            fn()
            if sync:
                sync()
            times[k].append(clock() - t0)
    return times


def _cpu_clock(torch):
    """Thread CPU time when torch runs single-threaded (time slices lost to other processes on a
    shared machine do not count; memory stalls do), wall time otherwise."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def _ratio(base: list, other: list) -> float:
    """Median over rounds of base/other time (>1: ``other`` is faster than ``base``)."""
    return statistics.median(b / o for b, o in zip(base, other))


def _median_time(fn, repeats: int, sync=None, clock=time.perf_counter) -> float:
    return statistics.median(_interleaved({"fn": fn}, repeats, sync, clock)["fn"])


# GPU rows: each timed operation rotates over buffer sets whose bytes add up to at least this much
# (several times the L2 of the GPUs the kit runs on: 50 MB on an H100, 60 MB on an H200), so no
# launch reads what the one before left in L2; and each figure is the device time of at least
# MIN_LAUNCHES back-to-back launches between two CUDA events.
ROTATE_BYTES = 256 << 20
MIN_LAUNCHES = 50
# torch.cuda._sleep spins for clock cycles; at about 2 GHz (Hopper's boost clock) this many per second
_SLEEP_CYCLES_PER_S = 2e9
_MAX_SLEEP_S = 0.02


def _rotations(nbytes: int, rotate_bytes: int | None = None) -> int:
    """Buffer sets to rotate over so that together they hold at least ``rotate_bytes`` (ROTATE_BYTES)."""
    rotate_bytes = ROTATE_BYTES if rotate_bytes is None else rotate_bytes
    return max(1, -(-rotate_bytes // max(1, nbytes)))


def _device_times(cuda, fns: dict, repeats: int, launches: int) -> tuple[dict, dict]:
    """Per-launch device seconds of each op, per round, and the host seconds to enqueue one launch.

    ``fns`` maps a name to a list of variants (one per rotating buffer set); a round launches
    ``launches`` of them back to back (variant ``i % len``) between two CUDA events, the ops
    interleaved in each round. Before each round the GPU is held (``cuda._sleep``) about as long as
    the host takes to enqueue the round, so the launches queue up and the events time the device
    work, not the host's launch overhead; that overhead is reported apart (``enqueue``).
    """
    for variants in fns.values():  # warm-up: compile, first touch of every buffer
        for f in variants:
            f()
    cuda.synchronize()
    enqueue = {}
    for k, variants in fns.items():
        t0 = time.perf_counter()
        for i in range(launches):
            variants[i % len(variants)]()
        enqueue[k] = (time.perf_counter() - t0) / launches
        cuda.synchronize()
    sleep = getattr(cuda, "_sleep", None)
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, variants in fns.items():
            start, end = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)
            if sleep is not None:
                sleep(int(min(_MAX_SLEEP_S, 1.5 * enqueue[k] * launches) * _SLEEP_CYCLES_PER_S) + 1)
            start.record()
            for i in range(launches):
                variants[i % len(variants)]()
            end.record()
            end.synchronize()
            times[k].append(start.elapsed_time(end) / 1e3 / launches)
    return times, enqueue


def _make_pool(torch, layers: int, num_blocks: int, block_bytes: int, device, dtype=None):
    """A packed pool like LMDeploy's: rows ``pool[l]`` of ``[pages, page_bytes]``; 1 page per block."""
    from ..transfer import KVRowLayout, TensorSpec

    page_bytes = block_bytes // layers
    pool = torch.empty((layers, num_blocks, page_bytes), dtype=torch.uint8, device=device)
    pool.view(-1)[:: 4099] = 1  # touch pages cheaply; contents do not matter for raw copies
    caches = {f"cache_pool.0.row.{i}": pool[i] for i in range(layers)}
    specs = None
    if dtype is not None:  # K and V halves of fp16 [tokens, heads, 128]
        half = page_bytes // 2
        tokens_heads = half // (128 * dtype.itemsize)
        specs = [TensorSpec("k_cache", (tokens_heads, 1, 128), dtype), TensorSpec("v_cache", (tokens_heads, 1, 128),
                                                                                  dtype)]
        pool.view(dtype).normal_()
    return pool, caches, KVRowLayout.from_connector_caches(caches, 1, specs)


def _cpu_rows(torch, args, sizes):
    from ..transfer import gather_blocks, scatter_blocks

    g = torch.Generator().manual_seed(args.seed)
    rows = []
    for kib in sizes:
        block_bytes = kib * KIB
        num_blocks = args.blocks * args.spread
        pool, caches, layout = _make_pool(torch, args.layers, num_blocks, block_bytes, "cpu")
        ids = torch.randperm(num_blocks, generator=g)[: args.blocks]
        staging = torch.empty((args.blocks, layout.slot_bytes()), dtype=torch.uint8)
        # the contiguous baseline reads the same pool memory and writes the same staging buffer
        src = pool.view(-1)[: args.blocks * layout.slot_bytes()]
        pool.view(-1).fill_(3)
        staging.fill_(0)
        flat = staging.view(-1)
        nbytes = staging.numel()
        t = _interleaved({
            "contig": lambda: flat.copy_(src),
            "gather": lambda: gather_blocks(layout, caches, ids, staging, backend="torch"),
            "scatter": lambda: scatter_blocks(layout, staging, ids, caches, backend="torch"),
        }, args.repeats, clock=_cpu_clock(torch))
        med = {k: statistics.median(v) for k, v in t.items()}
        rows.append({
            "block_kib": kib, "blocks": args.blocks, "layers": args.layers, "bytes": nbytes,
            "contiguous_gbps": nbytes / med["contig"] / 1e9, "gather_gbps": nbytes / med["gather"] / 1e9,
            "scatter_gbps": nbytes / med["scatter"] / 1e9,
            "gather_vs_contiguous": _ratio(t["contig"], t["gather"]),
            "scatter_vs_contiguous": _ratio(t["contig"], t["scatter"]),
        })
        del pool, caches, staging, src
    return rows


def _cpu_quant_rows(torch, args):
    from ..transfer import gather_blocks

    kib = 256
    out = []
    pool, caches, layout = _make_pool(torch, args.layers, args.blocks * 2, kib * KIB, "cpu", torch.float16)
    ids = torch.arange(0, args.blocks * 2, 2)
    for fmt in ("int8", "int4"):
        staging = torch.empty((args.blocks, layout.slot_bytes(fmt)), dtype=torch.uint8)
        t = _median_time(lambda: gather_blocks(layout, caches, ids, staging, fmt, backend="torch"),
                         max(3, args.repeats // 3), clock=_cpu_clock(torch))
        src_bytes = args.blocks * layout.block_bytes
        out.append({"format": fmt, "block_kib": kib, "blocks": args.blocks, "slot_bytes": layout.slot_bytes(fmt),
                    "source_gbps": src_bytes / t / 1e9, "compression": layout.slot_bytes(fmt) / layout.block_bytes})
    return out


def _cuda_rows(torch, args, sizes):
    from ..transfer import HostPool, kernels, make_copy_engine

    dev = torch.device("cuda")
    sync = torch.cuda.synchronize
    g = torch.Generator().manual_seed(args.seed)
    rows = []
    for kib in sizes:
        block_bytes = kib * KIB
        n = args.blocks
        # rotating sets (distinct blocks of the pool, own staging and source buffers), > L2 together
        sets = _rotations(n * block_bytes)
        num_blocks = max(args.blocks * args.spread, sets * n)
        pool_t, caches, layout = _make_pool(torch, args.layers, num_blocks, block_bytes, dev)
        perm = torch.randperm(num_blocks, generator=g)
        ids = perm[:n]
        nbytes = n * layout.slot_bytes()
        stagings = [torch.empty((n, layout.slot_bytes()), dtype=torch.uint8, device=dev) for _ in range(sets)]
        dsrcs = [torch.empty(nbytes, dtype=torch.uint8, device=dev) for _ in range(sets)]
        ids_devs = [perm[j * n:(j + 1) * n].to(dev) for j in range(sets)]
        staging, dsrc = stagings[0], dsrcs[0]
        cache_rows, fmt = layout.check_caches(caches), layout.host_format("same")
        # the kernels alone (validation, which reads the ids back to the host, is not timed): device
        # time per launch from CUDA events over back-to-back launches rotating the sets
        launches = sets * -(-MIN_LAUNCHES // sets)
        dev_t, enq = _device_times(torch.cuda, {
            "d2d": [lambda j=j: stagings[j].view(-1).copy_(dsrcs[j]) for j in range(sets)],
            "gather": [lambda j=j: kernels.gather(cache_rows, layout, fmt, ids_devs[j], stagings[j])
                       for j in range(sets)],
            "scatter": [lambda j=j: kernels.scatter(stagings[j], layout, fmt, ids_devs[j], cache_rows)
                        for j in range(sets)],
        }, args.repeats, launches)
        t_d2d, t_kg, t_ks = (statistics.median(dev_t[k]) for k in ("d2d", "gather", "scatter"))
        del stagings[1:], dsrcs[1:], ids_devs
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        t_plain_d2h = _median_time(lambda: host.copy_(dsrc, non_blocking=True), args.repeats, sync)
        t_plain_h2d = _median_time(lambda: dsrc.copy_(host, non_blocking=True), args.repeats, sync)
        hpool = HostPool(layout, n, "same", pin_memory=True)
        engine = make_copy_engine(layout, hpool, caches)
        op = iter(range(1 << 62))
        dem = [(int(b), s) for s, b in enumerate(ids.tolist())]
        loads = [(s, int(b)) for s, b in enumerate(ids.tolist())]

        def one_op(d, l_):
            engine.submit(next(op), d, l_)
            engine.wait_all()
            res = engine.poll()
            if not all(r.ok for r in res):
                raise RuntimeError(f"copy engine op failed: {res}")

        t_eng_d2h = _median_time(lambda: one_op(dem, []), args.repeats)
        t_eng_h2d = _median_time(lambda: one_op([], loads), args.repeats)
        engine.close()
        rows.append({
            "block_kib": kib, "blocks": n, "bytes": nbytes,
            "d2d_copy_gbps": nbytes / t_d2d / 1e9, "kernel_gather_gbps": nbytes / t_kg / 1e9,
            "kernel_scatter_gbps": nbytes / t_ks / 1e9,
            "kernel_gather_vs_memcpy": _ratio(dev_t["d2d"], dev_t["gather"]),
            "kernel_scatter_vs_memcpy": _ratio(dev_t["d2d"], dev_t["scatter"]),
            "enqueue_us": {k: v * 1e6 for k, v in enq.items()},
            "device_timing": f"d2d/kernel: CUDA events around {launches} back-to-back launches per round, "
                             f"rotating {sets} buffer set(s) of {nbytes / 2**20:g} MiB ({sets * nbytes / 2**20:g} "
                             f"MiB in all, against L2 reuse), the GPU held while they queued: device time per "
                             f"launch; enqueue_us: the host's cost to launch one",
            "copy_timing": "plain/engine: host clock around one operation and its synchronize (engine: submit, "
                           "wait_all, poll): the per-operation cost a demotion or restore pays",
            "plain_d2h_gbps": nbytes / t_plain_d2h / 1e9, "engine_d2h_gbps": nbytes / t_eng_d2h / 1e9,
            "plain_h2d_gbps": nbytes / t_plain_h2d / 1e9, "engine_h2d_gbps": nbytes / t_eng_h2d / 1e9,
            "engine_d2h_vs_plain": t_plain_d2h / t_eng_d2h, "engine_h2d_vs_plain": t_plain_h2d / t_eng_h2d,
        })
        del pool_t, caches, cache_rows, staging, dsrc, host
    return rows


def run(args: argparse.Namespace) -> int:
    import torch

    try:
        sizes = _sizes(args.sizes_kib)
        _check_args(args, sizes)
        if args.cuda_only and not torch.cuda.is_available():
            raise BadArgs("--cuda-only: no CUDA device in this run")
    except BadArgs as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    cpu = [] if args.cuda_only else _cpu_rows(torch, args, sizes)
    big = [r["gather_vs_contiguous"] for r in cpu if r["block_kib"] >= 256]
    result = {
        "torch_threads": torch.get_num_threads(),
        "cpu_clock": "thread_time" if torch.get_num_threads() == 1 else "perf_counter",
        "cpu": cpu,
        "cpu_gather_vs_contiguous": min(big) if big else None,
        "cpu_gather_target": GATHER_RATIO_TARGET,
        "cpu_quant": [] if args.no_quant or args.cuda_only else _cpu_quant_rows(torch, args),
    }
    if args.no_store or args.cuda_only:
        result.update(store=[], store_note="--cuda-only given" if args.cuda_only else "--no-store given")
    else:  # bench/store.py: its own loopback master, stopped before it returns
        from .store import store_rows

        store, why = store_rows(sizes, args.blocks, max(3, args.repeats // 3))
        result.update(store=store, store_note=why)
    if torch.cuda.is_available():
        cuda = _cuda_rows(torch, args, sizes)
        batch = [r for r in cuda if r["blocks"] >= 16]
        result.update({
            "gpu": torch.cuda.get_device_name(),
            "cuda": cuda,
            "kernel_vs_memcpy": min((min(r["kernel_gather_vs_memcpy"], r["kernel_scatter_vs_memcpy"])
                                     for r in batch), default=None),
            "kernel_target": KERNEL_RATIO_TARGET,
        })
    else:
        result.update({"gpu": None, "cuda": None, "kernel_vs_memcpy": None,
                       "gpu_note": "no CUDA device in this run: GPU figures not measured"})
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    clock = "thread CPU time" if result["torch_threads"] == 1 else "wall time"
    print(f"CPU gather/scatter of {args.blocks} scattered blocks ({args.layers} rows each) vs one contiguous "
          f"copy, median of {args.repeats} ({clock}), torch threads {result['torch_threads']}")
    print(f"{'block':>8} {'contig GB/s':>12} {'gather GB/s':>12} {'ratio':>6} {'scatter GB/s':>13} {'ratio':>6}")
    for r in cpu:
        print(f"{r['block_kib']:>5}KiB {r['contiguous_gbps']:>12.2f} {r['gather_gbps']:>12.2f} "
              f"{r['gather_vs_contiguous']:>6.2f} {r['scatter_gbps']:>13.2f} {r['scatter_vs_contiguous']:>6.2f}")
    if result["cpu_gather_vs_contiguous"] is not None:
        print(f"cpu_gather_vs_contiguous (blocks >= 256 KiB, worst): {result['cpu_gather_vs_contiguous']:.2f} "
              f"(target >= {GATHER_RATIO_TARGET})")
    if result["store"]:
        print(f"Mooncake Store on loopback (one client, TCP), {args.blocks} checksummed block objects per batch, "
              f"median of {max(3, args.repeats // 3)} (wall time, encode + checksum + store + verify):")
        for r in result["store"]:
            print(f"{r['block_kib']:>5}KiB put {r['put_gbps']:>7.2f} GB/s ({r['put_ms_per_block']:.2f} ms/block)  "
                  f"get {r['get_gbps']:>7.2f} GB/s ({r['get_ms_per_block']:.2f} ms/block)")
    elif result["store_note"]:
        print(f"Mooncake Store rows skipped: {result['store_note']}")
    for q in result["cpu_quant"]:
        print(f"quantizing gather {q['format']}: {q['source_gbps']:.2f} GB/s of fp16 source, slot "
              f"{q['compression']:.3f}x of raw")
    if result["cuda"] is None:
        print(result["gpu_note"])
    else:
        print(f"CUDA on {result['gpu']}:")
        for r in result["cuda"]:
            print(f"  {r['block_kib']}KiB x{r['blocks']}: kernel gather {r['kernel_gather_gbps']:.1f} / scatter "
                  f"{r['kernel_scatter_gbps']:.1f} GB/s vs d2d {r['d2d_copy_gbps']:.1f} "
                  f"({r['kernel_gather_vs_memcpy']:.2f}/{r['kernel_scatter_vs_memcpy']:.2f}); engine D2H "
                  f"{r['engine_d2h_gbps']:.1f} vs plain {r['plain_d2h_gbps']:.1f}, H2D {r['engine_h2d_gbps']:.1f} "
                  f"vs plain {r['plain_h2d_gbps']:.1f} GB/s")
    return 0
