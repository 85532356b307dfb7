"""Host-memory facts and the `auto` host-cache size, on synthetic machines and this one."""
from __future__ import annotations

import resource

import pytest

from lmdeploy_hostcache.config import ConfigError, HostCacheConfig
from lmdeploy_hostcache.hostmem import (
    AUTO_MAX_FRACTION_OF_TOTAL,
    GIB,
    HostMemoryFacts,
    format_bytes,
    read_cgroup_memory,
    read_host_memory,
    read_memlock_limit,
    resolve_host_cache_bytes,
)

MIB = 1 << 20


def facts(total_gb, avail_gb, *, cg_limit_gb=None, cg_used_gb=None, memlock=8 * MIB):
    return HostMemoryFacts(
        total_bytes=int(total_gb * GIB), available_bytes=int(avail_gb * GIB),
        cgroup_limit_bytes=None if cg_limit_gb is None else int(cg_limit_gb * GIB),
        cgroup_used_bytes=None if cg_used_gb is None else int(cg_used_gb * GIB),
        memlock_soft_bytes=memlock, memlock_hard_bytes=memlock)


def test_auto_is_available_minus_reserve_when_that_binds():
    n, reason = resolve_host_cache_bytes(HostCacheConfig(), facts(512, 100))
    assert n == 92 * GIB
    assert "(auto)" in reason and "8 GiB reserve" in reason and "92.0 GiB" in reason


def test_auto_is_capped_at_half_of_total():
    n, reason = resolve_host_cache_bytes(HostCacheConfig(), facts(1024, 1000))
    assert n == int(1024 * GIB * AUTO_MAX_FRACTION_OF_TOTAL) == 512 * GIB
    assert "half of this machine's 1024.0 GiB" in reason


def test_auto_follows_reserve_and_disables_when_no_room():
    n, _ = resolve_host_cache_bytes(HostCacheConfig(host_memory_reserve_gb=0), facts(64, 20))
    assert n == 20 * GIB
    n, reason = resolve_host_cache_bytes(HostCacheConfig(host_memory_reserve_gb=32), facts(64, 20))
    assert n == 0 and "disabled" in reason and "host_memory_reserve_gb" in reason


def test_cgroup_limit_bounds_total_and_available():
    # a 16 GiB container on a 1 TiB host that reports 900 GiB free
    f = facts(1024, 900, cg_limit_gb=16, cg_used_gb=4)
    assert f.usable_total_bytes == 16 * GIB and f.usable_available_bytes == 12 * GIB
    n, reason = resolve_host_cache_bytes(HostCacheConfig(host_memory_reserve_gb=2), f)
    assert n == 8 * GIB  # half of the container's 16 GiB (12 - 2 = 10 is larger)
    assert "this container's" in reason
    with pytest.raises(ConfigError) as info:
        resolve_host_cache_bytes(HostCacheConfig(host_cache_gb=64), f)
    assert info.value.field == "host_cache_gb" and "16.0 GiB" in str(info.value)


def test_memlock_reported_not_applied_by_default_and_applied_on_request():
    f = facts(256, 200, memlock=64 * MIB)
    n, reason = resolve_host_cache_bytes(HostCacheConfig(), f)
    assert n == 128 * GIB and "RLIMIT_MEMLOCK (64.0 MiB) is not applied" in reason
    n, reason = resolve_host_cache_bytes(HostCacheConfig(), f, memlock_applies=True)
    assert n == 64 * MIB and "RLIMIT_MEMLOCK" in reason
    # pinning off: the limit is irrelevant even when it would apply
    n, reason = resolve_host_cache_bytes(HostCacheConfig(pin_memory=False), f, memlock_applies=True)
    assert n == 128 * GIB and "pin_memory is off" in reason
    # unlimited
    n, reason = resolve_host_cache_bytes(HostCacheConfig(), facts(256, 200, memlock=None), memlock_applies=True)
    assert n == 128 * GIB and "unlimited" in reason
    with pytest.raises(ConfigError, match="RLIMIT_MEMLOCK"):
        resolve_host_cache_bytes(HostCacheConfig(host_cache_gb=1), f, memlock_applies=True)


def test_explicit_sizes():
    f = facts(256, 100)
    n, reason = resolve_host_cache_bytes(HostCacheConfig(host_cache_gb=64), f)
    assert n == 64 * GIB and "host_cache_gb is set to 64" in reason and "warning" not in reason
    n, reason = resolve_host_cache_bytes(HostCacheConfig(host_cache_gb=1.5), f)
    assert n == int(1.5 * GIB)
    n, reason = resolve_host_cache_bytes(HostCacheConfig(host_cache_gb=200), f)
    assert n == 200 * GIB and "warning" in reason and "available" in reason
    n, reason = resolve_host_cache_bytes(HostCacheConfig(host_cache_gb=0), f)
    assert n == 0 and "host tier off" in reason and "runs as stock" in reason
    with pytest.raises(ConfigError) as info:
        resolve_host_cache_bytes(HostCacheConfig(host_cache_gb=300), f)
    assert info.value.field == "host_cache_gb" and "256.0 GiB" in str(info.value)


def test_cgroup_v2_and_v1_readers(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("17179869184\n")
    (v2 / "memory.current").write_text(str(6 * GIB) + "\n")
    (v2 / "memory.stat").write_text(f"anon 123\ninactive_file {2 * GIB}\nactive_file 5\n")
    assert read_cgroup_memory(v2) == (16 * GIB, 4 * GIB)
    (v2 / "memory.max").write_text("max\n")
    assert read_cgroup_memory(v2) == (None, None)

    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text(str(8 * GIB))
    (v1 / "memory" / "memory.usage_in_bytes").write_text(str(3 * GIB))
    (v1 / "memory" / "memory.stat").write_text(f"total_inactive_file {GIB}\n")
    assert read_cgroup_memory(v1) == (8 * GIB, 2 * GIB)
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712")
    assert read_cgroup_memory(v1) == (None, None)

    assert read_cgroup_memory(tmp_path / "none") == (None, None)


def test_this_machine():
    f = read_host_memory()
    assert 0 < f.available_bytes <= f.total_bytes
    soft, hard = read_memlock_limit()
    rsoft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    assert soft == (None if rsoft == resource.RLIM_INFINITY else rsoft)
    assert f.memlock_soft_bytes == soft and f.memlock_hard_bytes == hard
    n, reason = resolve_host_cache_bytes(HostCacheConfig())
    assert 0 <= n <= f.usable_total_bytes * AUTO_MAX_FRACTION_OF_TOTAL
    assert reason.endswith(".") and "auto" in reason


def test_format_bytes():
    assert format_bytes(None) == "unlimited"
    assert format_bytes(3 * GIB) == "3.0 GiB"
    assert format_bytes(8 * MIB) == "8.0 MiB"
    assert format_bytes(65536) == "64 KiB"


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_process_s_own_cgroup_and_its_parents_bind(tmp_path, version):
    """A systemd service or a batch job on a host whose root cgroup is unlimited: the limit is on the
    process's own cgroup (named in /proc/self/cgroup) or a parent of it, never at the mount root."""
    root = tmp_path / "cg"
    base = root / "memory" if version == "v1" else root
    job = base / "system.slice" / "job.service"
    job.mkdir(parents=True)
    if version == "v2":
        (root / "cgroup.controllers").write_text("cpu memory\n")
        limit_file, used_file, stat = "memory.max", "memory.current", "inactive_file"
        proc = "0::/system.slice/job.service\n"
        (base / "system.slice" / "memory.max").write_text(str(12 * GIB))
        (job / "memory.max").write_text("max\n")
    else:
        limit_file, used_file, stat = "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"
        proc = "9:pids:/\n5:memory:/system.slice/job.service\n1:name=systemd:/x\n"
        (base / limit_file).write_text("9223372036854771712")               # the root: unlimited
        (base / "system.slice" / limit_file).write_text(str(12 * GIB))
        (job / limit_file).write_text("9223372036854771712")
    (base / "system.slice" / used_file).write_text(str(5 * GIB))
    (base / "system.slice" / "memory.stat").write_text(f"{stat} {GIB}\n")
    (tmp_path / "cgroup").write_text(proc)
    assert read_cgroup_memory(root, tmp_path / "cgroup") == (12 * GIB, 4 * GIB)   # the parent binds
    (job / limit_file).write_text(str(4 * GIB))                                  # a tighter own limit
    (job / used_file).write_text(str(GIB))
    assert read_cgroup_memory(root, tmp_path / "cgroup") == (4 * GIB, GIB)
    # a namespace (path "/"), an unreadable file or a path outside the mount: the mount root only
    for text in ("0::/\n5:memory:/\n", "\xff", "0::/../../etc\n5:memory:/../../etc\n"):
        (tmp_path / "cgroup").write_bytes(text.encode("latin-1"))
        assert read_cgroup_memory(root, tmp_path / "cgroup") == (None, None)
    (job / limit_file).write_bytes(b"\xff\xfe")                                   # not text: ignored
    (tmp_path / "cgroup").write_text(proc)
    assert read_cgroup_memory(root, tmp_path / "cgroup") == (12 * GIB, 4 * GIB)


def test_reasons_name_what_set_the_size():
    """A size under one byte is not 'the tier off' (the engine refuses its 0 slots); a memlock limit
    of 0 is named, not the reserve."""
    f = facts(256, 200, memlock=0)
    n, reason = resolve_host_cache_bytes(HostCacheConfig(host_cache_gb=1e-10), f)
    assert n == 0 and "under one byte" in reason and "stock" not in reason
    n, reason = resolve_host_cache_bytes(HostCacheConfig(host_cache_gb=0), f)
    assert n == 0 and "stock" in reason
    n, reason = resolve_host_cache_bytes(HostCacheConfig(), f, memlock_applies=True)
    assert n == 0 and "RLIMIT_MEMLOCK" in reason and "reserve" not in reason
