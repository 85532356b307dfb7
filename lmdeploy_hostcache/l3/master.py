"""Start and stop a real ``mooncake_master`` on loopback, and open clients to it.

For tests and ``bench transfer`` only (a production master is run by the operator).

Invariants: the master binds 127.0.0.1 only (RPC and metrics; the HTTP metadata server, which
binds every interface in mooncake 0.3.13, is left off: clients use ``P2PHANDSHAKE``); it runs
in its own process group, and ``stop()`` kills that whole group and waits for it, so nothing a
caller started outlives the ``with`` block. ``MC_TCP_BIND_ADDRESS=127.0.0.1`` is set for
clients opened here. Start-up is bounded by ``start_timeout_s``.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .errors import L3Unavailable

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def master_binary() -> str | None:
    """Path of ``mooncake_master`` next to this interpreter, or on PATH; None when absent."""
    here = Path(sys.executable).parent / "mooncake_master"
    if here.exists():
        return str(here)
    return shutil.which("mooncake_master")


def mooncake_import_error() -> str | None:
    """None when ``mooncake.store`` imports, else why not (for skip reasons and doctor)."""
    try:
        import mooncake.store  # noqa: F401, PLC0415
    except Exception as exc:  # noqa: BLE001 - ImportError or a missing shared library (OSError)
        return f"mooncake.store does not import: {type(exc).__name__}: {exc}"
    if master_binary() is None:
        return "mooncake_master binary not found (pip install mooncake-transfer-engine-non-cuda)"
    return None


class LoopbackMaster:
    """``with LoopbackMaster() as m: ... m.address ...``; ``kill()``, ``pause()``/``resume()``
    inject faults."""

    def __init__(self, *, start_timeout_s: float = 20.0, extra_args: tuple[str, ...] = (),
                 log_dir: str | None = None) -> None:
        self.rpc_port = free_port()
        self.metrics_port = free_port()
        self.start_timeout_s = start_timeout_s
        self.extra_args = tuple(extra_args)
        self._log_dir = log_dir
        self.proc: subprocess.Popen | None = None
        self.log_path: str | None = None

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.rpc_port}"

    def start(self) -> LoopbackMaster:
        binary = master_binary()
        if binary is None:
            raise L3Unavailable("mooncake_master binary not found")
        cmd = [binary, f"-rpc_address={LOOPBACK}", f"-rpc_port={self.rpc_port}",
               "-enable_http_metadata_server=false", f"-metrics_host={LOOPBACK}",
               f"-metrics_port={self.metrics_port}", *self.extra_args]
        fd, self.log_path = tempfile.mkstemp(prefix="mooncake_master_", suffix=".log", dir=self._log_dir)
        with os.fdopen(fd, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise L3Unavailable(f"mooncake_master exited with {self.proc.returncode} at start-up "
                                    f"(log: {self.log_path})")
            try:
                socket.create_connection((LOOPBACK, self.rpc_port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise L3Unavailable(f"mooncake_master did not listen on {self.address} within {self.start_timeout_s:g} s")

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def pause(self) -> None:
        """SIGSTOP the master: calls to it block (a client-timeout fault)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL the master's process group and reap it (a master-crash fault)."""
        if self.proc is None:
            return
        self._signal(signal.SIGCONT)
        self._signal(signal.SIGKILL)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not fail
            pass

    stop = kill

    def __enter__(self) -> LoopbackMaster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        if self.log_path and exc[0] is None:
            try:
                os.unlink(self.log_path)
            except OSError:
                pass


def loopback_env() -> None:
    """Make Mooncake clients of this process bind their TCP transport to loopback."""
    os.environ.setdefault("MC_TCP_BIND_ADDRESS", LOOPBACK)
