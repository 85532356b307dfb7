"""Deterministic prefix oracle: the KV bytes of every token are a function of its whole prefix.

For token position ``p`` of a token list ``t`` the oracle digest is
``xxh3_64(t[0..p] as little-endian uint32, seed)``; the K and V values of every layer, head and
channel are derived from that digest with a counter-based mixer (splitmix64), so two positions
hold the same bytes only when their whole prefixes are equal. The fake forward writes exactly
these bytes and the checker recomputes them independently from the sequence's tokens.

For ``quant_policy`` 8/4 the float values (rounded to the model dtype first, as real K/V states
are) are quantised with LMDeploy's formula from ``kernels/cuda/fill_kv_cache.py``: per token and
head, ``scale = (max - min) / 255`` or ``/ 15`` (fp32: Triton's min/max promote half types),
``zero = -min / scale``,
``q = trunc(x / scale + zero + 0.5)``; INT4 packs channel ``d`` in the low nibble and ``d + D/2``
in the high nibble; ``(scale, zero)`` are stored in ``quant_0`` (K) / ``quant_1`` (V) in the model
dtype. The oracle defines the exact bytes either way.
"""
from __future__ import annotations

import numpy as np
import torch
import xxhash

from lmdeploy.messages import QuantPolicy

from .kv_layout import CpuKVCache

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over='ignore'):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def encode_tokens(tokens) -> bytes:
    return np.asarray(tokens, dtype='<u4').tobytes()


class PrefixOracle:
    """Computes and writes oracle KV bytes into a :class:`CpuKVCache` layout."""

    def __init__(self, cache: CpuKVCache, seed: int = 0x5EED, tp_rank: int = 0):
        self.cache = cache
        self.seed = seed
        cfg = cache.model_config
        self.num_layers = cfg.num_layers
        self.num_heads = cache.views['k_cache'].shape[3]   # heads of this TP rank
        self.head_dim = cfg.head_dim
        self.dtype = cfg.dtype
        self.quant_policy = QuantPolicy(cache.cache_config.quant_policy)
        if self.quant_policy not in (QuantPolicy.NONE, QuantPolicy.INT8, QuantPolicy.INT4):
            raise ValueError(f'harness oracle supports quant_policy 0, 4, 8; got {int(self.quant_policy)}')
        total_heads = cfg.num_key_value_heads
        if total_heads % self.num_heads or not 0 <= tp_rank < total_heads // self.num_heads:
            raise ValueError(f'tp_rank {tp_rank} does not fit {total_heads} KV heads split {self.num_heads} per rank')
        # one constant per (kind, layer, head, channel) of the whole model; a TP rank holds the slice of
        # its heads, so every rank's bytes are exactly its shard of the single-rank bytes
        shape = (2, self.num_layers, 1, total_heads, self.head_dim)
        lane = _splitmix64(np.arange(np.prod(shape), dtype=np.uint64).reshape(shape) + np.uint64(seed))
        self._lane = np.ascontiguousarray(lane[:, :, :, tp_rank * self.num_heads:(tp_rank + 1) * self.num_heads])
        self._block_memo: dict[tuple[int, bytes], dict[str, torch.Tensor]] = {}

    # -- digests -------------------------------------------------------------------------------
    def prefix_digests(self, tokens, start: int, end: int) -> np.ndarray:
        """Oracle digests of positions ``[start, end)`` of ``tokens`` (each over its whole prefix)."""
        tokens = np.asarray(tokens)
        if end > len(tokens):
            raise ValueError(f'positions up to {end} requested for {len(tokens)} tokens')
        hasher = xxhash.xxh3_64(seed=self.seed)
        hasher.update(encode_tokens(tokens[:start]))
        out = np.empty(end - start, dtype=np.uint64)
        for i, tok in enumerate(tokens[start:end]):
            hasher.update(encode_tokens([tok]))
            out[i] = hasher.intdigest()
        return out

    def next_token(self, digest: int) -> int:
        """Deterministic 'sampled' token after a prefix (never a special id below 3)."""
        vocab = self.cache.model_config.vocab_size
        return 3 + int(digest) % (vocab - 3)

    # -- values --------------------------------------------------------------------------------
    def float_values(self, digests: np.ndarray) -> torch.Tensor:
        """``[2 (k, v), layers, T, heads, head_dim]`` float32 values in [-2, 2)."""
        d = np.asarray(digests, dtype=np.uint64).reshape(1, 1, -1, 1, 1)
        mixed = _splitmix64(d ^ self._lane)
        bits = (mixed >> np.uint64(40)).astype(np.float32)  # 24 random bits
        vals = bits * np.float32(4.0 / (1 << 24)) - np.float32(2.0)
        return torch.from_numpy(vals)

    def encode(self, digests: np.ndarray) -> dict[str, torch.Tensor]:
        """Storage tensors ``name -> [layers, T, heads, last]`` for the cache's tensor specs."""
        vals = self.float_values(digests).to(self.dtype)
        if self.quant_policy == QuantPolicy.NONE:
            return {'k_cache': vals[0], 'v_cache': vals[1]}
        out = {}
        for kind, (name, qname) in enumerate((('k_cache', 'quant_0'), ('v_cache', 'quant_1'))):
            q, scale_zero = self._quantize(vals[kind])
            out[name] = q
            out[qname] = scale_zero
        return out

    def _quantize(self, val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        val = val.float()
        if self.quant_policy == QuantPolicy.INT8:
            vmin = val.amin(-1)
            vmax = val.amax(-1)
            # tl.min/tl.max promote fp16/bf16 to fp32, so the kernel's difference is fp32 too
            scales = (vmax - vmin) / 255
            zeros = -vmin / scales
            q = (val / scales[..., None] + zeros[..., None] + 0.5).clamp(0, 255).to(torch.uint8)
        else:
            half = val.shape[-1] // 2
            v1, v2 = val[..., :half], val[..., half:]
            vmin = torch.minimum(v1, v2).amin(-1)
            vmax = torch.maximum(v1, v2).amax(-1)
            scales = (vmax - vmin) / 15
            zeros = -vmin / scales
            q1 = (v1 / scales[..., None] + zeros[..., None] + 0.5).clamp(0, 15).to(torch.uint8)
            q2 = (v2 / scales[..., None] + zeros[..., None] + 0.5).clamp(0, 15).to(torch.uint8)
            q = q1 + q2 * 16
        scale_zero = torch.stack([scales, zeros], dim=-1).to(self.dtype)
        return q, scale_zero

    # -- writes (the fake forward) -------------------------------------------------------------
    def write(self, pages: torch.Tensor, offsets: torch.Tensor, digests: np.ndarray) -> None:
        """Write the oracle bytes of ``len(digests)`` tokens at (kernel page, in-page offset)."""
        if len(digests) == 0:
            return
        pages = torch.as_tensor(pages, dtype=torch.long)
        offsets = torch.as_tensor(offsets, dtype=torch.long)
        for name, data in self.encode(digests).items():
            self.cache.views[name][:, pages, offsets] = data

    # -- expectations (the checker) ------------------------------------------------------------
    def expected_block(self, tokens, block_index: int, num_valid: int | None = None) -> dict[str, torch.Tensor]:
        """Expected storage of block ``block_index`` of ``tokens``: ``name -> [layers, n, heads, last]``.

        ``num_valid`` (default: a full block) limits it to the first positions of the block.
        Full blocks are memoised on the exact prefix bytes.
        """
        bs = self.cache.block_size
        n = bs if num_valid is None else num_valid
        start = block_index * bs
        tokens = np.asarray(tokens)
        key = None
        if n == bs:
            key = (block_index, xxhash.xxh3_128_digest(encode_tokens(tokens[:start + bs])))
            hit = self._block_memo.get(key)
            if hit is not None:
                return hit
        result = self.encode(self.prefix_digests(tokens, start, start + n))
        if key is not None:
            self._block_memo[key] = result
        return result
