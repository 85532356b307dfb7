"""Make LMDeploy's CPU-shimmed forward give each request the same bits whatever it is batched with.

On CPU, LMDeploy's forward is *batch dependent* in the last bits of fp16, so greedy outputs of requests run
together can differ from the same requests run one at a time, on stock LMDeploy as much as with the host
tier.  Two sources, each fixed here for tests only:

* ``torch.nn.functional.linear`` (every projection and the LM head, through LMDeploy's default linear
  backend): a matrix product over several rows blocks its reduction differently from one over a single row.
  Installed: a linear that computes every row on its own (slower, exact).
* the paged decode attention's split of each sequence's KV (``pagedattention._get_split_k``): the split count
  depends on the batch size, and the partial sums are reduced in a different order.  Installed: a fixed split
  of 4 (the function's lower bound, what it returns for any batch on a device of at most 4 multiprocessors).

With both, a request's tokens depend only on its own prompt and the KV it attends to, so a host-tier engine
whose loads change which requests share a step can be compared token for token with stock LMDeploy on
concurrent requests (``engine_runner``'s ``batch_invariant`` and ``wave``).  ``install()`` is idempotent, per
process, irreversible, and only for a process that installed the CPU shim (it refuses otherwise: production
forwards must never run this).  Production code must never import this module.
"""
from __future__ import annotations

import threading

__all__ = ["DECODE_SPLIT_K", "install", "is_installed"]

DECODE_SPLIT_K = 4
_lock = threading.Lock()
_installed = False


def is_installed() -> bool:
    return _installed


def install() -> None:
    """Install both replacements (see the module docstring)."""
    global _installed
    with _lock:
        if _installed:
            return
        from . import cpu_shim

        if not cpu_shim.is_installed():
            raise RuntimeError("batch_invariant.install(): only for a process running LMDeploy under the CPU shim "
                               "(cpu_shim.install() first)")
        import torch
        import torch.nn.functional as F
        from lmdeploy.pytorch.kernels.cuda import pagedattention

        linear = F.linear

        def row_by_row_linear(x, weight, bias=None):
            rows = x.numel() // x.shape[-1] if x.dim() >= 2 else 1
            if rows <= 1:
                return linear(x, weight, bias)
            flat = x.reshape(-1, x.shape[-1])
            out = torch.cat([linear(flat[i:i + 1], weight, bias) for i in range(rows)])
            return out.reshape(*x.shape[:-1], out.shape[-1])

        def fixed_split_k(device_idx, head_grid, batch_size, num_warps):
            return DECODE_SPLIT_K

        F.linear = row_by_row_linear
        pagedattention._get_split_k = fixed_split_k
        _installed = True
