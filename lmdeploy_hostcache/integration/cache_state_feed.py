"""The node-side cache-state feed: what this engine holds, per tier, for the cache-aware proxy.

``NodeCacheFeed`` wraps a ``routing.feed.FeedPublisher`` (the protocol lives there) for one
engine's scheduler-side connector (``HostTierScheduler``):

* **host tier**: exact and event-driven: a ``HostIndex.add_listener`` pair publishes a block when
  it becomes RESIDENT and withdraws it when it leaves the index;
* **GPU tier**: LMDeploy's ``BlockTrie`` publishes no events, so the feed makes its own: a
  finished request's trie path is published (``on_request_finished``, from the connector's
  ``request_finished``), so are the blocks running requests added since the last step
  (``on_running``, from ``build_connector_meta``: each request's path up to its first published
  block), an evicted leaf is withdrawn (``on_gpu_evict``, chained after the connector's eviction
  observer), and ``on_step`` (once per engine step) reconciles the published set with the trie,
  which corrects anything the events missed (a leaf that left unobserved, a cleared trie, a path
  the events did not reach).  The reconciliation is a pass started at most every
  ``gpu_refresh_s`` seconds and spread over steps, ``walk_budget`` units per step at most whatever
  the trie's size: it walks the trie (one unit per node visited), publishing each attached node
  not yet published and confirming each published one, then withdraws what was published before
  the pass began and not confirmed by it (one unit each; to find those, a walk that missed some
  copies the published digests once, in C: none does while the eviction observer reports every
  leaf that leaves).  A pass takes about trie nodes / ``walk_budget`` steps, plus one per
  ``walk_budget`` withdrawals; ``on_step(force=True)`` runs a whole new pass at once (tests,
  tools).  Each node's chained digest is the connector's own ``node_digest`` (memoised on the
  trie nodes), so the ids equal the host tier's for the same tokens.  The two views may overlap:
  a restore kept in its host slot (``keep_restored_blocks``, default on) fires no listener, so it
  stays published in the host tier while the GPU tier publishes it too; with
  ``keep_restored_blocks: false`` a restored block leaves the index and is withdrawn from the host
  view;
* capacities (GPU blocks, host slots, block size), the base model's namespace (root, seed; the
  tenant salt never leaves the process) and its fingerprint (the namespace's model: a path, a hub id
  or a content name, ``integration/namespace.py``; KV format; TP).
  Only the base model's namespace is published (LoRA adapters' blocks are not). Blocks of salted
  requests are published in both tiers: their digests chain from the salted root (the salt itself
  never leaves the process), and a proxy that computes a request's ids from the same salt
  (``routing/request.py``) matches them; another tenant's request does not.

``serve_feed`` answers ``GET routing.feed.FEED_PATH?epoch=&since=&max_events=`` from a small
threaded HTTP server in the engine process (the PyTorch engine runs in its own process under
``lmdeploy serve api_server``).  ``attach_from_env`` (called by ``connector.install_scheduler_hook``)
starts it when ``LMDEPLOY_HOSTCACHE_FEED_ADDR=HOST:PORT`` is set; the proxy then reads it with
``--cache-aware-feed-port PORT``.  It binds the port before it attaches anything, so a feed that
cannot be served observes nothing; a second call for the same trie (the hook installed again)
keeps the feed it has and only re-chains its eviction observer.  ``NodeCacheFeed.close`` (from the
connector's ``shutdown``, at engine close) disables the feed, stops and closes its server (the
port is free again, reads are refused) and detaches its listener and eviction observer.  In a
multiprocessing child (LMDeploy's engine process under ``lmdeploy serve api_server``) the server also
closes, and frees its port, the moment the parent process dies (``_watch_parent``; a read that comes
first is answered 503): stock LMDeploy leaves that engine running after a SIGKILL of the server, and
its feed must not outlive the node.

Access (issue 16, ``docs/security.md``): with ``LMDEPLOY_HOSTCACHE_FEED_API_KEYS`` (comma-separated;
use the node's ``--api-keys``) every read must carry ``Authorization: Bearer <one of them>``, else
it is answered 401 with no content.  Without keys the feed is served only on a loopback address
(``127.0.0.1``, ``::1``, ``localhost``; a bare ``PORT`` means ``127.0.0.1``) unless the operator
sets ``LMDEPLOY_HOSTCACHE_FEED_UNAUTHENTICATED=1`` for a private network.  Published ids are keyed
with the cluster secret (``routing.ids``).

Invariants: the publisher is touched under one lock (scheduler thread vs. HTTP threads), and a read
holds it only to copy what it answers (one C-level copy of the ids or events), never while it
encodes them; every GPU digest published as stored belonged to an attached trie node when
published, and is withdrawn when that node leaves (by the eviction observer at once, else by the
end of the first pass that starts after it left); every trie node attached when a pass starts and
still attached when it ends is published by then; one ``on_step`` spends at most ``walk_budget``
units (nodes visited plus stale digests withdrawn); the listener and ``on_step`` never raise into
LMDeploy (a failure is logged and disables the feed); no read is answered with content unless its
bearer token equals a configured key (constant-time compare) or the server has no keys and listens
on loopback (or was explicitly opened); a closed feed publishes nothing and its port accepts no
connection; a connection holds one of the ``FEED_MAX_CONNECTIONS`` slots for at most
``FEED_SOCKET_TIMEOUT_S`` before its request line and headers are in, however slowly they arrive
(one deadline per connection, not per socket read).
"""
from __future__ import annotations

import hmac
import io
import ipaddress
import json
import logging
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from ..routing.feed import FEED_PATH, FeedPublisher, encode_poll
from ..routing.table import GPU, HOST

__all__ = ["ENV_FEED_ADDR", "ENV_FEED_API_KEYS", "ENV_FEED_UNAUTHENTICATED", "NodeCacheFeed", "attach_from_env",
           "bind_feed", "feed_api_keys", "serve_feed"]

ENV_FEED_ADDR = "LMDEPLOY_HOSTCACHE_FEED_ADDR"
ENV_FEED_API_KEYS = "LMDEPLOY_HOSTCACHE_FEED_API_KEYS"
ENV_FEED_UNAUTHENTICATED = "LMDEPLOY_HOSTCACHE_FEED_UNAUTHENTICATED"
FEED_SOCKET_TIMEOUT_S = 30.0  # a feed connection idle this long, or not done sending its request by then, is closed
FEED_MAX_CONNECTIONS = 16     # concurrent feed connections served; more are refused at once
DEFAULT_GPU_REFRESH_S = 0.5
DEFAULT_WALK_BUDGET = 1024   # the most units (trie nodes visited + stale digests withdrawn) one on_step spends
logger = logging.getLogger("lmdeploy_hostcache.cache_state_feed")


class NodeCacheFeed:
    """Publishes one engine's GPU and host prefix-cache contents; see the module docstring."""

    def __init__(self, side, trie, gpu_blocks: int, *, tp: int = 1, host_weight: float = 0.2,
                 gpu_refresh_s: float = DEFAULT_GPU_REFRESH_S, walk_budget: int = DEFAULT_WALK_BUDGET) -> None:
        ns = side.namespaces.for_adapter(None)
        self.side, self.trie = side, trie
        self.lock = threading.Lock()
        self.publisher = FeedPublisher(
            gpu_blocks=int(gpu_blocks), host_blocks=int(side.num_slots), namespace=ns,
            fingerprint={"model": ns.model, "kv_format": ns.kv_format, "tp": int(tp)}, host_weight=host_weight)
        self.gpu_refresh_s = float(gpu_refresh_s)
        self.walk_budget = max(1, int(walk_budget))
        # The published GPU digests (scheduler thread only), each with the number of the last pass that found it
        # in the trie (or during which it was published); _stale counts those marked before the current pass:
        # what is still so when the pass's walk ends has left the trie (the walk meets every node that stayed).
        self._gpu: dict[int, int] = {}
        self._pass = 0
        self._stale = 0
        self._walk: list | None = None      # the current pass's nodes left to visit (None: no walk going on)
        self._leftovers: list | None = None  # after its walk: the digests to check for withdrawal (None: none)
        self._last_walk = float("-inf")     # when the last pass started
        self.last_step_units = 0            # units the last on_step spent
        self.passes = 0                     # passes completed
        self.enabled = True
        self.server = None                  # the HTTP server (serve_feed / attach_from_env)
        self._lifecycle = self._observer = self._first = None   # the eviction chain (chain_eviction)
        stored, removed = self.publisher.listener(HOST)
        self._listener = (self._guard(stored), self._guard(removed))
        side.index.add_listener(*self._listener)

    def chain_eviction(self, lifecycle) -> None:
        """Chain ``on_gpu_evict`` after ``lifecycle``'s eviction observer (the connector's); again when
        that observer was replaced (the hook installed again), never twice in a row."""
        if self._observer is not None and lifecycle._host_tier_observer is self._observer:
            return
        first = lifecycle._host_tier_observer

        def observe(leaf, gpu_block, _first=first, _feed=self):
            if _first is not None:
                _first(leaf, gpu_block)
            _feed.on_gpu_evict(leaf, gpu_block)

        lifecycle._host_tier_observer = observe
        self._lifecycle, self._observer, self._first = lifecycle, observe, first

    def close(self) -> None:
        """Engine close: stop publishing and serving (the port is free again, reads are refused) and
        detach from the host index and the eviction chain. Idempotent; never raises."""
        with self.lock:
            self.enabled = False
        server, self.server = self.server, None
        try:
            if server is not None:
                server.retire()             # its parent watcher ends with it
                server.shutdown()           # serve_forever returns: no new connection is accepted
                server.server_close()       # the port is free
                server.feed = None          # a read still in flight answers 503
        except Exception as exc:
            logger.warning("lmdeploy-hostcache: closing the cache-state feed's server failed: %r", exc)
        try:
            self.side.index.remove_listener(*self._listener)
        except Exception as exc:
            logger.warning("lmdeploy-hostcache: detaching the cache-state feed failed: %r", exc)
        lifecycle, observer = self._lifecycle, self._observer
        self._lifecycle = self._observer = None
        if lifecycle is not None and getattr(lifecycle, "_host_tier_observer", None) is observer:
            lifecycle._host_tier_observer = self._first   # an observer chained after ours keeps it (a no-op now)
        self._first = None

    def _guard(self, fn):
        def call(block):
            if not self.enabled:
                return
            try:
                with self.lock:
                    fn(block)
            except Exception as exc:  # never raise into the host index
                self._disable(exc)
        return call

    def _disable(self, exc: BaseException) -> None:
        self.enabled = False
        logger.warning("lmdeploy-hostcache: cache-state feed disabled after an error: %r", exc)

    def _roots(self) -> list:
        """The trie roots of the base model's blocks (the chains a proxy can match): the unsalted root and
        every salted one (``salted_trie``), whose chains start at the salted root digest, as a proxy chains
        a request carrying that salt."""
        roots = getattr(self.trie, "_roots", None) or {}
        return [r for r in roots.values() if not r.adapter_name]

    def gpu_digests(self) -> set[int]:
        """Digests of every trie block of the base model, in one whole walk (scheduler thread only;
        for checks and tools: the feed itself walks in budgeted steps, ``on_step``)."""
        out: set[int] = set()
        stack = [c for r in self._roots() for c in r.children.values()]
        node_digest = self.side.node_digest
        while stack:
            n = stack.pop()
            if n.block_id >= 0:
                d = node_digest(n)
                if d is not None:
                    out.add(d)
            stack.extend(n.children.values())
        return out

    def published_gpu(self) -> set[int]:
        """The GPU digests published now (scheduler thread only)."""
        return set(self._gpu)

    def on_request_finished(self, seq) -> None:
        """Publish the finished request's trie path (scheduler thread): its deepest trie node and
        every unpublished ancestor, so a conversation's latest blocks are visible right away."""
        if not self.enabled:
            return
        try:
            self._publish_path(seq, confirm=True)
        except Exception as exc:
            self._disable(exc)

    def on_running(self, seqs) -> None:
        """Publish the trie nodes the running requests added since the last step (scheduler thread, once per
        step): from each one's deepest trie node up to the first node already published, so a running
        request's blocks are visible at once, not only by the end of the next pass. O(running requests +
        new blocks)."""
        if not self.enabled:
            return
        try:
            for seq in seqs:
                self._publish_path(seq, confirm=False)
        except Exception as exc:
            self._disable(exc)

    def _publish_path(self, seq, confirm: bool) -> None:
        """Publish ``seq``'s unpublished trie path, deepest node first found. It stops at the first node
        found by the current pass, or with ``confirm`` False at the first published one; with ``confirm``
        a published node on the way is marked found by this pass (it is attached now)."""
        node = getattr(getattr(seq, "prefix_cache", None), "trie_cursor", None)
        gpu, cur = self._gpu, self._pass
        new = []
        while node is not None and node.parent is not None and node.block_id >= 0 and node.is_attached():
            if node.adapter_name:
                return
            d = self.side.node_digest(node)
            if d is None:
                break
            m = gpu.get(d)
            # its ancestors are published too: every node that leaves the trie is reported (on_gpu_evict; in
            # LMDeploy 0.18 only KVBlockLifecycle detaches leaves, through the observer). Were one to leave
            # unreported and come back, its ancestors would be published again by the end of the next pass.
            if m == cur or (m is not None and not confirm):
                break
            if m is None:
                new.append(d)
            else:                    # published, and attached: found now
                gpu[d] = cur
                self._stale -= 1
            node = node.parent
        if new:
            with self.lock:
                for d in reversed(new):
                    gpu[d] = cur
                    self.publisher.stored(GPU, d)

    def on_gpu_evict(self, leaf, gpu_block: int) -> None:
        """Chained after the connector's eviction observer: the leaf leaves the GPU tier."""
        if not self.enabled:
            return
        try:
            d = self.side.node_digest(leaf)
            if d is not None and d in self._gpu:
                with self.lock:
                    if self._gpu.pop(d) != self._pass:
                        self._stale -= 1
                    self.publisher.removed(GPU, d)
        except Exception as exc:
            self._disable(exc)

    def on_step(self, force: bool = False) -> None:
        """Reconcile the GPU tier's published contents with the trie (scheduler thread), spending at
        most ``walk_budget`` units: a pass starts at most every ``gpu_refresh_s`` seconds and goes on
        over the next steps until it is whole; ``force`` starts a new pass and runs all of it now."""
        if not self.enabled:
            return
        self.last_step_units = 0
        try:
            if force or (self._walk is None and self._leftovers is None):
                now = time.monotonic()
                if not force and now - self._last_walk < self.gpu_refresh_s:
                    return
                self._last_walk = now
                self._pass += 1          # every published digest is stale until this pass finds it
                self._stale = len(self._gpu)
                self._walk = self._roots()   # a root is visited as one node: its children go on the stack
                self._leftovers = None
            budget = None if force else self.walk_budget
            stored, removed, units = [], [], 0
            if self._walk is not None:
                units = self._walk_some(budget, stored)
                if not self._walk:
                    self._walk = None
                    # what the walk did not find has left the trie; a copy of the keys (in C) only when some did
                    self._leftovers = list(self._gpu) if self._stale else []
            if self._leftovers is not None and (budget is None or units < budget):
                units += self._withdraw_some(None if budget is None else budget - units, removed)
                if not self._leftovers or not self._stale:
                    self._leftovers = None
                    self.passes += 1
            self.last_step_units = units
            if stored or removed:
                with self.lock:
                    for d in stored:
                        self.publisher.stored(GPU, d)
                    for d in removed:
                        self.publisher.removed(GPU, d)
        except Exception as exc:
            self._disable(exc)

    def _walk_some(self, budget: int | None, stored: list) -> int:
        """Visit up to ``budget`` nodes of the pass's walk (all with None): mark a published node's
        digest found, queue an unpublished one in ``stored``. Returns the nodes visited."""
        stack = self._walk
        gpu, cur, node_digest = self._gpu, self._pass, self.side.node_digest
        units = found = 0
        low = len(stack)                 # stack[:low] was queued by earlier steps: may have left the trie since
        while stack and (budget is None or units < budget):
            n = stack.pop()
            units += 1
            if n.block_id < 0:           # one of the pass's roots
                stack.extend(n.children.values())
                continue
            if len(stack) < low:
                low = len(stack)
                if not n.is_attached():  # evicted since it was queued (its subtree was, before it)
                    continue
            d = node_digest(n)
            if d is not None:
                m = gpu.get(d)
                if m != cur:
                    gpu[d] = cur
                    if m is None:
                        stored.append(d)
                    else:
                        found += 1
            stack.extend(n.children.values())
        self._stale -= found
        return units

    def _withdraw_some(self, budget: int | None, removed: list) -> int:
        """Check up to ``budget`` of the pass's leftovers (all with None): a digest still stale is
        withdrawn (queued in ``removed``). Returns how many were checked."""
        left, gpu, cur = self._leftovers, self._gpu, self._pass
        units = 0
        while left and self._stale and (budget is None or units < budget):
            d = left.pop()
            units += 1
            m = gpu.get(d)
            if m is not None and m != cur:
                del gpu[d]
                self._stale -= 1
                removed.append(d)
        return units

    def poll(self, epoch=None, since=None, max_events=None) -> dict:
        """``FeedPublisher.poll``, holding the lock only to copy what the answer needs (``take_poll``: a
        snapshot's ids, or the ring's events it answers, one C-level copy); encoded after it is released."""
        with self.lock:
            taken = self.publisher.take_poll(epoch, since, max_events)
        return encode_poll(taken)


def feed_api_keys(environ=None) -> tuple[str, ...]:
    """The bearer tokens a feed read may carry (``LMDEPLOY_HOSTCACHE_FEED_API_KEYS``, comma-separated)."""
    text = (os.environ if environ is None else environ).get(ENV_FEED_API_KEYS, "")
    return tuple(k.strip() for k in text.split(",") if k.strip())


def is_loopback(host: str) -> bool:
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, api_keys, environ=None) -> None:
    """Refuse (ValueError naming the variables) an unauthenticated feed on a non-loopback address."""
    env = os.environ if environ is None else environ
    if api_keys or is_loopback(host) or env.get(ENV_FEED_UNAUTHENTICATED, "") == "1":
        return
    raise ValueError(f"the cache-state feed on {host} would be readable by anyone who can reach it: set "
                     f"{ENV_FEED_API_KEYS} (the node's --api-keys), bind a loopback address, or set "
                     f"{ENV_FEED_UNAUTHENTICATED}=1 on a private network")


def _authorized(header: str | None, api_keys) -> bool:
    if not api_keys:
        return True
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return False
    tok = token.strip().encode()
    ok = False
    for k in api_keys:  # every key compared, constant time each
        ok |= hmac.compare_digest(tok, k.encode())
    return ok


class _DeadlineReader(io.RawIOBase):
    """A feed connection's socket reads, all within one deadline: the socket's own timeout counts
    from the last byte, so a client sending a header byte now and then would hold its slot for ever."""

    def __init__(self, raw, sock, deadline: float) -> None:
        super().__init__()
        self._raw, self._sock, self._deadline = raw, sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the feed request was not received within its deadline")
        self._sock.settimeout(left)
        return self._raw.readinto(b)

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


def bind_feed(host: str, port: int, api_keys=()) -> ThreadingHTTPServer:
    """Bind the feed's HTTP server on ``host:port`` (an OSError if the port is taken); it serves
    ``server.feed`` once ``serve_forever`` runs (``serve_feed``), 503 while that is None.

    With ``api_keys`` every request needs ``Authorization: Bearer <key>`` (else 401, no content).
    """
    api_keys = tuple(api_keys or ())

    class Handler(BaseHTTPRequestHandler):
        timeout = FEED_SOCKET_TIMEOUT_S   # a client that connects and sends nothing is dropped
        rbufsize = 0                      # setup buffers the raw reads itself, under the deadline

        def setup(self):
            super().setup()
            # the request line and headers must all be in within `timeout`, however slowly they come
            self.rfile = io.BufferedReader(_DeadlineReader(self.rfile, self.connection,
                                                           time.monotonic() + self.timeout))

        def parse_request(self):
            ok = super().parse_request()
            self.connection.settimeout(self.timeout)   # the answer: the idle timeout, not the deadline's rest
            return ok

        def do_GET(self):  # noqa: N802 - http.server API
            if not _authorized(self.headers.get("Authorization"), api_keys):
                self.send_response(401)
                self.send_header("WWW-Authenticate", "Bearer")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            url = urlparse(self.path)
            if url.path != FEED_PATH:
                self.send_error(404)
                return
            q = parse_qs(url.query)
            try:
                epoch = q.get("epoch", [None])[0]
                since = int(q["since"][0]) if "since" in q else None
                max_events = int(q["max_events"][0]) if "max_events" in q else None
            except ValueError:
                self.send_error(400, "since and max_events must be integers")
                return
            if _orphaned():
                # the api_server that started this engine process died (SIGKILL): LMDeploy leaves the engine
                # running; its view would outlive the node, and a node restarted at this address could not
                # serve its own feed. Answer 503 and free the port.
                self.send_error(503, "cache-state feed closed: this engine's api_server process is gone")
                self.server.close_orphaned()
                return
            feed = self.server.feed
            if feed is None or not feed.enabled:
                self.send_error(503, "cache-state feed disabled")
                return
            body = json.dumps(feed.poll(epoch, since, max_events)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # quiet
            pass

    class Server(ThreadingHTTPServer):
        # at most FEED_MAX_CONNECTIONS handler threads inside the engine process: more are refused
        _slots = threading.BoundedSemaphore(FEED_MAX_CONNECTIONS)
        address_family = address_family(host)
        feed = None
        _orphan_closed = False           # close_orphaned ran, or the feed closed first (retire)
        _watch_stop: int | None = None   # write end of the parent watcher's stop pipe (_watch_parent)

        def process_request(self, request, client_address):
            if not self._slots.acquire(blocking=False):
                self.shutdown_request(request)
                return
            super().process_request(request, client_address)

        def process_request_thread(self, request, client_address):
            try:
                super().process_request_thread(request, client_address)
            finally:
                self._slots.release()

        def close_orphaned(self) -> None:
            """Stop serving and free the port, once (from a handler thread: ``shutdown`` waits for the
            serving loop, which runs in another thread)."""
            with _ORPHAN_LOCK:
                if self._orphan_closed:
                    return
                self._orphan_closed = True
            logger.warning("lmdeploy-hostcache: this engine process's api_server is gone (killed?); its "
                           "cache-state feed stops and frees %s:%s (restart the node; this engine process "
                           "should be stopped)", *self.server_address[:2])

            def stop():
                self.shutdown()
                self.server_close()

            threading.Thread(target=stop, name="hostcache-feed-close", daemon=True).start()

        def retire(self) -> None:
            """The feed is closing (``NodeCacheFeed.close``): its parent watcher ends, and a parent that
            dies later closes nothing and logs nothing for it."""
            with _ORPHAN_LOCK:
                self._orphan_closed = True
                stop, self._watch_stop = self._watch_stop, None
            if stop is not None:
                os.close(stop)   # the watcher's read end sees end of file

    server = Server((host, int(port)), Handler)
    server.daemon_threads = True
    return server


_ORPHAN_LOCK = threading.Lock()


def _orphaned() -> bool:
    """Whether this is a multiprocessing child (LMDeploy's engine process under ``lmdeploy serve
    api_server``) whose parent has died. A process that is no such child (an engine in the server's own
    process, a ``nohup``'d server whose shell exited) is never orphaned here."""
    import multiprocessing

    parent = multiprocessing.parent_process()
    return parent is not None and not parent.is_alive()


def _watch_parent(server) -> None:
    """In a multiprocessing child (LMDeploy's engine process), close the feed the moment the parent (the
    api_server) dies: a thread blocked on the parent's sentinel and on a pipe ``Server.retire`` closes
    when the feed closes first (the thread then ends), no polling."""
    import multiprocessing
    from multiprocessing.connection import wait

    parent = multiprocessing.parent_process()
    if parent is None:
        return
    stop_r, server._watch_stop = os.pipe()

    def watch():
        try:
            retired = stop_r in wait([parent.sentinel, stop_r])
        finally:
            os.close(stop_r)
        if not retired:
            server.close_orphaned()

    threading.Thread(target=watch, name="hostcache-feed-parent", daemon=True).start()


def _start(server: ThreadingHTTPServer, feed) -> ThreadingHTTPServer:
    server.feed = feed
    threading.Thread(target=server.serve_forever, name="hostcache-feed", daemon=True).start()
    _watch_parent(server)
    return server


def serve_feed(feed: NodeCacheFeed, host: str, port: int, api_keys=()) -> ThreadingHTTPServer:
    """Serve ``feed`` over HTTP on ``host:port`` from a daemon thread; returns the server
    (``bind_feed``; ``NodeCacheFeed.close`` stops it)."""
    return _start(bind_feed(host, port, api_keys), feed)


def address_family(host: str) -> int:
    """The socket family that serves ``host`` (as ``parse_addr`` returns it: IPv6 without brackets)."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def parse_addr(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPV6]:PORT`` or a bare port (loopback); the host without brackets."""
    if text.strip().isdigit():  # a bare port: loopback
        text = "127.0.0.1:" + text.strip()
    host, sep, port = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:   # an IPv6 address needs its brackets to tell the port apart
        host = ""
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 <= int(port) < 65536:
        raise ValueError(f"{ENV_FEED_ADDR} must be HOST:PORT or [IPV6]:PORT, got {text!r}")
    return host, int(port)


def node_host_weight(side) -> float:
    """The ``host_weight`` this node publishes: its restore time per token over its prefill time per token,
    from the same figures its own restore-or-recompute rule uses (``restore_cost``: the calibration file
    of ``LMDEPLOY_HOSTCACHE_CALIBRATION``, else the assumed figures) and its block bytes over the TP ranks;
    ``routing.cost.DEFAULT_HOST_WEIGHT`` when the block bytes are unknown or the calibration unusable."""
    from ..restore_cost import CalibrationError, load_calibration
    from ..routing.cost import DEFAULT_HOST_WEIGHT, host_weight

    bytes_per_token = getattr(side, "block_transfer_bytes", 0) / max(1, int(getattr(side, "block_size", 1) or 1))
    if bytes_per_token <= 0:
        return DEFAULT_HOST_WEIGHT
    try:
        cal = load_calibration()
    except CalibrationError:
        return DEFAULT_HOST_WEIGHT
    return host_weight(cal.prefill_tokens_per_s, bytes_per_token, cal.restore_gbps * 1e9)


def attach_from_env(side, scheduler) -> NodeCacheFeed | None:
    """Attach a feed to ``side`` and serve it when ``LMDEPLOY_HOSTCACHE_FEED_ADDR`` is set."""
    addr = os.environ.get(ENV_FEED_ADDR, "").strip()
    if not addr:
        return None
    old = getattr(side, "feed", None)
    if old is not None and getattr(old, "trie", None) is scheduler.block_trie:   # the hook installed again
        old.chain_eviction(scheduler.block_trie._kv_lifecycle)
        return old
    server = feed = None
    try:
        dp, dp_rank = getattr(side, "data_parallel", 1), getattr(side, "dp_rank", None)
        if dp > 1:
            logger.warning("lmdeploy-hostcache: %s=%s is the same for all %d data-parallel engines of this node: "
                           "only one of them can serve its feed there, and a proxy with --cache-aware-feed-port routes "
                           "every DP engine of this host approximately (it reads no feed shared by several nodes); "
                           "unset %s with --dp (DP rank %s)", ENV_FEED_ADDR, addr, dp, ENV_FEED_ADDR, dp_rank)
        host, port = parse_addr(addr)
        api_keys = feed_api_keys()
        check_exposure(host, api_keys)
        from ..routing.ids import cluster_key

        cluster_key()   # a too-short LMDEPLOY_HOSTCACHE_CLUSTER_SECRET: refused here, not at the first publish
        server = bind_feed(host, port, api_keys)   # a taken port: refused before anything is attached
        feed = NodeCacheFeed(side, scheduler.block_trie, int(scheduler.cache_config.num_gpu_blocks),
                             tp=int(getattr(side, "tp_size", 1)), host_weight=node_host_weight(side))
        feed.chain_eviction(scheduler.block_trie._kv_lifecycle)
        feed.server = _start(server, feed)
    except Exception as exc:  # the engine runs without a feed rather than not at all
        if feed is not None:    # not served yet: feed.server is None, close only detaches
            feed.close()
        if server is not None:
            server.server_close()
        logger.warning("lmdeploy-hostcache: cache-state feed not started (%s): %r", addr, exc)
        return None
    side.feed = feed
    logger.info("lmdeploy-hostcache: cache-state feed on http://%s:%d%s (%s)", host, port, FEED_PATH,
                "bearer token required" if api_keys else "no authentication")
    return feed
