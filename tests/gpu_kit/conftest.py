"""The GPU kit lives in scripts/gpu_kit (not a package): put it on sys.path for its tests."""
import sys
from pathlib import Path

KIT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_kit"
if str(KIT) not in sys.path:
    sys.path.insert(0, str(KIT))
