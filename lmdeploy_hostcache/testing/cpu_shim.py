"""Run LMDeploy 0.18's PyTorch engine (CUDA backend, Triton kernels) on CPU tensors.

``install()`` makes a GPU-less process look like one with a single sm80 CUDA device to
LMDeploy, while every tensor actually lives on the CPU and every Triton kernel runs in
Triton's interpreter (``TRITON_INTERPRET=1``):

1. ``torch.cuda`` runtime calls LMDeploy makes on its eager path are faked: streams,
   events, stream contexts, synchronize, memory queries (``mem_get_info`` reports
   ``fake_memory_gb``), device count/properties/capability (sm80), ``graph_pool_handle``
   and ``torch._C._cuda_clearCublasWorkspaces``. ``torch.cuda.is_available()`` is left
   False, so code that really needs CUDA still knows it has none.
2. A ``TorchFunctionMode`` rewrites ``device='cuda[:n]'`` / an int device / ``.cuda()`` /
   ``.to('cuda')`` to the CPU and drops ``pin_memory`` and ``record_stream``;
   ``nn.Module.to`` (which parses its device in C) gets the same rewrite. Torch modes
   are per thread, so the mode is entered in the installing thread and in every thread
   started afterwards (``threading.Thread.run`` is wrapped).
3. Triton: a fake active driver reporting a CUDA sm80 target (LMDeploy's ``is_cuda()``
   asks it); the interpreter's ``tensor.__index__`` is made numpy >= 2.4-safe; module
   level aliases of ``tl`` builtins (``tl_log2 = tl.log2`` in LMDeploy's attention
   kernels) are rebound to forwarders so the interpreter's patching reaches them.
4. ``LMDEPLOY_ENABLE_CHECK_ENV=0`` (no spawned CUDA environment check).

Invariants: nothing happens on import; ``install()`` is idempotent and irreversible for
the process, refuses on a machine with a real CUDA device, and refuses when LMDeploy's
Triton kernels were already imported without the interpreter (they would be compiled
for a GPU). Importing ``lmdeploy_hostcache`` or ``lmdeploy`` never installs it
(``tests/e2e/test_testing_helpers.py::test_importing_package_and_lmdeploy_does_not_install_the_shim``).
Production code must never import this module.
"""
from __future__ import annotations

import os
import sys
import threading
import types

__all__ = ["install", "is_installed", "kernel_stats"]

_MARK = "_lmdeploy_hostcache_cpu_shim"
_lock = threading.Lock()
_kernel_stats: dict[str, list] = {}


def is_installed() -> bool:
    """True when ``install()`` ran in this process (checked on ``torch.cuda`` itself)."""
    torch = sys.modules.get("torch")
    return bool(torch is not None and getattr(torch.cuda, _MARK, False))


def kernel_stats() -> dict[str, tuple[int, float]]:
    """Interpreted Triton launches per kernel name: (count, seconds), when counting is on."""
    return {k: (v[0], v[1]) for k, v in sorted(_kernel_stats.items(), key=lambda kv: -kv[1][1])}


def install(*, fake_sms: int = 8, fake_memory_gb: float = 8.0, count_kernels: bool = False,
            fake_devices: int = 1, ccl_backend: str | None = None) -> None:
    """Install the shim in this process (see module docstring). Idempotent.

    ``fake_sms`` is the multiprocessor count reported to LMDeploy: its decode-attention
    grids scale with it, and under the interpreter fewer programs run faster.
    ``fake_memory_gb`` is the device memory reported (free = total / 2).
    ``count_kernels`` counts interpreted launches per kernel (``kernel_stats()``).
    ``fake_devices`` is the device count reported; ``ccl_backend`` (e.g. ``"gloo"``) replaces
    the collective backend LMDeploy's CUDA backend asks ``torch.distributed`` for (``nccl``).
    """
    with _lock:
        if is_installed():
            return
        if os.environ.get("TRITON_INTERPRET") != "1":
            stale = [m for m in sys.modules if m.startswith("lmdeploy.pytorch.kernels")]
            if stale:
                raise RuntimeError("cpu_shim.install(): LMDeploy's Triton kernels were imported before "
                                   "TRITON_INTERPRET=1 was set; install the shim before importing "
                                   "lmdeploy.pytorch (first import: " + stale[0] + ")")
            os.environ["TRITON_INTERPRET"] = "1"
        os.environ.setdefault("LMDEPLOY_ENABLE_CHECK_ENV", "0")
        import torch

        if torch.cuda.is_available():
            raise RuntimeError("cpu_shim.install(): this machine has a CUDA device; the CPU shim is for "
                               "GPU-less test machines only")
        _fake_cuda_runtime(torch, fake_sms, fake_memory_gb, fake_devices)
        _redirect_cuda_devices(torch)
        _fix_triton_interpreter(torch, count_kernels)
        if ccl_backend is not None:
            from lmdeploy.pytorch.backends.default.op_backend import DefaultOpsBackend

            DefaultOpsBackend.ccl_backend = staticmethod(lambda: ccl_backend)
        setattr(torch.cuda, _MARK, True)


# -- 1. torch.cuda runtime ------------------------------------------------------------------

class _FakeEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _FakeStream:
    cuda_stream = 0
    device_index = 0

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, event=None):
        return event or _FakeEvent()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _StreamContext:
    def __init__(self, stream=None):
        self.stream = stream

    def __enter__(self):
        return self.stream

    def __exit__(self, *exc):
        return False


def _fake_cuda_runtime(torch, fake_sms: int, fake_memory_gb: float, fake_devices: int) -> None:
    total = int(fake_memory_gb * (1 << 30))
    props = types.SimpleNamespace(major=8, minor=0, multi_processor_count=int(fake_sms), total_memory=total,
                                  name="cpu-shim", uuid="00000000-0000-0000-0000-000000000000", warp_size=32,
                                  L2_cache_size=40 << 20)
    default_stream = _FakeStream()
    cuda = torch.cuda

    def const(value):  # a distinct function per name: torch._dynamo refuses one object under two names
        return lambda *a, **k: value

    replacements = {
        "Stream": _FakeStream,
        "Event": _FakeEvent,
        "stream": _StreamContext,
        "current_stream": lambda *a, **k: default_stream,
        "default_stream": lambda *a, **k: default_stream,
        "synchronize": const(None),
        "empty_cache": const(None),
        "mem_get_info": lambda *a, **k: (total // 2, total),
        "device_count": const(int(fake_devices)),
        "current_device": const(0),
        "set_device": const(None),
        "get_device_properties": lambda *a, **k: props,
        "get_device_capability": lambda *a, **k: (8, 0),
        "get_device_name": lambda *a, **k: "cpu-shim",
        "manual_seed": const(None),
        "manual_seed_all": const(None),
        "memory_allocated": const(0),
        "max_memory_allocated": const(0),
        "memory_reserved": const(0),
        "reset_peak_memory_stats": const(None),
        "graph_pool_handle": const(None),  # CUDAGraphRunner.__init__ calls it even in eager mode
    }
    for name, value in replacements.items():
        setattr(cuda, name, value)
    torch._C._cuda_clearCublasWorkspaces = const(None)  # Engine.close()


# -- 2. cuda -> cpu devices -----------------------------------------------------------------

def _redirect_cuda_devices(torch) -> None:
    from torch.overrides import TorchFunctionMode

    cpu = torch.device("cpu")
    T = torch.Tensor

    def fix(dev):
        if isinstance(dev, str) and dev.startswith("cuda"):
            return cpu
        if isinstance(dev, torch.device) and dev.type == "cuda":
            return cpu
        if isinstance(dev, int) and not isinstance(dev, bool):
            return cpu
        return dev

    passthrough = {T.cuda, T.pin_memory}

    class CudaToCpu(TorchFunctionMode):
        def __torch_function__(self, func, types_, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if func in passthrough:
                return args[0]
            if func is T.record_stream:
                return None
            if func is T.is_pinned:
                return False
            if "device" in kwargs:
                kwargs["device"] = fix(kwargs["device"])
            if kwargs.get("pin_memory"):
                kwargs["pin_memory"] = False
            if func is T.to and len(args) > 1:
                args = (args[0], fix(args[1])) + tuple(args[2:])
            return func(*args, **kwargs)

    # nn.Module.to parses its device in C (torch._C._nn._parse_to), outside the mode's
    # reach: the model agent's wakeup does ``model.to(torch.cuda.current_device())``.
    original_module_to = torch.nn.Module.to

    def module_to(self, *args, **kwargs):
        if args and not isinstance(args[0], torch.dtype | torch.Tensor):
            args = (fix(args[0]),) + tuple(args[1:])
        if "device" in kwargs:
            kwargs["device"] = fix(kwargs["device"])
        return original_module_to(self, *args, **kwargs)

    torch.nn.Module.to = module_to
    CudaToCpu().__enter__()  # the installing thread, for the rest of its life
    original_run = threading.Thread.run

    def run_with_mode(self):
        with CudaToCpu():
            return original_run(self)

    threading.Thread.run = run_with_mode


# -- 3. Triton ------------------------------------------------------------------------------

def _fix_triton_interpreter(torch, count_kernels: bool) -> None:
    import inspect
    import time

    import triton.language as tl
    import triton.runtime.interpreter as interp
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    # (a) triton 3.6 sets tensor.__index__ = int(handle.data); numpy >= 2.4 refuses int()
    #     of a 1-element 1-D array (hit by tl.range(tl.program_id(0), n, tl.num_programs(0))).
    original_patch_tensor = interp._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original_patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patch_lang_tensor

    # (b) module-level aliases of tl builtins escape the interpreter's patching of tl.*.
    builtins = {}
    for mod in (tl, tl.math):
        for name, value in inspect.getmembers(mod):
            if tl.core.is_builtin(value):
                builtins.setdefault(id(value), (mod, name))
    original_patch_lang = interp._patch_lang

    def forwarder(mod, name):
        return lambda *a, **k: getattr(mod, name)(*a, **k)

    def patch_lang(fn):
        g = fn.__globals__
        for key, value in list(g.items()):
            if not inspect.ismodule(value) and id(value) in builtins and tl.core.is_builtin(value):
                g[key] = forwarder(*builtins[id(value)])
        return original_patch_lang(fn)

    interp._patch_lang = patch_lang

    # (c) no GPU, so no active driver: report a CUDA sm80 target (no PDL/TMA paths).
    class FakeDriver:
        def get_current_target(self):
            return GPUTarget("cuda", 80, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, *args):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(FakeDriver())

    if count_kernels:
        original_call = interp.GridExecutor.__call__

        def call(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original_call(self, *args, **kwargs)
            finally:
                st = _kernel_stats.setdefault(getattr(self.fn, "__name__", str(self.fn)), [0, 0.0])
                st[0] += 1
                st[1] += time.perf_counter() - t0

        interp.GridExecutor.__call__ = call
