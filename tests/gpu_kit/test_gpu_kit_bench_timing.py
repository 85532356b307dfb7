"""bench transfer's GPU timing (audit finding 5), checked on CPU with a fake CUDA clock.

The device-to-device copy and the Triton kernels are timed with CUDA events over many back-to-back
launches, rotating buffer sets larger than L2, the GPU held while they queue; the plain and engine
copies stay per single operation. Here ``torch.cuda``'s events are a host clock and ``_sleep`` a
recorder, so what is checked is the protocol, not a GPU figure.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from lmdeploy_hostcache.bench import transfer


class _Clock:
    def __init__(self):
        self.t = 0.0
        self.log = []


def _fake_cuda(clock):
    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.at = None

        def record(self):
            self.at = clock.t
            clock.log.append("record")

        def synchronize(self):
            clock.log.append("event_sync")

        def elapsed_time(self, other):
            return (other.at - self.at) * 1e3

    class Cuda:
        pass

    cuda = Cuda()
    cuda.Event = Event
    cuda.synchronize = lambda: clock.log.append("sync")
    cuda._sleep = lambda cycles: clock.log.append(("sleep", cycles))
    return cuda


def test_device_times_are_per_launch_over_back_to_back_rotating_launches():
    clock = _Clock()
    cuda = _fake_cuda(clock)
    used = {"a": [], "b": []}

    def op(name, j, cost):
        def f():
            used[name].append(j)
            clock.t += cost   # device time of one launch
        return f

    fns = {"a": [op("a", j, 1e-3) for j in range(3)], "b": [op("b", j, 4e-3) for j in range(3)]}
    times, enqueue = transfer._device_times(cuda, fns, repeats=4, launches=6)
    assert set(times) == {"a", "b"} and all(len(v) == 4 for v in times.values())
    assert all(abs(x - 1e-3) < 1e-12 for x in times["a"]) and all(abs(x - 4e-3) < 1e-12 for x in times["b"])
    # warm-up of every variant, one untimed enqueue round, then 4 timed rounds of 6 launches, rotating
    assert used["a"] == [0, 1, 2] + [0, 1, 2, 0, 1, 2] * 5
    assert set(enqueue) == {"a", "b"} and all(v >= 0 for v in enqueue.values())
    # each timed round: the GPU is held, then start event, the launches, end event, wait on it
    sleeps = [e for e in clock.log if isinstance(e, tuple)]
    assert len(sleeps) == 8 and all(c >= 1 for _, c in sleeps)
    assert clock.log.count("record") == 16 and clock.log.count("event_sync") == 8


def test_device_times_without_sleep_still_time_with_events():
    clock = _Clock()
    cuda = _fake_cuda(clock)
    del cuda._sleep
    times, _ = transfer._device_times(cuda, {"x": [lambda: setattr(clock, "t", clock.t + 2e-3)]}, 2, 5)
    assert [round(x, 9) for x in times["x"]] == [2e-3, 2e-3]


def test_rotations_cover_more_than_l2():
    assert transfer.ROTATE_BYTES >= 4 * 60 * 10**6          # several times an H200's 60 MB L2
    assert transfer._rotations(8 << 20) == 32                 # 32 x 8 MiB (256 KiB blocks x 32)
    assert transfer._rotations(128 << 20) == 2
    assert transfer._rotations(512 << 20) == 1                # one set is already larger than L2
    assert transfer._rotations(10, rotate_bytes=25) == 3


def test_cuda_rows_run_end_to_end_under_the_cpu_shim(tmp_path):
    """``_cuda_rows`` itself, every line of it, with CUDA faked by the CPU shim (tensors on the CPU,
    kernels interpreted, events a host clock): keys and shapes of the rows, rotation and launches."""
    script = tmp_path / "rows.py"
    script.write_text('''
import json, time
from types import SimpleNamespace
from lmdeploy_hostcache.testing import cpu_shim
cpu_shim.install()
import torch
import lmdeploy_hostcache.transfer as T
from lmdeploy_hostcache.bench import transfer

class Ev:
    def __init__(self, **kw): self.t = None
    def record(self, *a): self.t = time.perf_counter()
    def synchronize(self): pass
    def elapsed_time(self, other): return (other.t - self.t) * 1e3 + 1e-6
torch.cuda.Event = Ev
torch.cuda._sleep = lambda c: None
_HP = T.HostPool
T.HostPool = lambda *a, pin_memory=None, **k: _HP(*a, pin_memory=False, **k)
transfer.ROTATE_BYTES = 3 * 2 * 8192
transfer.MIN_LAUNCHES = 4
rows = transfer._cuda_rows(torch, SimpleNamespace(blocks=2, layers=2, repeats=2, spread=2, seed=0), [8])
print(json.dumps(rows))
''')
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          cwd=Path(transfer.__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("d2d_copy_gbps", "kernel_gather_gbps", "kernel_scatter_gbps", "kernel_gather_vs_memcpy",
                "kernel_scatter_vs_memcpy", "plain_d2h_gbps", "engine_d2h_gbps", "plain_h2d_gbps",
                "engine_h2d_gbps", "engine_d2h_vs_plain", "engine_h2d_vs_plain"):
        assert row[key] > 0, key
    assert row["bytes"] == 2 * 8192 and row["block_kib"] == 8
    assert "6 back-to-back launches" in row["device_timing"] and "rotating 3 buffer set(s)" in row["device_timing"]
    assert set(row["enqueue_us"]) == {"d2d", "gather", "scatter"}
    assert "per-operation" in row["copy_timing"]


def test_cpu_rows_keep_their_format():
    from types import SimpleNamespace

    import torch

    rows = transfer._cpu_rows(torch, SimpleNamespace(blocks=2, layers=2, repeats=2, spread=2, seed=0), [8])
    assert set(rows[0]) == {"block_kib", "blocks", "layers", "bytes", "contiguous_gbps", "gather_gbps",
                            "scatter_gbps", "gather_vs_contiguous", "scatter_vs_contiguous"}
