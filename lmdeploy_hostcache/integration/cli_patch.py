"""``lmdeploy serve api_server`` flags: ``--host-cache-gb`` and ``--host-cache-config``.

``activate.py`` rebinds ``SubCliServe.add_parser_api_server`` and ``SubCliServe.api_server``
with the wrappers built here (it is the only module that rebinds LMDeploy functions):

- the parser wrapper adds both flags to the "PyTorch engine arguments" group;
- the command wrapper turns them into ``args.kv_transfer_config`` before LMDeploy reads
  it, refusing a ``--kv-transfer-config`` that names another connector.

Invariant: with neither flag given, ``args`` is untouched and LMDeploy behaves as stock.
"""
from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import Any

__all__ = ["PYTORCH_GROUP_TITLE", "add_host_cache_arguments", "apply_host_cache_args",
           "wrap_add_parser_api_server", "wrap_api_server"]

PYTORCH_GROUP_TITLE = "PyTorch engine arguments"


def _gb_value(text: str) -> float | str:
    """argparse type of --host-cache-gb: a number of GiB >= 0 or 'auto' (validated like the config)."""
    from ..config import ConfigError, load_config

    try:
        return load_config(None, host_cache_gb=text).host_cache_gb
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_gb_value.__name__ = "float|auto"  # how LMDeploy's help formatter prints the type


def add_host_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """Add both flags to ``parser``'s PyTorch engine group (or to the parser if it has none)."""
    if any("--host-cache-gb" in a.option_strings for a in parser._actions):
        return  # idempotent
    group = next((g for g in parser._action_groups if g.title == PYTORCH_GROUP_TITLE), parser)
    group.add_argument(
        "--host-cache-gb", type=_gb_value, default=None, metavar="GIB",
        help="lmdeploy-hostcache: enable a host-DRAM prefix-cache tier under the GPU prefix cache with "
             "this many GiB (summed over TP ranks), or 'auto'. Needs --backend pytorch and "
             "--enable-prefix-caching. Default: off")
    group.add_argument(
        "--host-cache-config", type=str, default=None, metavar="YAML",
        help="lmdeploy-hostcache: YAML file of host-tier settings (HostCacheConfig fields); enables the "
             "tier; --host-cache-gb overrides its host_cache_gb. Default: none")


def apply_host_cache_args(args: argparse.Namespace) -> bool:
    """Turn the flags into ``args.kv_transfer_config``; return whether the tier was enabled.

    Raises ValueError (naming the flag) for a non-PyTorch backend or a
    ``--kv-transfer-config`` that configures another connector, and ConfigError for bad
    settings; ``args`` is modified only after every check passed.
    """
    gb = getattr(args, "host_cache_gb", None)
    path = getattr(args, "host_cache_config", None)
    if gb is None and path is None:
        return False
    backend = getattr(args, "backend", "pytorch")
    if backend != "pytorch":
        raise ValueError(f"--host-cache-gb/--host-cache-config need the PyTorch engine; pass --backend pytorch "
                         f"(got --backend {backend})")
    from ..config import ConfigError
    from .engine_config import merge_transfer_config

    existing = getattr(args, "kv_transfer_config", None)
    try:
        transfer = merge_transfer_config(existing, host_cache_gb=gb, config=path)
    except ValueError as exc:
        if existing is not None and not isinstance(exc, ConfigError):
            raise ValueError(f"--host-cache-gb/--host-cache-config conflict with --kv-transfer-config: {exc}") from None
        raise
    args.kv_transfer_config = transfer
    return True


def wrap_add_parser_api_server(original: Callable[[], Any], serve_cls: Any) -> Callable[[], Any]:
    @functools.wraps(original)
    def add_parser_api_server():
        result = original()
        parser = serve_cls.subparsers.choices.get("api_server")
        if parser is not None:
            add_host_cache_arguments(parser)
        return result

    add_parser_api_server.__hostcache_wrapped__ = True
    return add_parser_api_server


def wrap_api_server(original: Callable[[argparse.Namespace], Any]) -> Callable[[argparse.Namespace], Any]:
    @functools.wraps(original)
    def api_server(args):
        apply_host_cache_args(args)
        return original(args)

    api_server.__hostcache_wrapped__ = True
    return api_server
