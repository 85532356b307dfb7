"""Shared fixtures: the read-only traces beside the clone (``<repo>/../shared/traces``)."""
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED_TRACES = REPO.parent / "shared" / "traces"


@pytest.fixture(scope="session")
def shared_traces() -> Path:
    if not (SHARED_TRACES / "mooncake" / "synthetic_trace.jsonl").exists():
        pytest.skip(f"shared traces folder {SHARED_TRACES} is absent (CI keeps a copy of shared/ beside the clone)")
    return SHARED_TRACES
