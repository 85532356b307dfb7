"""Privacy-safe request-trace capture (pure: no lmdeploy, no torch).

``keys.CaptureKey`` turns chained block digests into keyed block ids; ``record`` builds one
Mooncake-layout JSON line per request (what ``lmdeploy-hostcache plan`` reads); ``encoder`` turns
a batch of captured requests into those lines; ``encoder_process`` is the helper process that
runs ``encoder`` and ``writer`` off the engine's scheduler thread; ``writer`` appends lines to a
size-rotated file and never raises into serving.  The LMDeploy glue is
``lmdeploy_hostcache/integration/trace_capture.py``; docs/planner.md "Capturing your own
traffic" says what a capture reveals and what it does not.
"""
from .keys import CAPTURE_KEY_ENV, CaptureKey
from .record import capture_line, capture_record
from .writer import RotatingWriter

__all__ = ["CAPTURE_KEY_ENV", "CaptureKey", "capture_line", "capture_record", "RotatingWriter"]
