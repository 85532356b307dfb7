"""Per-request cache salt (issue 16): how a request's salt reaches the scheduler, and how it is read.

The path (each step rebound by ``activate.py``, pinned in ``guard.py``):

1. API process: the JSON endpoints' dependency ``validate_json_request`` (``server_utils``; the
   chat and completion endpoints depend on it) is wrapped by ``salt_dependency``: after the stock
   check it reads the body's ``cache_salt`` (a string of at most ``MAX_SALT_CHARS``; anything else
   is answered 400 naming the field) and, with ``LMDEPLOY_HOSTCACHE_SALT_FROM_API_KEY=1``, the
   caller's bearer token (``--api-keys``), and sets the request's salt in a ``ContextVar``
   (``request_salt_for``: a key-derived salt is a keyed hash of the token, never the token; a body
   salt is nested under it, so a caller can split its own partition but never reach another key's);
2. ``GenerationConfig.__post_init__`` (run in the endpoint's task) copies that salt onto the
   config as ``cache_salt``; the config is pickled to the engine process with it;
3. engine process: ``SamplingParam.from_gen_config`` copies it onto the ``SamplingParam`` that
   LMDeploy stores on the ``SchedulerSequence`` (``seq.sampling_param``).

Every tier reads the salt through ``sequence_salt`` only (``seq.cache_salt`` first, as set by
tests and by the upstream form ``patches/0008``, then ``seq.sampling_param.cache_salt``):

* LMDeploy's GPU ``BlockTrie`` (``salted_trie.py``): a salted request matches and publishes under
  its own root, keyed ``(adapter_name, salt)``; the root carries the salt as ``ROOT_SALT_ATTR``;
* the host tier (``connector.HostTierScheduler``): the request's digest chain starts at
  ``digest.salted_root(namespace, salt)``, and a trie node's digest chains from its root's salt;
* the shared store (``l3/keys.py``): keys name the chained digest, which already covers the salt.

Invariants: an empty or absent salt is exactly today's behaviour (same trie root, bit-identical
digests); the salt string never leaves the engine process (no log, feed or capture carries it).
"""
from __future__ import annotations

import contextvars
import hashlib
import logging
import os

from .autoload import OFF_WORDS

SEQ_SALT_ATTR = "cache_salt"
ENV_SALT_FROM_API_KEY = "LMDEPLOY_HOSTCACHE_SALT_FROM_API_KEY"
_KEY_SALT_LABEL = b"lmdeploy-hostcache api-key salt v1"
current_salt: contextvars.ContextVar[str] = contextvars.ContextVar("lmdeploy_hostcache_cache_salt", default="")
ROOT_SALT_ATTR = "_hostcache_salt"
MAX_SALT_CHARS = 1024


def sequence_salt(seq) -> str:
    """The request's cache salt ('' when unsalted)."""
    salt = getattr(seq, SEQ_SALT_ATTR, None)
    if not salt:
        salt = getattr(getattr(seq, "sampling_param", None), SEQ_SALT_ATTR, None)
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


def salt_from_api_key(authorization: str | None) -> str:
    """A salt derived from a bearer token ('' without one): a keyed hash, never the token itself."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return ""
    return "apikey:" + hashlib.blake2b(token.strip().encode(), key=_KEY_SALT_LABEL, digest_size=16).hexdigest()


_ON_WORDS = ("1", "true", "yes", "on", "y")
_warned_words: set[str] = set()


def salt_from_key_enabled(environ=None) -> bool:
    """Whether ``LMDEPLOY_HOSTCACHE_SALT_FROM_API_KEY`` is on: any value but '', '0', 'false', 'no' (the rule
    of ``LMDEPLOY_HOSTCACHE_DISABLE``). Isolation fails safe: a value it does not know ('enabled', '2')
    turns it on, with one warning naming the variable (before, only '1', 'true' and 'yes' did, and 'on'
    silently left tenants sharing cache)."""
    env = os.environ if environ is None else environ
    word = env.get(ENV_SALT_FROM_API_KEY, "").strip().lower()
    if word not in OFF_WORDS and word not in _ON_WORDS and word not in _warned_words:
        _warned_words.add(word)
        logging.getLogger("lmdeploy_hostcache").warning(
            "lmdeploy-hostcache: %s=%r is not one of %s (on) or 0, false, no (off): taken as on (tenants are "
            "isolated by API key)", ENV_SALT_FROM_API_KEY, word, ", ".join(_ON_WORDS))
    return word not in OFF_WORDS


def request_salt_for(body, authorization: str | None, *, from_api_key: bool) -> str:
    """The salt of one API request: the body's ``cache_salt``, nested under the API key's when enabled.

    Raises ValueError naming ``cache_salt`` when the field is not a string or too long.
    """
    body_salt = validate_salt(body.get("cache_salt") if isinstance(body, dict) else None)
    key_salt = salt_from_api_key(authorization) if from_api_key else ""
    if key_salt and body_salt:
        return f"{key_salt}/{len(body_salt)}:{body_salt}"
    return key_salt or body_salt


def wrap_validate_json_request(original):
    """The async dependency that replaces ``server_utils.validate_json_request`` (see the docstring)."""
    import functools

    from fastapi import HTTPException, Request

    @functools.wraps(original)
    async def validate_json_request(raw_request: Request):
        original(raw_request)
        body = None
        if raw_request.method == "POST":
            try:
                body = await raw_request.json()
            except Exception:
                body = None  # the endpoint reports a malformed body itself
        try:
            salt = request_salt_for(body, raw_request.headers.get("Authorization"),
                                    from_api_key=salt_from_key_enabled())
        except ValueError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        current_salt.set(salt)

    validate_json_request.__hostcache_wrapped__ = True
    return validate_json_request


def stamp_generation_config(config) -> None:
    """``GenerationConfig.__post_init__`` post-hook: the current request's salt, if any."""
    salt = current_salt.get()
    if salt and not getattr(config, SEQ_SALT_ATTR, None):
        setattr(config, SEQ_SALT_ATTR, salt)


def copy_to_sampling_param(param, gen_config) -> None:
    """``SamplingParam.from_gen_config`` post-hook: carry the config's salt to the sequence."""
    salt = getattr(gen_config, SEQ_SALT_ATTR, None)
    if isinstance(salt, str) and salt:
        setattr(param, SEQ_SALT_ATTR, salt)
