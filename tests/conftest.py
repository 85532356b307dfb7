"""Test-suite wide settings.

Kernels run under Triton's interpreter on machines without CUDA; the variable must
be set before triton is imported anywhere, which is why it lives here.
"""
import os
import shutil

if shutil.which("nvidia-smi") is None and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=60, deadline=None)
settings.register_profile("dev", max_examples=30, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    # tests/e2e: LMDeploy's real engine on CPU (lmdeploy_hostcache.testing); select with -m e2e
    config.addinivalue_line("markers", "e2e: end to end through LMDeploy's real engine or server on CPU (slow)")
