"""``lmdeploy`` command line with the CPU shim: ``python -m lmdeploy_hostcache.testing.serve_cpu serve api_server ...``.

The shim is installed at import, before LMDeploy is imported. The CLI runs only under
``if __name__ == "__main__"``: ``api_server`` starts its engine in a *spawned* process
(``enable_mp_engine``), which re-imports this module as ``__mp_main__``; that import must
install the shim again (a fresh interpreter) and must not start a second server.
``HOSTCACHE_CPU_SHIM_SMS`` sets the fake multiprocessor count (default 2: smaller
decode-attention grids run faster in Triton's interpreter). Testing only.

Start-up race worked around here (LMDeploy 0.18.0, ``mp_engine/zmq_engine.py``):
``ZMQMPEngine._start_mp_proc`` leaves its ``mp.Manager()`` block as soon as it has read the
engine process's RPC port, which shuts the manager down while the engine process may still
be releasing the manager's ``Condition`` (``with condition:`` in ``_mp_proc``); that process
then dies with ``EOFError`` and the server never starts. Seen on the loaded 2-core CI machine.
The manager is kept alive ``MANAGER_LINGER_S`` seconds after the port is read.

Shutdown hang worked around here (same file, ``ZMQMPEngine.close`` -> ``AsyncRPCClient.close_sockets``):
the client closes its sockets with pyzmq's default linger (forever) and then terminates their
contexts, which waits for every unsent message; with a request still queued at SIGTERM the server
process hangs after "Closing mp engine." (seen once on the loaded CI machine, in the stock reference
server of ``tests/e2e/test_live_server.py``). The sockets are closed with linger 0: the engine
process is being terminated anyway, so nothing queued can still be delivered.
"""
import os
import sys
import time
import types

from lmdeploy_hostcache.testing import cpu_shim

cpu_shim.install(fake_sms=int(os.environ.get("HOSTCACHE_CPU_SHIM_SMS", "2")))

MANAGER_LINGER_S = 3.0


class _LingeringManager:
    def __init__(self, manager):
        self._manager = manager

    def __enter__(self):
        return self._manager.__enter__()

    def __exit__(self, *exc):
        time.sleep(MANAGER_LINGER_S)
        return self._manager.__exit__(*exc)


def _keep_manager_alive() -> None:
    from lmdeploy.pytorch.engine.mp_engine import zmq_engine

    real_mp = zmq_engine.mp
    proxy = types.ModuleType(real_mp.__name__)
    proxy.__dict__.update({k: v for k, v in vars(real_mp).items() if not k.startswith("__")})
    proxy.Manager = lambda *a, **k: _LingeringManager(real_mp.Manager(*a, **k))
    zmq_engine.mp = proxy


def _close_rpc_sockets_at_once() -> None:
    from lmdeploy.pytorch.engine.mp_engine import zmq_rpc

    def close_sockets(self):
        self.async_socket.close(linger=0)
        self.sync_socket.close(linger=0)
        self.async_ctx.term()
        self.sync_ctx.term()

    zmq_rpc.AsyncRPCClient.close_sockets = close_sockets


if __name__ == "__main__":
    import torch

    torch.set_num_threads(int(os.environ.get("HOSTCACHE_CPU_SHIM_THREADS", "1")))
    _keep_manager_alive()
    _close_rpc_sockets_at_once()
    from lmdeploy.cli.entrypoint import run

    sys.argv = ["lmdeploy"] + sys.argv[1:]
    sys.exit(run())
