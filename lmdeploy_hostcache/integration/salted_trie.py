"""LMDeploy's GPU ``BlockTrie`` partitioned by per-request cache salt (issue 16).

Stock LMDeploy 0.18.0 keeps one trie root per LoRA adapter, so two requests with the same prompt
share GPU blocks whatever their tenants.  ``install_salted_trie(trie)`` swaps the trie instance's
class for a subclass (the ``Scheduler.__init__`` post-hook in ``activate.py`` does it for every
engine) whose roots are keyed ``adapter_name`` for unsalted requests (stock: same key, same root)
and ``(adapter_name, salt)`` for a salted one (``request_salt.sequence_salt``).  A salted root
carries its salt as ``request_salt.ROOT_SALT_ATTR`` so the host tier chains its digests from the
salted root.  The upstreamable form is ``patches/0008-prefix-cache-salt.diff``.

Overridden (each pinned in ``guard.PATCHED_TARGETS``): ``match`` and ``allocate`` (they set the
request's salt for the root lookup below), ``_get_or_create_root`` (the salted key),
``_cursor_belongs_to_trie`` (a salted root is registered under its salted key) and
``_match_state_checkpoint_prefix`` (SSM checkpoints are indexed by adapter only, so a salted
request on such a model is a miss: no reuse rather than reuse across salts).  The trie's checkpoint
index is wrapped too (``StateCheckpointIndex.candidates``, the stock match's only way to checkpoint
nodes): it offers only nodes under an unsalted root, so an unsalted request never reuses a salted
request's checkpoint (its KV blocks and recurrent state), nor lands its cursor on a salted path.

Invariants: a trie match never crosses salts (every match starts at the request's own root or at
its own cursor, and children are only reached from a parent; no checkpoint lookup offers a node
under another salt's root); unsalted requests behave exactly as stock where no salted request
published anything; the salt is never logged; the roots follow the cached blocks, not the salts ever seen
(salted roots without a child are swept once the roots reach ``PRUNE_MIN_ROOTS``, then twice
what the last sweep left).
"""
from __future__ import annotations

from lmdeploy.pytorch.paging.block_trie.node import Node

from .request_salt import ROOT_SALT_ATTR, sequence_salt

__all__ = ["install_salted_trie", "root_key"]

_CUR_SALT = "_hostcache_cur_salt"
_PRUNE_AT = "_hostcache_prune_roots_at"
PRUNE_MIN_ROOTS = 1024   # salted roots are swept for empty ones once the roots reach this, then 2x what is left
_classes: dict[type, type] = {}


def root_key(adapter_name, salt: str):
    """The ``_roots`` key of a trie root: ``adapter_name`` (stock) or ``(adapter_name, salt)``."""
    return (adapter_name, salt) if salt else adapter_name


def _salted_class(base: type) -> type:
    cls = _classes.get(base)
    if cls is not None:
        return cls

    class SaltedBlockTrie(base):
        __hostcache_salted__ = True

        def _get_or_create_root(self, adapter_name):
            salt = self.__dict__.get(_CUR_SALT, "")
            key = root_key(adapter_name, salt)
            root = self._roots.get(key)
            if root is None:
                root = Node(-1, -1, None, adapter_name=adapter_name)
                if salt:
                    setattr(root, ROOT_SALT_ATTR, salt)
                    if len(self._roots) >= self.__dict__.get(_PRUNE_AT, PRUNE_MIN_ROOTS):
                        self._prune_empty_salted_roots()
                self._roots[key] = root
            return root

        def _prune_empty_salted_roots(self):
            """Drop salted roots with no child block: a client may send a new salt with every request,
            and a root is never removed otherwise. A sequence whose cursor was such a root matches
            nothing there (it had no children), and its next allocation finds the cursor detached
            (``_cursor_belongs_to_trie``) and starts at a fresh root of the same salt, as LMDeploy
            does for any stale cursor."""
            roots = self._roots
            for key in [k for k, r in roots.items()
                        if isinstance(k, tuple) and not r.children and getattr(r, "state_checkpoint", None) is None]:
                del roots[key]
            self.__dict__[_PRUNE_AT] = max(PRUNE_MIN_ROOTS, 2 * len(roots))

        def _cursor_belongs_to_trie(self, node):
            if node.parent is None:
                key = root_key(node.adapter_name, getattr(node, ROOT_SALT_ATTR, ""))
                return node.block_id < 0 and self._roots.get(key) is node
            return node.is_attached()

        def _match_state_checkpoint_prefix(self, seq):
            if not sequence_salt(seq):
                return super()._match_state_checkpoint_prefix(seq)
            # the miss path of the stock method: keep the cursor, no checkpoint reuse
            initial = seq.prefix_cache.trie_cursor
            if initial is None:
                initial = self._get_or_create_root(seq.adapter_name)
            seq.prefix_cache.trie_cursor = initial
            seq.prefix_cache.recompute_overlap.clear_fresh_block_range()
            self._record_match_stats(seq, query_tokens=seq.num_all_ids - initial.prefix_len)

        def match(self, seq):
            self.__dict__[_CUR_SALT] = sequence_salt(seq)
            try:
                return super().match(seq)
            finally:
                self.__dict__[_CUR_SALT] = ""

        def allocate(self, seq):
            self.__dict__[_CUR_SALT] = sequence_salt(seq)
            try:
                return super().allocate(seq)
            finally:
                self.__dict__[_CUR_SALT] = ""

    SaltedBlockTrie.__name__ = SaltedBlockTrie.__qualname__ = "Salted" + base.__name__
    _classes[base] = SaltedBlockTrie
    return SaltedBlockTrie


def _under_unsalted_root(node) -> bool:
    """``node`` is attached under a root without a salt (a detached node, whose walk ends at a block, is not)."""
    top = node
    while top.parent is not None:
        top = top.parent
    return top.block_id < 0 and not getattr(top, ROOT_SALT_ATTR, "")


def install_salted_trie(trie) -> None:
    """Make ``trie`` (a ``BlockTrie``) honour per-request cache salts (idempotent)."""
    if trie is None or getattr(type(trie), "__hostcache_salted__", False):
        return
    trie.__class__ = _salted_class(type(trie))
    index = getattr(trie, "_checkpoint_index", None)
    if index is not None:
        # salted requests never look checkpoints up (the override above): the stock lookup serves unsalted
        # ones, which must not reach a checkpoint published under a salted root
        candidates = index.candidates
        index.candidates = lambda key: tuple(n for n in candidates(key) if _under_unsalted_root(n))
