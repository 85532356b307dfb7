"""Open the Mooncake Store client described by an ``L3Config``.

Invariants: ``mooncake`` is imported only here and only when a store is opened; a failed
import or ``setup`` raises ``L3Unavailable`` naming the master address (the start-up error the
issue asks for), after a plain TCP probe of the master (Mooncake's own ``setup`` retries for
minutes against a dead address) and a setup in a child process killed at ``setup_timeout_s``
(``_setup_in_child``: against a master that accepts connections but does not answer, Mooncake's setup
holds the GIL for about ten minutes, so no deadline in this process could fire); the setup here then
runs on a thread joined with the same timeout; ``connect`` warns when this node's segment is on a loopback address while its
master is not (``segment_address_warning``); the ``L3Client`` that ``connect`` returns knows the local buffer's size
(``local_buffer_gb``) and splits its batches to fit it.
"""
from __future__ import annotations

import functools
import os
import socket
import threading
from typing import Any

from .config import L3Config
from .errors import L3Unavailable


def _probe(address: str, timeout_s: float) -> None:
    """A plain TCP connect to the master: Mooncake's own setup retries for minutes instead."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise L3Unavailable(f"l3: cannot reach the Mooncake master at {address}: {exc.strerror or exc}") from None


def master_refusal(address: str, timeout_s: float = 5.0) -> str | None:
    """Why the master at ``address`` cannot be reached by TCP (None when it accepts a connection)."""
    try:
        _probe(address, timeout_s)
        return None
    except L3Unavailable as exc:
        return str(exc).removeprefix("l3: ")


def _master_answers(address: str) -> bool:
    """The client's probe before it calls again after a backoff (a dead master refuses at once)."""
    return master_refusal(address, 0.5) is None


def _loopback(host: str) -> bool:
    import ipaddress  # noqa: PLC0415

    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def segment_address_warning(config: L3Config) -> str | None:
    """The warning for a node that contributes its segment on a loopback address while its master is
    on another host: the other nodes, which read objects placed in that segment, cannot reach it (each
    such read fails and the turn recomputes). None when the addresses agree."""
    master_host = config.master_address.rpartition(":")[0]
    if _loopback(config.local_hostname) and not _loopback(master_host):
        return (f"l3.local_hostname is {config.local_hostname} but the Mooncake master is at "
                f"{config.master_address}: other nodes cannot reach the segment this node contributes, so "
                f"objects placed there cannot be restored elsewhere; set l3.local_hostname to this node's "
                f"address as the other nodes reach it")
    return None


# run by ``_setup_in_child``: Mooncake's setup against the master, then close, in a process of its own
_CHILD_SETUP = """
import json, sys
from mooncake.store import MooncakeDistributedStore
a = json.loads(sys.argv[1])
store = MooncakeDistributedStore()
code = store.setup(a["host"], a["metadata"], a["segment"], a["buffer"], a["protocol"], a["devices"], a["master"])
print(code, flush=True)
if code == 0:
    store.close()
"""


def _setup_in_child(config: L3Config, timeout_s: float) -> None:
    """Mooncake's ``setup`` (and ``close``) in a child process, killed at ``timeout_s``: raises
    ``L3Unavailable`` when the master accepts TCP connections but does not answer setup in time (hung,
    SIGSTOPped, partitioned). In this process Mooncake's setup holds Python's GIL while it retries (about
    20 tries, 30 s apart), so no thread of ours could keep a deadline; a child can be killed. The child
    contributes the smallest segment Mooncake accepts and closes at once."""
    import json  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    from .config import MIN_SEGMENT_BYTES  # noqa: PLC0415

    args = json.dumps({"host": config.local_hostname, "metadata": config.metadata_server,
                       "segment": MIN_SEGMENT_BYTES, "buffer": MIN_SEGMENT_BYTES, "protocol": config.protocol,
                       "devices": config.rdma_devices, "master": config.master_address})
    env = dict(os.environ, LMDEPLOY_HOSTCACHE_DISABLE="1")
    # whatever the child's setup answers, the setup here answers it again, with its message: only the
    # timeout is the child's to report (and a child that cannot start leaves the check to the setup here)
    try:
        subprocess.run([sys.executable, "-c", _CHILD_SETUP, args], capture_output=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        raise L3Unavailable(f"l3: the Mooncake master at {config.master_address} accepts connections but did "
                            f"not answer setup within {timeout_s:g} s (hung or partitioned?)") from None
    except OSError:
        pass


def open_mooncake(config: L3Config, setup_timeout_s: float = 30.0) -> Any:
    """A set-up ``MooncakeDistributedStore``; raises ``L3Unavailable`` naming the address."""
    if config.protocol == "tcp" and config.local_hostname in ("127.0.0.1", "localhost"):
        os.environ.setdefault("MC_TCP_BIND_ADDRESS", "127.0.0.1")
    try:
        from mooncake.store import MooncakeDistributedStore  # noqa: PLC0415
    except Exception as exc:  # noqa: BLE001 - ImportError or a missing libibverbs (OSError)
        raise L3Unavailable(f"l3: cannot use the Mooncake Store at {config.master_address}: "
                            f"mooncake.store does not import ({type(exc).__name__}: {exc}); install "
                            "mooncake-transfer-engine-non-cuda and libibverbs1 libnl-3-200 "
                            "libnl-route-3-200") from None
    _probe(config.master_address, min(setup_timeout_s, 5.0))
    _setup_in_child(config, setup_timeout_s)
    store = MooncakeDistributedStore()
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["ret"] = store.setup(config.local_hostname, config.metadata_server,
                                        config.global_segment_bytes, config.local_buffer_bytes,
                                        config.protocol, config.rdma_devices, config.master_address)
        except Exception as exc:  # noqa: BLE001
            result["exc"] = exc

    t = threading.Thread(target=run, name="l3-setup", daemon=True)
    t.start()
    t.join(setup_timeout_s)
    if t.is_alive():
        raise L3Unavailable(f"l3: the Mooncake master at {config.master_address} did not answer "
                            f"setup within {setup_timeout_s:g} s")
    if "exc" in result:
        raise L3Unavailable(f"l3: Mooncake Store setup with master {config.master_address} failed: "
                            f"{result['exc']}")
    if result.get("ret") != 0:
        raise L3Unavailable(f"l3: Mooncake Store setup with the master at {config.master_address} failed "
                            f"(setup returned {result.get('ret')}; metadata {config.metadata_server}, "
                            f"protocol {config.protocol}, segment {config.global_segment_bytes} bytes, buffer "
                            f"{config.local_buffer_bytes} bytes): the master answered a TCP connect, so the "
                            f"master refused this client or its transfer engine could not start; see "
                            f"Mooncake's log above")
    return store


def connect(config: L3Config, metrics: Any = None, logger: Any = None, setup_timeout_s: float = 30.0):
    """The node's store client at start-up, per ``config.on_unreachable``.

    ``error`` (default): an unreachable store raises ``L3Unavailable`` naming the address (the
    engine refuses to start). ``warn``: one warning naming the address, and ``None``: the node
    runs with GPU and host tiers only.
    """
    import logging  # noqa: PLC0415

    from .client import L3Client  # noqa: PLC0415

    log = logger or logging.getLogger("lmdeploy_hostcache.l3")
    warning = segment_address_warning(config)
    if warning is not None:
        log.warning("%s", warning)
    try:
        store = open_mooncake(config, setup_timeout_s)
    except L3Unavailable as exc:
        if config.on_unreachable != "warn":
            raise
        log.warning("%s; on_unreachable is 'warn': this node runs without the shared L3 tier", exc)
        return None
    # the client splits its batches to fit the buffer Mooncake moves every object through
    return L3Client(store, timeout_s=config.timeout_s, metrics=metrics, buffer_bytes=config.local_buffer_bytes,
                    probe=functools.partial(_master_answers, config.master_address))
