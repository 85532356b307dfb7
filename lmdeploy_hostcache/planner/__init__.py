"""Offline planner: replay request traces through the two-tier index and size the host tier.

No LMDeploy import here (see docs/architecture.md); ``lmdeploy-hostcache plan`` is ``cli.py``.
"""
