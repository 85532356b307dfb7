"""Test-suite wide settings.

Kernels run under Triton's interpreter on machines without CUDA; the variable must
be set before triton is imported anywhere, which is why it lives here. Whether CUDA
is there is asked of torch (``torch.cuda.is_available()``, which imports no Triton),
not of ``nvidia-smi`` on PATH: a GPU machine whose image lacks ``nvidia-smi`` on PATH
would otherwise run the CUDA tests' Triton kernels interpreted on CUDA tensors
(the GPU kit's ``run.sh`` unsets the variable for that reason).
"""
import os

import pytest


def _cuda_available() -> bool:
    try:
        import torch
    except Exception:  # noqa: BLE001 - no torch: no CUDA either
        return False
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - a broken driver counts as no CUDA
        return False


if "TRITON_INTERPRET" not in os.environ and not _cuda_available():
    os.environ["TRITON_INTERPRET"] = "1"

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=60, deadline=None)
settings.register_profile("dev", max_examples=30, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    # tests/e2e: LMDeploy's real engine on CPU (lmdeploy_hostcache.testing); select with -m e2e
    config.addinivalue_line("markers", "e2e: end to end through LMDeploy's real engine or server on CPU (slow)")


@pytest.fixture(scope="module")
def lmdeploy_parser():
    """LMDeploy's own CLI parser with the extension activated (its serve flags added); skips when the
    guard refuses this LMDeploy."""
    pytest.importorskip("lmdeploy")
    from lmdeploy_hostcache.integration import activate as act

    st = act.activate()
    if st["status"] != "active":
        pytest.skip(f"activation is {st['status']}: {st['reason']}")
    from lmdeploy.cli.cli import CLI
    from lmdeploy.cli.serve import SubCliServe

    if "api_server" not in SubCliServe.subparsers.choices:  # argparse refuses to add it twice
        CLI.add_parsers()
        SubCliServe.add_parsers()
    return CLI.parser


@pytest.fixture
def recorded(monkeypatch):
    """Replace lmdeploy.serve.openai.api_server (needs fastapi) by a recorder of serve() calls."""
    import sys
    import types

    calls = []
    fake = types.ModuleType("lmdeploy.serve.openai.api_server")
    fake.serve = lambda model_path, **kwargs: calls.append((model_path, kwargs))
    monkeypatch.setitem(sys.modules, "lmdeploy.serve.openai.api_server", fake)
    return calls
