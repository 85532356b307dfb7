"""Everything that touches LMDeploy: activation, version guard, refusals, CLI flags,
engine-config field, metrics export, and (owned by the connector work) the connector.

This package is imported by the ``.pth`` auto-loader at every interpreter start, so it
must stay tiny: no LMDeploy, torch or triton import here. Public names resolve lazily.
"""
from __future__ import annotations

__all__ = ["with_host_cache", "host_tier_transfer_config", "CONNECTOR_NAME", "UnsupportedConfiguration"]

# Activation by hand (when the .pth did not run, e.g. under ``python -S``):
#     from lmdeploy_hostcache.integration.activate import activate; activate()
_LAZY = {
    "with_host_cache": ("engine_config", "with_host_cache"),
    "host_tier_transfer_config": ("engine_config", "host_tier_transfer_config"),
    "CONNECTOR_NAME": ("compat", "CONNECTOR_NAME"),
    "UnsupportedConfiguration": ("compat", "UnsupportedConfiguration"),
}


def __getattr__(name: str):
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
