"""A request as the router sees it: prompt tokens -> chained block digests -> published ids.

``RoutingRequest`` holds the prompt's token ids (from the model's tokenizer and chat template,
exactly as the node tokenizes: ``integration/proxy_routing.py`` builds them with LMDeploy's own
prompt processor) and computes, per node namespace, the ids of its full blocks with the
project's ``ChainHasher`` + ``ids.publish_id``: the same digests the node computes for the same
tokens, so a match at the proxy is a match on the node.

Without a tokenizer, ``RoutingRequest.from_text`` degrades to a text-prefix match: the prompt's
UTF-8 bytes stand in for tokens (``TEXT_BYTES_PER_TOKEN`` bytes per token), which only the
approximate index (what the proxy itself routed) can match; the proxy logs that it runs so.

A salted request (``partition``: the cache salt the nodes give it, ``integration/request_salt.py``'s
``request_salt_for``: its ``cache_salt``, nested under its API key's salt where the nodes salt by key)
chains its ids from its salted root, as the node does: it matches only what requests of the same salt
left in the approximate index or in a node's cache (a feed publishes salted blocks chained from their
salted roots), never another tenant's prompts.

A request for a LoRA adapter (``adapter``: the request's ``model`` when it is not the base model the
nodes serve) chains its ids from a root derived from the node's root and the adapter's name: no
node's feed publishes such ids (nodes publish the base model's blocks only, and key an adapter's
blocks under the adapter's own namespace, which the proxy cannot compute), so the router matches it
against nothing exact, and in the approximate index only against requests of the same adapter.

Invariants: ids for a namespace are computed once per request; only full blocks get ids; the
block that ends exactly at the prompt's end is never counted as matchable (LMDeploy always
recomputes the last prompt token); requests of two partitions never share an id.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from ..tier.digest import ChainHasher, salted_root
from .feed import NamespaceKey
from .ids import publish_id

TEXT_BYTES_PER_TOKEN = 4
_ADAPTER_PERSON = b"hc-route-lora"   # blake2b personalization: no cache salt (xxh3) chains to these roots


def adapter_root(root: int, adapter: str) -> int:
    """The router's root for ``adapter``'s requests under a namespace root (proxy-local)."""
    h = hashlib.blake2b(root.to_bytes(16, "little") + adapter.encode("utf-8", "surrogatepass"), digest_size=16,
                        person=_ADAPTER_PERSON)
    return int.from_bytes(h.digest(), "little")


class RoutingRequest:
    """Prompt tokens (or text) + optional session key; ids per namespace on demand."""

    __slots__ = ("tokens", "text_mode", "session", "prompt_tokens", "_ids", "precomputed", "partition", "adapter")

    def __init__(self, tokens: Sequence[int] | np.ndarray | None, *, session: str | None = None,
                 text_mode: bool = False, prompt_tokens: int | None = None, partition: str = "",
                 adapter: str = "") -> None:
        self.tokens = tokens
        self.text_mode = text_mode
        self.session = session
        self.partition = partition
        self.adapter = adapter
        n = len(tokens) if tokens is not None else 0
        self.prompt_tokens = int(prompt_tokens if prompt_tokens is not None
                                 else (n + TEXT_BYTES_PER_TOKEN - 1) // TEXT_BYTES_PER_TOKEN if text_mode else n)
        self._ids: dict[NamespaceKey, np.ndarray] = {}
        self.precomputed: np.ndarray | None = None

    @classmethod
    def from_text(cls, text: str, session: str | None = None, partition: str = "") -> "RoutingRequest":
        """Text-prefix fallback: the UTF-8 bytes are the 'tokens' (approximate index only)."""
        data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        return cls(data, session=session, text_mode=True, partition=partition)

    def set_adapter(self, adapter: str) -> None:
        """Make this a request for LoRA ``adapter`` ("" for the base model): its ids are computed anew."""
        if adapter != self.adapter:
            self.adapter = adapter
            self._ids.clear()

    @classmethod
    def from_ids(cls, ids: np.ndarray, prompt_tokens: int, session: str | None = None) -> "RoutingRequest":
        """Ids already computed in the one namespace every node shares (the planner's replay)."""
        r = cls(None, session=session, prompt_tokens=prompt_tokens)
        r.precomputed = np.asarray(ids, dtype=np.uint64)
        return r

    def ids(self, key: NamespaceKey | None) -> np.ndarray:
        """Published ids of the prompt's full blocks in namespace ``key`` (text mode: only the
        approximate namespace, ``key`` with ``block_size`` in tokens)."""
        if self.precomputed is not None:
            return self.precomputed
        got = self._ids.get(key)
        if got is None:
            if self.tokens is None or key is None:
                got = np.zeros(0, dtype=np.uint64)
            else:
                bs = key.block_size * (TEXT_BYTES_PER_TOKEN if self.text_mode else 1)
                root = key.root
                if self.adapter:
                    root = adapter_root(root, self.adapter)
                if self.partition:
                    root = salted_root(NamespaceKey(root, key.seed, key.block_size), self.partition)
                h = ChainHasher(NamespaceKey(root, key.seed, bs))
                h.extend(self.tokens)
                got = np.fromiter((publish_id(d) for d in h.digests), dtype=np.uint64, count=len(h.digests))
            self._ids[key] = got
        return got

    def matchable(self, block_size: int) -> int:
        """Blocks a node could reuse: full blocks not ending at the prompt's last token."""
        return max(self.prompt_tokens - 1, 0) // block_size
