"""Start ``lmdeploy serve api_server`` as a real child process on 127.0.0.1 (tests, GPU kit).

``api_server(model, ...)`` is a context manager yielding a ``ServerHandle`` (``url``,
``base_url`` for the OpenAI client, ``port``, ``pid``, ``log()``). With ``cpu_shim=True``
(the default when there is no CUDA device) the server runs through
``python -m lmdeploy_hostcache.testing.serve_cpu`` (the CPU shim, in the server process and
in its spawned engine process); otherwise through the plain ``lmdeploy`` CLI.

Invariants: the server binds 127.0.0.1 only, on a free port picked here; it runs in a
new session (process group) and on exit the whole group is terminated (SIGTERM, then
SIGKILL after ``stop_timeout``), so no engine or worker process outlives the block; if the
calling process dies without running that (killed by a timeout), the server gets SIGTERM
(``die_with_parent``) and shuts its engine down itself;
``ServerHandle.stop()`` reports whether the shutdown was clean (exit within the grace
period and no process of the group left). A server that exits or does not answer
``/v1/models`` within ``startup_timeout`` raises ``ServerError`` with its log tail.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

__all__ = ["ServerError", "ServerHandle", "api_server", "die_with_parent", "free_port", "group_processes"]


class ServerError(RuntimeError):
    """The server did not start or did not stop cleanly (the message carries its log tail)."""


def die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGTERM when the process that started it dies (Linux
    ``PR_SET_PDEATHSIG``), so a test runner killed before its ``finally`` (a timeout's
    SIGTERM/SIGKILL) leaves no server behind in its separate session. No-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:  # pragma: no cover - not Linux
        pass


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_processes(pgid: int) -> list[int]:
    """Pids of live (non-zombie) processes whose process group is ``pgid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        rest = stat[stat.rfind(")") + 2:].split()
        if rest[0] != "Z" and int(rest[2]) == pgid:
            pids.append(int(entry))
    return pids


@dataclass
class ServerHandle:
    port: int
    proc: subprocess.Popen
    log_path: str
    stop_timeout: float = 60.0
    stopped: bool = field(default=False, init=False)
    clean_exit: bool | None = field(default=None, init=False)
    leftover_pids: list[int] = field(default_factory=list, init=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self, tail: int | None = None) -> str:
        with open(self.log_path, errors="replace") as fh:
            text = fh.read()
        return text[-tail:] if tail else text

    def get(self, path: str, timeout: float = 30.0) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
                return resp.status, resp.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def post(self, path: str, timeout: float = 120.0) -> tuple[int, str]:
        req = urllib.request.Request(self.url + path, data=b"", method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def stop(self) -> bool:
        """Terminate the server's process group; True when it exited in time and left nothing."""
        if self.stopped:
            return bool(self.clean_exit)
        self.stopped = True
        pgid = self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        clean = True
        try:
            self.proc.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            clean = False
        deadline = time.monotonic() + (self.stop_timeout if clean else 0)
        while group_processes(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        self.leftover_pids = group_processes(pgid)
        if self.leftover_pids or not clean:
            clean = False
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        self.clean_exit = clean
        return clean


def _has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover
        return False


@contextlib.contextmanager
def api_server(model: str, *, host_cache_gb: float | str | None = 1, host_cache_config: str | None = None,
               extra_args: Sequence[str] = (), cpu_shim: bool | None = None, port: int | None = None,
               startup_timeout: float = 300.0, stop_timeout: float = 60.0, env: dict[str, str] | None = None,
               log_dir: str | None = None) -> Iterator[ServerHandle]:
    """Run ``lmdeploy serve api_server MODEL --backend pytorch --enable-prefix-caching`` on
    127.0.0.1 for the duration of the block (see module docstring). ``host_cache_gb=None``
    runs stock LMDeploy (no host tier flag); ``extra_args`` go to the CLI as they are."""
    if cpu_shim is None:
        cpu_shim = not _has_cuda()
    port = port or free_port()
    args = ["serve", "api_server", str(model), "--backend", "pytorch", "--enable-prefix-caching",
            "--server-name", "127.0.0.1", "--server-port", str(port)]
    if cpu_shim:
        args += ["--eager-mode", "--device", "cuda"]
    if host_cache_gb is not None:
        args += ["--host-cache-gb", str(host_cache_gb)]
    if host_cache_config is not None:
        args += ["--host-cache-config", str(host_cache_config)]
    args += [str(a) for a in extra_args]
    if cpu_shim:
        cmd = [sys.executable, "-m", "lmdeploy_hostcache.testing.serve_cpu"] + args
    else:
        cmd = [os.path.join(os.path.dirname(sys.executable), "lmdeploy")] + args
    child_env = dict(os.environ)
    if cpu_shim:
        child_env.update(TRITON_INTERPRET="1", LMDEPLOY_ENABLE_CHECK_ENV="0", OMP_NUM_THREADS="1")
    child_env.update(env or {})
    fd, log_path = tempfile.mkstemp(prefix=f"api_server-{port}-", suffix=".log", dir=log_dir)
    with os.fdopen(fd, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=child_env, start_new_session=True, preexec_fn=die_with_parent)
    handle = ServerHandle(port=port, proc=proc, log_path=log_path, stop_timeout=stop_timeout)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise ServerError(f"api_server exited with {proc.returncode} before answering:\n{handle.log(4000)}")
            try:
                status, _ = handle.get("/v1/models", timeout=5)
                if status == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ServerError(f"api_server did not answer /v1/models within {startup_timeout:.0f} s:\n"
                                  f"{handle.log(4000)}")
            time.sleep(1.0)
        yield handle
    finally:
        handle.stop()
