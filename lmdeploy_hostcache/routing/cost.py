"""The routing cost model: expected prefill work of a request on a node, in prefill-token units.

For a prompt of ``P`` tokens whose first ``g`` blocks are in the node's GPU tier and the next
``h`` blocks in its host tier (block size ``B``; the host run starts where the GPU run ends,
so the two matches are disjoint and add up, even for a block published in both tiers)::

    cost = (P - g*B - h*B)            # tokens the node must prefill
         + host_weight * h*B          # restoring h blocks, priced relative to prefilling them
         + queued_tokens              # prefill work already waiting on that node
    cost /= speed                     # a faster node drains the same tokens sooner

``host_weight`` is (seconds to restore one token's KV from host) / (seconds to prefill one
token) on that node: ``prefill_tokens_per_s * bytes_per_token / h2d_bytes_per_s``.  A host
match is therefore a real token count discounted by what it costs, never a credit applied
to a block count (a pitfall the cluster study records in other routers).

Invariants: ``cost`` is a pure function; a node's GPU match never costs more than the same
match on its host tier, which never costs more than a miss (``0 <= host_weight <= 1`` after
clamping: restoring slower than recomputing would not be done by the node either, since its
``min_restore_tokens`` rule recomputes).
"""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_HOST_WEIGHT = 0.2


def host_weight(prefill_tokens_per_s: float, bytes_per_token: float, h2d_bytes_per_s: float) -> float:
    """Restore cost per token relative to prefill cost per token, clamped to [0, 1]."""
    if prefill_tokens_per_s <= 0 or h2d_bytes_per_s <= 0 or bytes_per_token < 0:
        raise ValueError("prefill_tokens_per_s and h2d_bytes_per_s must be > 0, bytes_per_token >= 0")
    return min(1.0, max(0.0, prefill_tokens_per_s * bytes_per_token / h2d_bytes_per_s))


@dataclass(frozen=True)
class NodeProfile:
    """What the router knows about a node's tiers (from its feed, or registered by hand)."""

    gpu_blocks: int
    host_blocks: int
    block_size: int
    host_weight: float = DEFAULT_HOST_WEIGHT
    speed: float = 1.0        # relative prefill throughput (1.0 = the reference GPU)

    def __post_init__(self) -> None:
        for name in ("gpu_blocks", "host_blocks", "block_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0 or (name == "block_size" and v == 0):
                raise ValueError(f"NodeProfile.{name} must be an int >= {1 if name == 'block_size' else 0}, got {v!r}")
        if not 0.0 <= float(self.host_weight) <= 1.0:
            raise ValueError(f"NodeProfile.host_weight must be in [0, 1], got {self.host_weight!r}")
        if not float(self.speed) > 0:
            raise ValueError(f"NodeProfile.speed must be > 0, got {self.speed!r}")

    @property
    def capacity_blocks(self) -> int:
        return self.gpu_blocks + self.host_blocks


def cost(prompt_tokens: int, gpu_blocks: int, host_blocks: int, profile: NodeProfile,
         queued_tokens: float = 0.0) -> float:
    """Expected prefill work (see the module docstring)."""
    bs = profile.block_size
    g, h = gpu_blocks * bs, host_blocks * bs
    miss = max(prompt_tokens - g - h, 0)
    return (miss + profile.host_weight * h + queued_tokens) / profile.speed
