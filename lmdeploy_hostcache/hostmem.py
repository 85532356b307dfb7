"""Host-memory facts of this machine and the host-tier size they imply.

``read_host_memory()`` gathers RAM (psutil), the memory limit of this process's cgroup (v2 or
v1: the smallest limit from its own cgroup, named in ``/proc/self/cgroup``, up to the mount; inside
a container psutil reports the *host's* RAM) and RLIMIT_MEMLOCK.
``resolve_host_cache_bytes(cfg)`` turns ``host_cache_gb`` into bytes plus a sentence a
user can read in a start-up log saying how the figure was chosen.

``auto`` rule (invariant: the result is never above any of these):
  available RAM - ``host_memory_reserve_gb``,
  ``AUTO_MAX_FRACTION_OF_TOTAL`` x total RAM (the engine, its workers and the page cache
  need the rest, and a pinned pool cannot be swapped out),
  RLIMIT_MEMLOCK, only when ``pin_memory`` is on, the limit is finite and the caller
  says its pinning is charged to that limit (``memlock_applies=True``: mlock, RDMA
  registration). CUDA's ``cudaHostAlloc``/``cudaHostRegister`` pin through the NVIDIA
  driver, which does not charge RLIMIT_MEMLOCK, so the default does not cap by it:
  a container's usual 8 MiB limit would otherwise shrink the tier to nothing.
"Available" and "total" are the smaller of the machine's and the cgroup's figures.
An explicit ``host_cache_gb`` above total RAM raises ``ConfigError`` (a pinned pool that
large cannot be allocated); above what is available now it is kept, with a warning in
the reason.

With an ``l3:`` section the node also holds the store's memory: its segment
(``l3.global_segment_gb``, once per node) and one client buffer (``l3.local_buffer_gb``) per
client, one per TP rank of every engine (``l3_store_bytes``). ``resolve_host_cache_bytes`` is the
one sizing rule for the engine (``engine_config.size_host_cache``), the serve flags
(``cli_patch``) and ``doctor``: ``auto`` leaves the store that room (its figure is measured
before the store's memory exists), and an explicit size whose host tier + segment + buffers
exceed total RAM raises ``ConfigError`` naming ``host_cache_gb`` and the ``l3`` fields (as does a
store that alone exceeds it); above available RAM it is kept, with the warning.
"""
from __future__ import annotations

import os
import resource
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import AUTO, ConfigError, FieldError, HostCacheConfig

__all__ = [
    "AUTO_MAX_FRACTION_OF_TOTAL",
    "GIB",
    "HostMemoryFacts",
    "format_bytes",
    "l3_store_bytes",
    "read_cgroup_memory",
    "read_host_memory",
    "read_memlock_limit",
    "refuse_size_holding_no_block",
    "resolve_host_cache_bytes",
]

GIB = 1 << 30
AUTO_MAX_FRACTION_OF_TOTAL = 0.5
# cgroup v1 reports "no limit" as a huge page-aligned number (e.g. 9223372036854771712).
_CGROUP_V1_UNLIMITED = 1 << 60


@dataclass(frozen=True)
class HostMemoryFacts:
    """RAM and locked-memory limits of this process's machine/container, in bytes.

    ``None`` for a cgroup figure means no cgroup limit; for a memlock figure, unlimited.
    """

    total_bytes: int
    available_bytes: int
    cgroup_limit_bytes: int | None = None
    cgroup_used_bytes: int | None = None  # charged to the cgroup, reclaimable file cache excluded
    memlock_soft_bytes: int | None = None
    memlock_hard_bytes: int | None = None

    @property
    def usable_total_bytes(self) -> int:
        if self.cgroup_limit_bytes is None:
            return self.total_bytes
        return min(self.total_bytes, self.cgroup_limit_bytes)

    @property
    def usable_available_bytes(self) -> int:
        avail = self.available_bytes
        if self.cgroup_limit_bytes is not None:
            headroom = self.cgroup_limit_bytes - (self.cgroup_used_bytes or 0)
            avail = min(avail, max(0, headroom))
        return avail

    def to_dict(self) -> dict:
        out = asdict(self)
        out["usable_total_bytes"] = self.usable_total_bytes
        out["usable_available_bytes"] = self.usable_available_bytes
        return out


def format_bytes(n: int | float | None) -> str:
    """Human figure: GiB above 1 GiB, else MiB/KiB; ``None`` reads 'unlimited'."""
    if n is None:
        return "unlimited"
    if n >= GIB:
        return f"{n / GIB:.1f} GiB"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n / 1024:.0f} KiB"


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except (OSError, ValueError):   # ValueError: bytes that are not text (UnicodeDecodeError)
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _read_stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _own_cgroup_dirs(root: Path, proc_cgroup: str | os.PathLike[str], v1: bool) -> list[Path]:
    """This process's memory cgroup and its ancestors up to ``root`` (innermost first), from
    ``/proc/self/cgroup``; ``[root]`` when the file names no path below ``root`` (a cgroup
    namespace shows ``/``: the mount is the process's own cgroup)."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except (OSError, ValueError):
        return [root]
    rel = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if (v1 and "memory" in controllers.split(",")) or (not v1 and parts[0] == "0" and controllers == ""):
            rel = path.strip()
            break
    if not rel or rel == "/":
        return [root]
    dirs = []
    here = root / rel.lstrip("/")
    try:
        if not here.resolve().is_relative_to(root.resolve()):
            return [root]
    except (OSError, ValueError):
        return [root]
    while True:
        if here.is_dir():
            dirs.append(here)
        if here == root or here.parent == here:
            break
        here = here.parent
    return dirs or [root]


def read_cgroup_memory(root: str | os.PathLike[str] = "/sys/fs/cgroup",
                       proc_cgroup: str | os.PathLike[str] = "/proc/self/cgroup") -> tuple[int | None, int | None]:
    """(limit, used) of this process's memory cgroup; (None, None) when unlimited.

    The limit that binds is the smallest one on the path from the process's own cgroup (named in
    ``proc_cgroup``) up to the mount at ``root``: a systemd service or a batch job on a host whose
    root cgroup is unlimited is still held to its own ``memory.max``. ``used`` is read where that
    limit is set. v2: ``memory.max``/``memory.current``; v1: ``memory/memory.limit_in_bytes``/
    ``usage_in_bytes``. ``used`` leaves out inactive file cache, which the kernel drops on demand
    (counting it would make a container that has read a large checkpoint look full).
    """
    root = Path(root)
    if (root / "memory.max").exists() or (root / "cgroup.controllers").exists():  # cgroup v2
        return _tightest_limit(_own_cgroup_dirs(root, proc_cgroup, v1=False), "memory.max", "memory.current",
                               "inactive_file")
    v1 = root / "memory"
    if (v1 / "memory.limit_in_bytes").exists():
        return _tightest_limit(_own_cgroup_dirs(v1, proc_cgroup, v1=True), "memory.limit_in_bytes",
                               "memory.usage_in_bytes", "total_inactive_file")
    return None, None


def _tightest_limit(dirs: list[Path], limit_file: str, usage_file: str,
                    inactive_key: str) -> tuple[int | None, int | None]:
    """(the smallest limit among ``dirs``, the usage where it is set, inactive file cache left out);
    (None, None) when none is set (v1 writes "no limit" as a huge number)."""
    best = None
    for d in dirs:
        limit = _read_int(d / limit_file)
        if limit is not None and limit < _CGROUP_V1_UNLIMITED and (best is None or limit < best[0]):
            best = (limit, d)
    if best is None:
        return None, None
    limit, d = best
    used = (_read_int(d / usage_file) or 0) - _read_stat(d / "memory.stat", inactive_key)
    return limit, max(0, used)


def read_memlock_limit() -> tuple[int | None, int | None]:
    """(soft, hard) RLIMIT_MEMLOCK in bytes; ``None`` means unlimited."""
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)

    def conv(v: int) -> int | None:
        return None if v == resource.RLIM_INFINITY else int(v)

    return conv(soft), conv(hard)


def read_host_memory(cgroup_root: str | os.PathLike[str] = "/sys/fs/cgroup") -> HostMemoryFacts:
    """Current facts of this machine (psutil + cgroup + rlimit)."""
    import psutil  # noqa: PLC0415

    vm = psutil.virtual_memory()
    limit, used = read_cgroup_memory(cgroup_root)
    soft, hard = read_memlock_limit()
    return HostMemoryFacts(
        total_bytes=int(vm.total), available_bytes=int(vm.available),
        cgroup_limit_bytes=limit, cgroup_used_bytes=used,
        memlock_soft_bytes=soft, memlock_hard_bytes=hard,
    )


def _memlock_note(cfg: HostCacheConfig, facts: HostMemoryFacts, memlock_applies: bool) -> str:
    if not cfg.pin_memory:
        return "pin_memory is off, so RLIMIT_MEMLOCK does not matter"
    if facts.memlock_soft_bytes is None:
        return "RLIMIT_MEMLOCK is unlimited"
    if memlock_applies:
        return ""
    return (f"RLIMIT_MEMLOCK ({format_bytes(facts.memlock_soft_bytes)}) is not applied: CUDA pins host "
            "memory through its driver, which does not charge that limit")


def l3_store_bytes(cfg: HostCacheConfig, clients: int = 1) -> int:
    """RAM the ``l3:`` store takes on this node: its segment once and a buffer per client (0 without ``l3``).

    ``clients``: the store clients on the node, one per TP rank of every engine (DP engines included).
    """
    if cfg.l3 is None:
        return 0
    return cfg.l3.global_segment_bytes + max(1, int(clients)) * cfg.l3.local_buffer_bytes


def _l3_terms(cfg: HostCacheConfig, clients: int) -> str:
    clients = max(1, int(clients))
    return (f"l3.global_segment_gb ({format_bytes(cfg.l3.global_segment_bytes)}) + {clients} client"
            f"{'s' if clients != 1 else ''} x l3.local_buffer_gb ({format_bytes(cfg.l3.local_buffer_bytes)})")


def resolve_host_cache_bytes(cfg: HostCacheConfig, facts: HostMemoryFacts | None = None, *,
                             memlock_applies: bool = False, l3_clients: int = 1) -> tuple[int, str]:
    """Bytes of host memory the tier should use on this machine, and why.

    ``facts`` defaults to ``read_host_memory()``. Returns ``(0, reason)`` when the tier is
    disabled (``host_cache_gb: 0``) or ``auto`` finds no room. Raises ``ConfigError``
    (field ``host_cache_gb``) when an explicit size exceeds the machine's total RAM, alone or
    with the ``l3`` store's segment and its ``l3_clients`` buffers (``l3_store_bytes``), and when
    that store alone exceeds it (``auto`` too; field ``l3.global_segment_gb`` or ``l3.local_buffer_gb``,
    whichever term is larger). ``auto`` leaves the store its room.
    """
    if facts is None:
        facts = read_host_memory()
    total = facts.usable_total_bytes
    avail = facts.usable_available_bytes
    where = "this container's" if facts.cgroup_limit_bytes is not None and facts.cgroup_limit_bytes < facts.total_bytes \
        else "this machine's"
    memlock_note = _memlock_note(cfg, facts, memlock_applies)
    memlock_cap = facts.memlock_soft_bytes if (cfg.pin_memory and memlock_applies) else None
    clients = max(1, int(l3_clients))
    store = l3_store_bytes(cfg, clients) if cfg.enabled else 0
    if store > total:   # the store alone cannot be allocated, whatever the host tier's size
        # blame the larger term: the segment, or the client buffers (a default the user never set is no culprit)
        buffers = cfg.l3.local_buffer_bytes * clients > cfg.l3.global_segment_bytes
        field, value = (("l3.local_buffer_gb", cfg.l3.local_buffer_gb) if buffers
                        else ("l3.global_segment_gb", cfg.l3.global_segment_gb))
        other = "l3.global_segment_gb" if buffers else "l3.local_buffer_gb"
        raise ConfigError([FieldError(
            field, value,
            f"a store that fits {where} {format_bytes(total)} of total RAM: {_l3_terms(cfg, clients)} = "
            f"{format_bytes(store)}, before host_cache_gb; lower {field} (or {other})")])

    if cfg.host_cache_gb != AUTO:
        gb = float(cfg.host_cache_gb)
        want = int(gb * GIB)
        if want == 0:
            if gb:   # enabled, but no byte to hold a block: the engine refuses it at start-up (0 slots)
                return 0, f"host cache 0 bytes: host_cache_gb {gb:g} is under one byte."
            return 0, "host tier off: host_cache_gb is 0, so LMDeploy runs as stock (nothing is refused)."
        if want > total:
            raise ConfigError([FieldError(
                "host_cache_gb", cfg.host_cache_gb,
                f"at most {total / GIB:.1f} GiB, {where} total RAM; or 'auto' to size it from free RAM")])
        if store and want + store > total:
            raise ConfigError([FieldError(
                "host_cache_gb", cfg.host_cache_gb,
                f"at most {(total - store) / GIB:.1f} GiB: host_cache_gb + {_l3_terms(cfg, clients)} must fit "
                f"{where} {format_bytes(total)} of total RAM; lower host_cache_gb or l3.global_segment_gb, or "
                "give host_cache_gb 'auto' to size it from free RAM")])
        if memlock_cap is not None and want > memlock_cap:
            raise ConfigError([FieldError(
                "host_cache_gb", cfg.host_cache_gb,
                f"at most the locked-memory limit RLIMIT_MEMLOCK = {format_bytes(memlock_cap)} "
                "(raise it with `ulimit -l` / docker --ulimit memlock=-1, or set pin_memory: false)")])
        reason = f"host cache {format_bytes(want)}: host_cache_gb is set to {gb:g}"
        if want + store > avail:
            need = (f"with the l3 store ({_l3_terms(cfg, clients)}) it needs {format_bytes(want + store)}, but "
                    if store else "")
            reason += (f"; warning: {need}only {format_bytes(avail)} of RAM is available now, so other processes "
                       "may be pushed into swap or the OOM killer")
        if memlock_note:
            reason += f"; {memlock_note}"
        return want, reason + "."

    reserve = int(cfg.host_memory_reserve_gb * GIB)
    by_avail = avail - reserve
    by_fraction = int(total * AUTO_MAX_FRACTION_OF_TOTAL)
    limits = [
        (by_avail, f"{format_bytes(avail)} available minus the {cfg.host_memory_reserve_gb:g} GiB "
                   "reserve (host_memory_reserve_gb)"),
        (by_fraction, f"half of {where} {format_bytes(total)} of total RAM"),
    ]
    if memlock_cap is not None:
        limits.append((memlock_cap, "the locked-memory limit RLIMIT_MEMLOCK (the pool is pinned and this "
                                    "pinning is charged to it)"))
    chosen = min(value for value, _ in limits)
    bounds = ", ".join(f"{text} = {format_bytes(max(0, value))}" for value, text in limits)
    if chosen <= 0 and by_avail <= 0:
        reason = (f"host cache disabled (auto): {format_bytes(avail)} of RAM is available, not more than the "
                  f"{cfg.host_memory_reserve_gb:g} GiB reserve (host_memory_reserve_gb); lower the reserve or "
                  "set host_cache_gb")
    elif chosen <= 0:
        binding = next(text for value, text in limits if value == chosen)
        reason = f"host cache disabled (auto): {binding} is 0; set host_cache_gb"
    else:
        reason = f"host cache {format_bytes(chosen)} (auto): the smallest of {bounds}"
        if store:
            # auto sizes from the RAM available now, before the store's memory is allocated: the node's
            # segment once (its DP engines' workers share it) and a client buffer per rank of each
            # DP engine (l3_tier.WorkerL3)
            chosen = max(0, chosen - store)
            reason += (f"; less {format_bytes(store)} for the l3 store (its segment and {clients} client "
                       f"buffer{'s' if clients != 1 else ''}): {format_bytes(chosen)}")
    if memlock_note:
        reason += f"; {memlock_note}"
    return max(0, chosen), reason + "."


def refuse_size_holding_no_block(cfg: HostCacheConfig, nbytes: int) -> None:
    """``ConfigError`` (field ``host_cache_gb``) when an explicit, enabled size resolved to 0 bytes: under one
    byte, no block of any model fits, and the engine refuses 0 slots at start-up (after loading the weights).
    A size under one block of the model is refused by the engine only: the block size needs the model."""
    if cfg.enabled and cfg.host_cache_gb != AUTO and nbytes <= 0:
        raise ConfigError([FieldError(
            "host_cache_gb", cfg.host_cache_gb,
            "0 (the tier off), 'auto', or at least one block of the model (under one byte holds none)")])
