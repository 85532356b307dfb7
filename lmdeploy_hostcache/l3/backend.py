"""Open the Mooncake Store client described by an ``L3Config``.

Invariants: ``mooncake`` is imported only here and only when a store is opened; a failed
import or ``setup`` raises ``L3Unavailable`` naming the master address (the start-up error the
issue asks for), after a plain TCP probe of the master (Mooncake's own ``setup`` retries for
minutes against a dead address); ``setup`` itself runs under ``setup_timeout_s`` (it blocks while the master
does not answer).
"""
from __future__ import annotations

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
        raise L3Unavailable(f"l3: cannot reach the Mooncake master at {config.master_address} "
                            f"(setup returned {result.get('ret')}; metadata {config.metadata_server}, "
                            f"protocol {config.protocol})")
    return store


def connect(config: L3Config, metrics: Any = None, logger: Any = None, setup_timeout_s: float = 30.0):
    """The node's store client at start-up, per ``config.on_unreachable``.

    ``error`` (default): an unreachable store raises ``L3Unavailable`` naming the address (the
    engine refuses to start). ``warn``: one warning naming the address, and ``None``: the node
    runs with GPU and host tiers only.
    """
    from .client import L3Client  # noqa: PLC0415

    try:
        store = open_mooncake(config, setup_timeout_s)
    except L3Unavailable as exc:
        if config.on_unreachable != "warn":
            raise
        import logging  # noqa: PLC0415

        (logger or logging.getLogger("lmdeploy_hostcache.l3")).warning(
            "%s; on_unreachable is 'warn': this node runs without the shared L3 tier", exc)
        return None
    return L3Client(store, timeout_s=config.timeout_s, metrics=metrics)
