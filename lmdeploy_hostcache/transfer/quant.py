"""LMDeploy-format asymmetric int8/int4 quantization, in torch (the reference).

Format (LMDeploy 0.18 ``kernels/cuda/fill_kv_cache.py``), per token and head, over
the last axis of ``D`` values ``x``:

* int8: ``scale = (max - min) / 255``, ``zero = -min / scale``, code
  ``q = trunc(x/scale + zero + 0.5)``, one byte per value;
* int4: ``scale = (max - min) / 15``, same ``zero`` and ``q``; byte ``d`` holds
  ``q[d]`` in its low nibble and ``q[d + D/2]`` in its high nibble;
* ``min``/``max`` are exact, and everything after them is fp32 (Triton's ``tl.min``
  and ``tl.max`` return fp32 for fp16/bf16 inputs, so LMDeploy's kernel never
  rounds ``max - min`` to the cache dtype);
* ``scale_zero[..., 0] = scale``, ``scale_zero[..., 1] = zero``, stored in the cache
  dtype (round to nearest even).

One intentional deviation, only where LMDeploy's own kernel would store an unusable
pair (the scale or zero rounds to 0/inf/NaN in the cache dtype: a constant vector
gives ``scale = 0`` and ``zero = -min/0``; a tiny range far from zero overflows an
fp16 ``zero``): such rows use ``scale = 1`` if the vector is constant, else
``scale = max(scale, |min| * 2**-14)`` (so ``|zero| <= 16384``), falling back to 1 if
that still rounds to 0; ``zero = -min / scale``.  Codes are clamped to
``[0, 2**bits - 1]`` (a no-op for every other row).  Constant vectors thus come
back exactly instead of as NaN.

Dequantization (LMDeploy ``flatten_kv_cache.py``: ``x = q*scale - scale*zero``):
``scale*zero`` is rounded to the cache dtype, ``q*scale`` is exact in fp32, their
difference is taken in fp32 and rounded once to the cache dtype.
"""
from __future__ import annotations

import torch

QUANT_BITS = (8, 4)


def _check(x: torch.Tensor, bits: int) -> None:
    if bits not in QUANT_BITS:
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"quantize needs a float16/bfloat16 tensor, got {x.dtype}")
    if bits == 4 and x.shape[-1] % 2:
        raise ValueError(f"int4 needs an even head_dim, got {x.shape[-1]}")


def quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x[..., D]`` -> (codes uint8 ``[..., D or D/2]``, scale_zero ``[..., 2]`` in ``x.dtype``)."""
    _check(x, bits)
    dtype = x.dtype
    xf = x.float()
    mn = xf.amin(dim=-1)
    mx = xf.amax(dim=-1)
    scale = (mx - mn) / (255 if bits == 8 else 15)
    zero = -mn / scale
    scale_st = scale.to(dtype)
    zero_st = zero.to(dtype)
    bad = (scale_st == 0) | ~torch.isfinite(zero_st) | ~torch.isfinite(scale_st)
    one = torch.ones_like(scale)
    fallback = torch.where(scale == 0, one, torch.maximum(scale, mn.abs() * 2.0 ** -14))
    fallback = torch.where(fallback.to(dtype) == 0, one, fallback)
    scale = torch.where(bad, fallback, scale)
    zero = torch.where(bad, -mn / scale, zero)
    qmax = 255 if bits == 8 else 15
    qf = xf / scale[..., None] + zero[..., None] + 0.5
    q = qf.clamp(0, qmax).to(torch.uint8)
    if bits == 4:
        half = x.shape[-1] // 2
        q = q[..., :half] + q[..., half:] * 16
    return q.contiguous(), torch.stack([scale.to(dtype), zero.to(dtype)], dim=-1)


def dequantize(codes: torch.Tensor, scale_zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`quantize`: returns ``[..., D]`` in ``scale_zero.dtype``."""
    if bits not in QUANT_BITS:
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, got {codes.dtype}")
    dtype = scale_zero.dtype
    if bits == 4:
        q = torch.cat([codes & 15, codes >> 4], dim=-1)
    else:
        q = codes
    s = scale_zero[..., 0].float()
    sz = (scale_zero[..., 0].float() * scale_zero[..., 1].float()).to(dtype).float()
    return (q.float() * s[..., None] - sz[..., None]).to(dtype)
