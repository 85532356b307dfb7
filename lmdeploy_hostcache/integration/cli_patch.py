"""``lmdeploy serve api_server`` flags: ``--host-cache-gb``, ``--host-cache-config``, ``--host-cache-capture``.

``activate.py`` rebinds ``SubCliServe.add_parser_api_server`` and ``SubCliServe.api_server``
with the wrappers built here (it is the only module that rebinds LMDeploy functions):

- the parser wrapper adds the three flags to the "PyTorch engine arguments" group;
- the command wrapper turns them into ``args.kv_transfer_config`` before LMDeploy reads
  it, refusing a ``--kv-transfer-config`` that names another connector.

Invariants:
- With none of the three flags given, ``args`` is untouched and LMDeploy behaves as stock;
  ``--host-cache-capture`` alone is refused (it needs ``--host-cache-gb`` or
  ``--host-cache-config``; the refusal wrapper of an unsupported LMDeploy ignores it); with
  ``host_cache_gb`` 0 (flag or file) the tier is off: ``args`` is untouched too, one log line
  says so, and nothing is refused. A hand-written ``--kv-transfer-config`` naming
  ``HostTierConnector`` (docs/integration.md "Configuration", "Raw") without the flags is
  still left untouched, but checked here as the flags are (its settings, its extra-config
  keys, ``--enable-prefix-caching`` and the memory below), so that it fails here, not in the engine.
- Every refusal on this path (bad config file or value, ``--host-cache-capture`` alone,
  a backend that resolves to TurboMind (``--backend`` other than pytorch is resolved as stock
  ``api_server`` does, with ``autoget_backend``), a conflicting ``--kv-transfer-config``, a bad or
  foreign ``kv_connector_extra_config``, no ``--enable-prefix-caching``, a size that cannot fit this
  machine's total RAM, alone or beside the ``l3`` store (``hostmem.resolve_host_cache_bytes``, the
  check the engine runs), what the engine would refuse from the arguments (``--role`` other than
  Hybrid, the ``mp`` executor over several ranks, a lossy ``host_kv_format`` with ``--quant-policy``)
  or from a local model folder's config (``compat.model_problems``), a ``capture`` path that cannot be
  written (a missing or unwritable folder, a folder or FIFO at the path), a bad ``LMDEPLOY_HOSTCACHE_*``
  variable the engine reads at start-up (the cache-state feed's address, exposure and cluster secret, the
  capture key), an unsupported LMDeploy) is one
  ``lmdeploy serve api_server: error: ...`` line on stderr and exit code 2, like an argparse
  error, before any engine starts (before weights load): never a traceback.
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

__all__ = ["PYTORCH_GROUP_TITLE", "add_host_cache_arguments", "apply_host_cache_args", "refuse",
           "wrap_add_parser_api_server", "wrap_add_subparser", "wrap_api_server"]

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
    """Add the three flags to ``parser``'s PyTorch engine group (or to the parser if it has none)."""
    if any("--host-cache-gb" in a.option_strings for a in parser._actions):
        return  # idempotent
    group = next((g for g in parser._action_groups if g.title == PYTORCH_GROUP_TITLE), parser)
    group.add_argument(
        "--host-cache-gb", type=_gb_value, default=None, metavar="GIB",
        help="lmdeploy-hostcache: enable a host-DRAM prefix-cache tier under the GPU prefix cache with "
             "this many GiB (summed over TP ranks), or 'auto'; 0 turns the tier off (LMDeploy as stock). "
             "Needs --backend pytorch and --enable-prefix-caching. Default: off")
    group.add_argument(
        "--host-cache-config", type=str, default=None, metavar="YAML",
        help="lmdeploy-hostcache: YAML file of host-tier settings (HostCacheConfig fields); enables the "
             "tier; --host-cache-gb overrides its host_cache_gb. Default: none")
    group.add_argument(
        "--host-cache-capture", type=str, default=None, metavar="JSONL",
        help="lmdeploy-hostcache: append one JSON line per request to this file for "
             "'lmdeploy-hostcache plan' (keyed block ids, no token ids or text; overrides the config's "
             "capture). Needs --host-cache-gb or --host-cache-config. Default: off")


def apply_host_cache_args(args: argparse.Namespace) -> bool:
    """Turn the flags into ``args.kv_transfer_config``; return whether the tier was enabled.

    Raises ValueError (naming the flag) for a non-PyTorch backend, a missing
    ``--enable-prefix-caching`` or a ``--kv-transfer-config`` that configures another
    connector, and ConfigError for bad settings or a size this machine cannot hold; ``args`` is
    modified only after every check passed. ``host_cache_gb`` 0 returns False with ``args``
    untouched (tier off). Without the flags, a ``--kv-transfer-config`` naming our connector is
    checked the same way and left as it is (False).
    """
    gb = getattr(args, "host_cache_gb", None)
    path = getattr(args, "host_cache_config", None)
    capture = getattr(args, "host_cache_capture", None)
    if gb is None and path is None:
        if capture is not None:
            raise ValueError("--host-cache-capture records requests in the host tier: also give --host-cache-gb "
                             "or --host-cache-config")
        _check_raw_transfer_config(args)
        return False
    from ..config import ConfigError, HostCacheConfig, load_config
    from .engine_config import log_tier_off, merge_transfer_config

    settings = load_config(path, host_cache_gb=gb, capture=capture)  # ConfigError names the file and field
    if not settings.enabled:
        if settings.capture:   # 0 is the off switch (nothing refused), but a capture is not dropped unsaid
            logging.getLogger("lmdeploy_hostcache").warning(
                "lmdeploy-hostcache: capture to %s is off too: capture records requests in the host tier, which %s "
                "turns off", settings.capture, "--host-cache-gb 0" if gb is not None else f"host_cache_gb 0 in {path}")
        log_tier_off("--host-cache-gb 0" if gb is not None else f"--host-cache-config {path}")
        return False
    backend = _resolved_backend(args)
    if backend != "pytorch":
        raise ValueError(f"--host-cache-gb/--host-cache-config need the PyTorch engine; pass --backend pytorch "
                         f"(LMDeploy would run {backend} for this model: --backend {args.backend})")
    existing = getattr(args, "kv_transfer_config", None)
    try:
        # the file is read once (settings), so an empty file's "means auto" line is logged once
        transfer = merge_transfer_config(existing, host_cache_gb=gb,
                                         config=settings if path is not None or capture is not None else None)
    except ValueError as exc:
        if existing is not None and not isinstance(exc, ConfigError):
            raise ValueError(f"--host-cache-gb/--host-cache-config conflict with --kv-transfer-config: {exc}") from None
        raise
    final = HostCacheConfig.from_dict(transfer["kv_connector_extra_config"]["hostcache_config"])
    _check_startable(final, args, "--host-cache-gb/--host-cache-config extend LMDeploy's prefix cache",
                     " with ".join(n for n in ("--host-cache-gb" if gb is not None else None, path) if n))
    args.kv_transfer_config = transfer
    return True


def _resolved_backend(args: argparse.Namespace) -> str:
    """The engine stock ``api_server`` runs for ``args``: any ``--backend`` but ``pytorch`` (``turbomind``, its
    default, included) is resolved by LMDeploy's ``autoget_backend``, which falls back to PyTorch when TurboMind
    is not built or does not support the model."""
    backend = getattr(args, "backend", "pytorch")
    if backend == "pytorch" or not getattr(args, "model_path", None):
        return backend
    try:
        from lmdeploy.archs import autoget_backend

        return autoget_backend(args.model_path, trust_remote_code=bool(getattr(args, "trust_remote_code", False)))
    except Exception:   # LMDeploy's own resolution fails the same way later: refuse as asked
        return backend


def _check_startable(cfg: Any, args: argparse.Namespace, prefix_cache_need: str, source: str) -> None:
    """The checks both paths (our flags, a raw ``--kv-transfer-config``) make on an enabled tier's final
    settings before any engine starts, in this order:

    - ``min_restore_tokens: auto`` reads ``$LMDEPLOY_HOSTCACHE_CALIBRATION`` (a bad file: CalibrationError
      naming it);
    - ``--enable-prefix-caching`` is on (ValueError starting with ``prefix_cache_need``);
    - the host tier, with the ``l3`` store's segment and client buffers, fits this machine's total RAM and
      holds one block (ConfigError naming ``source`` and the field): the check the engine runs when it sizes
      the tier (``hostmem.resolve_host_cache_bytes``), made before the weights load. The store's clients
      are counted as ``--tp`` (one per rank; the engine counts its exact ranks again);
    - a ``capture`` path the capture could not write (``_check_capture_path``), and the package's environment
      variables the engine reads at start-up (``_check_environment``: the cache-state feed's, the capture key);
    - with ``l3.on_unreachable: error``, the Mooncake master accepts a TCP connection (ConfigError naming
      ``l3.master_address``): the engine's own check would fail inside its process, after the weights load,
      with LMDeploy's tracebacks;
    - what the engine process would refuse from the arguments alone (``compat``'s words, ValueError): a
      ``--role`` other than Hybrid, the ``mp`` executor over several ranks (``--tp``/``--ep`` > 1), and a lossy
      ``host_kv_format`` with ``--quant-policy`` other than 0 (ConfigError naming ``host_kv_format``); then what
      it would refuse from the model's config (``compat.model_problems``: sliding window, SSM/hybrid state,
      diffusion decoding), when LMDeploy can read that config here.
    """
    from ..config import ConfigError
    from ..hostmem import refuse_size_holding_no_block, resolve_host_cache_bytes

    if cfg.min_restore_tokens == "auto":
        from ..restore_cost import load_calibration

        load_calibration()
    if hasattr(args, "enable_prefix_caching") and not args.enable_prefix_caching:
        raise ValueError(f"{prefix_cache_need}: add --enable-prefix-caching (or give host_cache_gb 0 to run "
                         "without the host tier)")
    tp = getattr(args, "tp", 1)
    clients = tp if isinstance(tp, int) and not isinstance(tp, bool) and tp > 1 else 1
    try:
        nbytes, _ = resolve_host_cache_bytes(cfg, l3_clients=clients)
        refuse_size_holding_no_block(cfg, nbytes)   # the engine would find 0 slots
    except ConfigError as exc:
        raise ConfigError(exc.errors, source) from None
    _check_capture_path(cfg, args, source)
    _check_environment(cfg)
    l3 = getattr(cfg, "l3", None)
    if l3 is not None and l3.on_unreachable == "error":
        from ..l3.backend import master_refusal

        why = master_refusal(l3.master_address)    # the engine's own start would end in two tracebacks
        if why is not None:
            from ..config import FieldError

            raise ConfigError([FieldError("l3.master_address", l3.master_address, "", problem=(
                f"{why} (l3.on_unreachable is 'error'; 'warn' starts the node without the shared tier)"))], source)
    _check_engine_arguments(cfg, args, source)


def _check_capture_path(cfg: Any, args: argparse.Namespace, source: str) -> None:
    """A ``capture`` path the engine's capture could not write (``config.capture_path_problem``: a missing or
    unwritable folder, a folder or FIFO at the path) is refused: ValueError naming ``--host-cache-capture`` and
    the path when the flag gave it, else ConfigError naming ``source`` and the field. In the engine it would be
    one log line at start-up and a server without the capture asked for."""
    from ..config import ConfigError, capture_field_error

    path = getattr(cfg, "capture", "") or ""
    error = capture_field_error(path) if path else None
    if error is None:
        return
    flag = getattr(args, "host_cache_capture", None)
    if flag is not None and flag.strip() == path:
        raise ValueError(f"--host-cache-capture {error.problem}, or drop --host-cache-capture")
    raise ConfigError([error], source)


def _check_environment(cfg: Any) -> None:
    """The package's environment variables the engine process reads at start-up with the tier on, parsed here by
    the functions that read them there (ValueError naming the variable); in the engine a bad value is one log line
    and a node without what was asked for:

    - ``LMDEPLOY_HOSTCACHE_FEED_ADDR`` set: ``cache_state_feed.attach_from_env``'s checks, in its order:
      ``parse_addr`` (the address), ``check_exposure`` with ``feed_api_keys`` (no key on a non-loopback address
      needs ``LMDEPLOY_HOSTCACHE_FEED_UNAUTHENTICATED=1``) and ``routing.ids.cluster_key``
      (``LMDEPLOY_HOSTCACHE_CLUSTER_SECRET`` too short); only the port is left to the engine, which binds it;
    - a ``capture`` set: ``LMDEPLOY_HOSTCACHE_CAPTURE_KEY`` (``CaptureKey.from_env``: 32 hex digits).

    ``LMDEPLOY_HOSTCACHE_CALIBRATION`` is read by ``_check_startable`` (``min_restore_tokens: auto``);
    ``LMDEPLOY_HOSTCACHE_SALT_FROM_API_KEY`` is read per request and takes any unknown word as on, with a warning.
    """
    from .cache_state_feed import ENV_FEED_ADDR, check_exposure, feed_api_keys, parse_addr

    addr = os.environ.get(ENV_FEED_ADDR, "").strip()
    if addr:
        from ..routing.ids import cluster_key

        try:
            host, _ = parse_addr(addr)
            check_exposure(host, feed_api_keys())
            cluster_key()
        except ValueError as exc:
            raise ValueError(f"{exc}; the node's cache-state feed would not start (unset {ENV_FEED_ADDR} to run "
                             "without it)") from None
    if getattr(cfg, "capture", ""):
        from ..capture import CaptureKey

        try:
            CaptureKey.from_env()
        except ValueError as exc:
            raise ValueError(f"{exc}; trace capture would be off (unset it for a fresh key per capture)") from None


def _check_engine_arguments(cfg: Any, args: argparse.Namespace, source: str) -> None:
    """``_check_startable``'s last part: the engine process's own refusals, made here, before it starts (there
    they end in LMDeploy's tracebacks and ``RPCServerDeadError``)."""
    from ..config import ConfigError, FieldError
    from .compat import UnsupportedConfiguration, executor_problems, model_problems, role_problems

    def whole(name: str) -> int:
        value = getattr(args, name, 1)
        return value if isinstance(value, int) and not isinstance(value, bool) else 1

    problems = role_problems(str(getattr(args, "role", None) or "Hybrid"))
    # without the flag LMDeploy takes $LMDEPLOY_EXECUTOR_BACKEND (``get_distributed_executor_backend``)
    executor = getattr(args, "distributed_executor_backend", None) or os.environ.get("LMDEPLOY_EXECUTOR_BACKEND")
    problems += executor_problems(executor, max(whole("tp"), whole("ep")))
    if problems:
        raise UnsupportedConfiguration(problems)
    quant_policy = getattr(args, "quant_policy", 0)
    if quant_policy and cfg.host_kv_format != "same":
        raise ConfigError([FieldError("host_kv_format", cfg.host_kv_format, "", problem=(
            f"--quant-policy {quant_policy} already packs the KV cache; use host_kv_format 'same' to move those "
            "packed bytes losslessly"))], source)
    model_config = _model_config(args)
    if model_config is not None:
        problems = model_problems(SimpleNamespace(enable_prefix_caching=True), model_config=model_config)
        if problems:
            raise UnsupportedConfiguration(problems)


def _model_config(args: argparse.Namespace) -> Any:
    """LMDeploy's ``ModelConfig`` of ``args.model_path`` (what the engine reads before its refusals) when it is a
    local folder, else None, as when LMDeploy cannot read it (an unknown architecture): the engine then checks it
    itself (a hub id is not looked up here: offline, the lookup retries for most of a minute)."""
    path = getattr(args, "model_path", None)
    if not path or not os.path.isdir(path):
        return None
    try:
        from lmdeploy.pytorch.config import ModelConfig

        return ModelConfig.from_pretrained(path, trust_remote_code=bool(getattr(args, "trust_remote_code", False)))
    except Exception:
        return None


def _check_raw_transfer_config(args: argparse.Namespace) -> None:
    """Check a ``--kv-transfer-config`` that names our connector without our flags, as the flags are checked.

    ``args`` is not modified (LMDeploy builds the engine config from it; the ``PytorchEngineConfig`` wrapper
    then validates it again and removes it for ``host_cache_gb`` 0). Raises ValueError naming
    ``--kv-transfer-config``.
    """
    from .engine_config import CONNECTOR_NAME, is_host_tier, merge_transfer_config

    existing = getattr(args, "kv_transfer_config", None)
    if not is_host_tier(existing):
        return
    from ..config import ConfigError, HostCacheConfig

    flag = "--kv-transfer-config"
    try:
        transfer = merge_transfer_config(existing)   # validates role, keys and settings; the result is dropped
    except ConfigError as exc:
        raise ConfigError(exc.errors, f"{flag} kv_connector_extra_config") from None
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from None
    cfg = HostCacheConfig.from_dict(transfer["kv_connector_extra_config"]["hostcache_config"])
    if not cfg.enabled:   # host_cache_gb 0: the engine config drops the connector and says so
        return
    _check_startable(cfg, args, f"{flag} names the host tier ({CONNECTOR_NAME}), which extends LMDeploy's "
                     "prefix cache", flag)


def refuse(message: str) -> None:
    """Print one argparse-style error line for ``lmdeploy serve api_server`` and exit 2."""
    text = " ".join(str(message).split())  # one line, whatever the message held
    sys.stderr.write(f"lmdeploy serve api_server: error: {text}\n")
    raise SystemExit(2)


def wrap_add_subparser(original: Callable[[], Any], serve_cls: Any, name: str,
                       add_arguments: Callable[[argparse.ArgumentParser], None]) -> Callable[[], Any]:
    """Wrap ``SubCliServe.add_parser_<name>`` so that our options join the ``serve <name>`` parser."""
    @functools.wraps(original)
    def add_parser():
        result = original()
        parser = serve_cls.subparsers.choices.get(name)
        if parser is not None:
            add_arguments(parser)
        return result

    add_parser.__hostcache_wrapped__ = True
    return add_parser


def wrap_add_parser_api_server(original: Callable[[], Any], serve_cls: Any) -> Callable[[], Any]:
    return wrap_add_subparser(original, serve_cls, "api_server", add_host_cache_arguments)


def wrap_api_server(original: Callable[[argparse.Namespace], Any],
                    refusal: Callable[[], Exception] | None = None) -> Callable[[argparse.Namespace], Any]:
    """``api_server`` that applies the flags first; ``refusal`` (an unsupported LMDeploy) builds the
    exception to report when the tier is asked for (host_cache_gb 0 still runs stock)."""

    @functools.wraps(original)
    def api_server(args):
        try:
            if refusal is not None:
                gb = getattr(args, "host_cache_gb", None)
                path = getattr(args, "host_cache_config", None)
                if gb is not None or path is not None:
                    from ..config import load_config

                    if load_config(path, host_cache_gb=gb).enabled:
                        raise refusal()
            else:
                apply_host_cache_args(args)
        except ValueError as exc:  # ConfigError, HostTierUnavailable and the refusals above
            refuse(str(exc))
        return original(args)

    api_server.__hostcache_wrapped__ = True
    return api_server
