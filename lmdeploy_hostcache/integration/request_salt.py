"""Per-request cache salt (issue 16): where a request's salt lives and how it is read.

A request's salt is the string attribute ``cache_salt`` of LMDeploy's ``SchedulerSequence`` (absent
or empty: unsalted).  Every tier reads it through ``sequence_salt`` only:

* LMDeploy's GPU ``BlockTrie`` (``salted_trie.py``): a salted request matches and publishes under
  its own root, keyed ``(adapter_name, salt)``; the root carries the salt as ``ROOT_SALT_ATTR``;
* the host tier (``connector.HostTierScheduler``): the request's digest chain starts at
  ``digest.salted_root(namespace, salt)``, and a trie node's digest chains from its root's salt;
* the shared store (``l3/keys.py``): keys name the chained digest, which already covers the salt.

Invariants: an empty or absent salt is exactly today's behaviour (same trie root, bit-identical
digests); the salt string never leaves the engine process (no log, feed or capture carries it).
"""
from __future__ import annotations

SEQ_SALT_ATTR = "cache_salt"
ROOT_SALT_ATTR = "_hostcache_salt"
MAX_SALT_CHARS = 1024


def sequence_salt(seq) -> str:
    """The request's cache salt ('' when unsalted)."""
    salt = getattr(seq, SEQ_SALT_ATTR, None)
    return salt if isinstance(salt, str) else ""


def node_root_salt(node) -> str:
    """The cache salt of the trie root above ``node`` ('' for an unsalted root or a detached node)."""
    cur = node
    while cur is not None and cur.parent is not None:
        cur = cur.parent
    salt = getattr(cur, ROOT_SALT_ATTR, "") if cur is not None else ""
    return salt or ""


def validate_salt(value, field: str = "cache_salt") -> str:
    """A request field's salt: a string of at most ``MAX_SALT_CHARS`` characters (ValueError naming the field)."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{field} must be a string, got {type(value).__name__}")
    if len(value) > MAX_SALT_CHARS:
        raise ValueError(f"{field} must be at most {MAX_SALT_CHARS} characters, got {len(value)}")
    return value
