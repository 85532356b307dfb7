"""``lmdeploy serve proxy --routing-strategy cache_aware``: the cache-aware strategy in the stock proxy.

How it plugs in (``activate._patch_cli_serve`` rebinds two ``SubCliServe`` functions with the
wrappers below; nothing else in LMDeploy is rebound):

- ``wrap_add_parser_proxy``: ``cache_aware`` joins the ``--routing-strategy`` choices (so
  ``--help`` lists it) and a "cache-aware routing" group adds its options;
- ``wrap_proxy``: with ``--routing-strategy cache_aware`` it calls ``install`` and then the
  stock command with the stock default strategy (which LMDeploy's ``RoutingStrategy`` knows);
  any other strategy runs the stock command untouched, unless a ``--cache-aware-*`` option has a
  value other than its default (it would be silently ignored): that start is refused. Every
  refusal here (that one, a ``--cache-aware-model`` whose tokenizer and chat template cannot be
  loaded, a malformed ``--cache-aware-feed-url``, a bad cluster secret, ...) is one
  ``lmdeploy serve proxy: error: ...`` line on stderr and exit code 2, like an argparse error
  (``refuse``), before the proxy serves: never a traceback.

``install`` works on the live proxy module, at run time only:

- the module-level ``node_manager`` gets a subclass of its own class (``__class__`` swap,
  keeping its nodes, heartbeat thread and state) whose ``get_node_url`` asks the router
  (``routing.CacheAwareRouter``) for Hybrid requests and falls back to the stock method
  otherwise; a request the router placed gets a ticket (its queued prefill), which ``pre_call``
  (called by the stock endpoint right after ``get_node_url``, in the same task) takes from a
  context variable and returns inside its ``start`` value (a ``float`` subclass), so
  ``post_call(node_url, start)`` of that request, and of no other (a stock-routed request's
  ``start`` carries none), ends exactly that request's queued prefill;
- a request whose ``model`` is not a candidate node's base model (the first name its
  ``/v1/models`` lists; LoRA adapters follow it) is for a LoRA adapter: nodes key an adapter's
  blocks under another namespace and publish none, so it matches nothing exact and has its own
  partition of the approximate index (``RoutingRequest.adapter``);
- the request body reaches ``get_node_url`` (which LMDeploy calls with the model name only)
  through a ``contextvars.ContextVar`` set by a FastAPI dependency override of
  ``validate_json_request`` (it runs the stock check first): the endpoints already depend on
  it, FastAPI runs async dependencies in the endpoint's own task, and the body is read from
  Starlette's cache, so the stock endpoints stay as they are;
- that dependency turns the body into token ids exactly as the node does (``PromptEncoder``): a chat
  body is parsed into LMDeploy's ``ChatCompletionRequest`` and rewritten by the same LMDeploy steps
  the node's ``ChatRunner.prepare`` runs (``dump_tools``, ``normalize_chat_request``, the top-level
  ``enable_thinking`` folded into ``chat_template_kwargs``), then rendered and tokenized by LMDeploy's
  own prompt processor (``MultimodalProcessor`` with the model's ``Tokenizer`` and
  ``get_chat_template``); a body it cannot tokenize that way (one the node would reject, multimodal
  content) is matched by text prefix (counted: ``encode_fallbacks``), and without
  ``--cache-aware-model`` every request is, which it logs;
- a daemon thread polls the nodes' cache-state feeds (``routing.feed.FEED_PATH``) in turn and applies
  them (one thread: a single reader contends with the requests for the lock); a feed that answered
  only at the read timeout is not read for the next 1, 2, 4, then 8 poll intervals (each at most the
  5 s read timeout: ``SLOW_FEED_MAX_SKIP``) until a read succeeds, so it holds up the nodes read after
  it once per such window, not every round (its view still goes approximate after
  ``--cache-aware-feed-timeout``, and a node marked down meanwhile is probed once per interval and read
  again as soon as its API answers); a node whose feed answers 404 (stock LMDeploy) is routed
  on the approximate index, logged once; a node that cannot be reached (its feed refused or timed
  out, and its API address too, probed when the feed is served elsewhere: ``api_answers``) is
  skipped until it answers again;
  one whose feed errors or is invalid for ``--cache-aware-feed-timeout`` seconds falls back to
  the approximate index (it keeps receiving requests); a node that answers a (non-streamed)
  request with an error is skipped for ``--cache-aware-error-cooldown`` seconds;
- feed reads carry ``Authorization: Bearer KEY`` when ``--cache-aware-feed-api-key`` (or
  ``LMDEPLOY_HOSTCACHE_FEED_API_KEY``) is set (the nodes' feeds check it, ``cache_state_feed``);
  the request's published ids are keyed with ``LMDEPLOY_HOSTCACHE_CLUSTER_SECRET`` like the
  nodes' (``routing.ids``), checked at start (a bad secret: refused, see ``wrap_proxy``);
- ``GET /hostcache/routing`` returns the router's status (per node: requests, predicted hits,
  prefill tokens, feed cursor) to clients on the proxy's host only (403 otherwise);
- a request's salt as the nodes derive it (its ``cache_salt``, under its API key's salt when
  ``LMDEPLOY_HOSTCACHE_SALT_FROM_API_KEY`` is set on the proxy as on the nodes) roots its ids
  (``routing.request``): it matches only what requests of its salt left in the approximate index or
  a node's feed published under that salt.

Invariants: stock strategies never reach this code; the router is touched under one lock
(the event loop and the poller thread); the request path never waits long for it: ``choose``
waits at most ``CHOOSE_LOCK_TIMEOUT_S`` and otherwise lets the stock strategy pick (counted:
``lock_timeouts`` in the status), a request's end or a node's error that cannot take the lock at
once is queued and applied by the next holder; the poller decodes and validates a feed message
outside the lock (``CacheAwareRouter.prepare_feed``), builds the table growth it needs outside the
lock too (``plan_room``, ``BlockTable.build_resized``: installed only if the table did not change
meanwhile), and holds it only to apply it (``commit_feed``, which changes nothing if the node's
cursor moved meanwhile, and releases the lock between chunks of a large snapshot); a routing error
falls back to the stock choice and is logged, never failing a request; per-node state (the router's, a
node's feed state and error cooldown) goes when the node leaves the proxy, and an expired cooldown at the
next error, so nodes that come and go under new URLs leave nothing behind; a session key is kept as a
fixed-size digest only (``routing.router.session_digest``).
"""
from __future__ import annotations

import argparse
import contextvars
import functools
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from .cli_patch import wrap_add_subparser

__all__ = ["STRATEGY", "add_proxy_arguments", "install", "wrap_add_parser_proxy", "wrap_proxy", "RoutingService"]

STRATEGY = "cache_aware"
STOCK_DEFAULT = "min_expected_latency"
STATUS_PATH = "/hostcache/routing"
PROG = "lmdeploy serve proxy"
# the --cache-aware-* options' defaults (argparse dest ``cache_aware_<key>``): the parser's, and what a stock
# invocation carries (an option whose value differs from these was given, and is refused without cache_aware)
OPTION_DEFAULTS: dict[str, Any] = {
    "model": None, "feed_interval": 1.0, "feed_timeout": 10.0, "feed_port": None, "feed_url": None,
    "feed_api_key": None, "error_cooldown": 10.0, "balance": 1.3, "block_size": 64, "gpu_blocks": 4096,
    "host_blocks": 0}


def _is_loopback(host: str) -> bool:
    """A client address on this host (127.0.0.0/8, ::1, or an IPv4-mapped loopback address)."""
    import ipaddress

    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback
ROUTED_PATHS = ("/v1/chat/completions", "/v1/completions")
FEED_READS_PER_POLL = 64   # feed reads per node in one poll round (each up to the node's max_events)
FEED_READ_TIMEOUT_S = 5.0  # one feed read's timeout (requests: connect, then between bytes)
SLOW_FEED_MAX_SKIP = 8     # poll intervals a feed that timed out is not read, at most (doubling from 1 per timeout)
CHOOSE_LOCK_TIMEOUT_S = 0.05   # the longest a request waits for the router (then: the stock strategy)
PROXY_MAX_NODES = 64       # node slots of the proxy's block table (masks widen as slots are used)

logger = logging.getLogger("lmdeploy_hostcache.proxy_routing")
_current: contextvars.ContextVar = contextvars.ContextVar("hostcache_routing_request", default=None)
# (node URL, ticket) of the request this context's choose() placed, until pre_call takes it
_ticket: contextvars.ContextVar = contextvars.ContextVar("hostcache_routing_ticket", default=None)


class RoutedStart(float):
    """``pre_call``'s start time of a request this strategy placed, carrying its router ticket to ``post_call``."""

    def __new__(cls, start: float, node: str, ticket: int):
        obj = super().__new__(cls, start)
        obj.node, obj.ticket = node, ticket
        return obj


def make_router(options: dict):
    """The proxy's ``CacheAwareRouter`` for ``options`` (``RoutingService`` and ``bench route`` build it here)."""
    from ..routing.router import CacheAwareRouter

    return CacheAwareRouter(balance=float(options["balance"]), max_nodes=PROXY_MAX_NODES,
                            approx_model=str(options.get("model") or "unknown"),
                            approx_block_size=int(options["block_size"]))


# ---------------------------------------------------------------------------------- CLI
def _positive(kind, maximum: float = 1e9, minimum_exclusive: float = 0):
    """argparse type: a ``kind`` in (minimum_exclusive, maximum]; finite (an infinite poll interval killed the
    poller thread)."""
    def conv(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if not minimum_exclusive < v <= maximum:
            low = {0: "> 0", -1: ">= 0"}.get(minimum_exclusive, f"> {minimum_exclusive:g}")
            raise argparse.ArgumentTypeError(f"must be {low} and at most {int(maximum)}, got {text!r}")
        return v
    conv.__name__ = kind.__name__
    return conv


def add_proxy_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``cache_aware`` to ``--routing-strategy`` and the strategy's options (idempotent)."""
    if any("--cache-aware-model" in a.option_strings for a in parser._actions):
        return
    for a in parser._actions:
        if "--routing-strategy" in a.option_strings and a.choices is not None and STRATEGY not in a.choices:
            a.choices = list(a.choices) + [STRATEGY]
            a.help = (a.help or "") + (f". {STRATEGY} (lmdeploy-hostcache): lowest expected prefill cost from each "
                                       "node's GPU and host prefix-cache contents, with a balance guard")
    d = OPTION_DEFAULTS
    g = parser.add_argument_group("lmdeploy-hostcache cache-aware routing (--routing-strategy cache_aware)")
    g.add_argument("--cache-aware-model", type=str, default=d["model"], metavar="PATH",
                   help="model path or name whose tokenizer and chat template the nodes use; without it the "
                        "strategy matches text prefixes only (approximate)")
    g.add_argument("--cache-aware-feed-interval", type=_positive(float, 3600), default=d["feed_interval"], metavar="S",
                   help="seconds between polls of each node's cache-state feed")
    g.add_argument("--cache-aware-feed-timeout", type=_positive(float, 86400), default=d["feed_timeout"],
                   metavar="S", help="a node whose feed is silent this long is routed on the approximate index")
    g.add_argument("--cache-aware-feed-port", type=_positive(int, 65535), default=d["feed_port"], metavar="PORT",
                   help="read each node's feed from this port on the node's host (the engine process serves it "
                        "when started with LMDEPLOY_HOSTCACHE_FEED_ADDR=HOST:PORT); default: the node's own URL")
    g.add_argument("--cache-aware-feed-url", action="append", default=d["feed_url"], metavar="NODE_URL=FEED_URL",
                   help="read this node's feed from FEED_URL (repeatable; wins over --cache-aware-feed-port; "
                        "for several nodes on one host, each with its own LMDEPLOY_HOSTCACHE_FEED_ADDR)")
    g.add_argument("--cache-aware-feed-api-key", type=str, default=d["feed_api_key"], metavar="KEY",
                   help="bearer token sent with every feed read (one of the nodes' "
                        "LMDEPLOY_HOSTCACHE_FEED_API_KEYS); default: $LMDEPLOY_HOSTCACHE_FEED_API_KEY")
    g.add_argument("--cache-aware-error-cooldown", type=_positive(float, 86400), default=d["error_cooldown"],
                   metavar="S", help="a node that answered a request with an error is skipped for this long")
    g.add_argument("--cache-aware-balance", type=_positive(float, 1000), default=d["balance"], metavar="X",
                   help="balance guard: skip a node whose share of recent prefill tokens exceeds X times its "
                        "speed-weighted share (>= 1)")
    g.add_argument("--cache-aware-block-size", type=_positive(int, 1 << 20), default=d["block_size"], metavar="N",
                   help="block size (tokens) assumed for nodes that publish no feed")
    g.add_argument("--cache-aware-gpu-blocks", type=_positive(int, 1 << 30), default=d["gpu_blocks"], metavar="N",
                   help="GPU prefix-cache blocks assumed for nodes that publish no feed")
    g.add_argument("--cache-aware-host-blocks", type=_positive(int, 1 << 30, minimum_exclusive=-1),
                   default=d["host_blocks"], metavar="N",
                   help="host-tier blocks assumed for nodes that publish no feed")


def wrap_add_parser_proxy(original: Callable[[], Any], serve_cls: Any) -> Callable[[], Any]:
    return wrap_add_subparser(original, serve_cls, "proxy", add_proxy_arguments)


class Refused(SystemExit):
    """A refused ``lmdeploy serve proxy`` start: exit code 2, like an argparse error; ``str()`` is the message
    (already written to stderr by ``refuse``)."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def refuse(message: str) -> None:
    """Print one argparse-style ``lmdeploy serve proxy: error: ...`` line on stderr and exit 2 (no traceback)."""
    text = " ".join(str(message).split())  # one line, whatever the message held
    sys.stderr.write(f"{PROG}: error: {text}\n")
    sys.stderr.flush()
    raise Refused(text)


def given_cache_aware_options(args) -> list[str]:
    """The ``--cache-aware-*`` options of ``args`` whose value differs from the default (the ones given)."""
    return ["--cache-aware-" + key.replace("_", "-") for key, default in OPTION_DEFAULTS.items()
            if getattr(args, "cache_aware_" + key, default) != default]


def wrap_proxy(original: Callable[[argparse.Namespace], Any]) -> Callable[[argparse.Namespace], Any]:
    """The ``proxy`` command: with ``--routing-strategy cache_aware``, ``install`` then the stock command; with
    another strategy the stock command untouched, unless a ``--cache-aware-*`` option was given (it would be
    ignored): refused. Every refusal is one ``lmdeploy serve proxy: error: ...`` line and exit 2 (``refuse``),
    before the proxy serves."""
    @functools.wraps(original)
    def proxy(args):
        strategy = getattr(args, "routing_strategy", None)
        if strategy != STRATEGY:
            given = given_cache_aware_options(args)
            if given:
                refuse(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only to --routing-strategy "
                       f"{STRATEGY} and would be ignored with --routing-strategy {strategy or STOCK_DEFAULT}: add "
                       f"--routing-strategy {STRATEGY}")
            return original(args)
        if getattr(args, "serving_strategy", "Hybrid") != "Hybrid":
            refuse(f"--routing-strategy {STRATEGY} needs --serving-strategy Hybrid")
        if not 1.0 <= args.cache_aware_balance:
            refuse(f"--cache-aware-balance must be >= 1, got {args.cache_aware_balance}")
        from ..routing.ids import cluster_key
        try:
            cluster_key()
        except ValueError as exc:
            refuse(str(exc))
        try:
            options = options_from_args(args)
            if options["model"]:
                check_model(options["model"])   # a missing path or folder: refused before anything is imported
        except ValueError as exc:   # ModelLoadError included
            refuse(str(exc))
        try:
            install(options)
        except ModelLoadError as exc:
            refuse(str(exc))
        args.routing_strategy = STOCK_DEFAULT
        return original(args)

    proxy.__hostcache_wrapped__ = True
    return proxy


def options_from_args(args) -> dict:
    options = {k: getattr(args, "cache_aware_" + k) for k in
               ("model", "feed_interval", "feed_timeout", "feed_port", "feed_api_key", "error_cooldown", "balance",
                "block_size", "gpu_blocks", "host_blocks")}
    options["feed_urls"] = parse_feed_urls(getattr(args, "cache_aware_feed_url", None) or ())
    return options


def _http_url(url: str) -> bool:
    from ..config import url_host_and_port_ok

    return url.startswith(("http://", "https://")) and url_host_and_port_ok(url)


def parse_feed_urls(items) -> dict[str, str]:
    """``NODE_URL=FEED_URL`` pairs of ``--cache-aware-feed-url`` -> {node URL: feed URL}; ValueError naming
    the option for a malformed pair."""
    urls = {}
    for item in items:
        node, sep, feed = str(item).partition("=")
        node, feed = node.strip().rstrip("/"), feed.strip()
        if not sep or not (_http_url(node) and _http_url(feed)):
            raise ValueError(f"--cache-aware-feed-url: expected NODE_URL=FEED_URL with http(s) URLs (a host, a port "
                             f"up to 65535), got {item!r}")
        urls[node] = feed
    return urls


FEED_API_KEY_ENV = "LMDEPLOY_HOSTCACHE_FEED_API_KEY"


def feed_headers(options: dict) -> dict:
    """Headers of a feed read: the bearer token from the options or ``LMDEPLOY_HOSTCACHE_FEED_API_KEY``."""
    import os

    key = options.get("feed_api_key") or os.environ.get(FEED_API_KEY_ENV, "").strip()
    return {"Authorization": f"Bearer {key}"} if key else {}


# ---------------------------------------------------------------------------------- encoder
class ModelLoadError(ValueError):
    """``--cache-aware-model`` names no model whose tokenizer and chat template the proxy can load (the message
    names the option and the value, on one line)."""


def _looks_like_path(name: str) -> bool:
    """A ``--cache-aware-model`` value that can only be a local path, never a hub model id (``name`` or
    ``namespace/name``)."""
    return (os.path.isabs(name) or name.startswith(("./", "../", "~")) or name in (".", "..")
            or name.count("/") > 1 or os.sep != "/" and os.sep in name)


def check_model(model: str) -> str:
    """``model`` as the loaders take it (``~`` expanded when it exists), or ModelLoadError naming
    ``--cache-aware-model``: a path that does not exist, a file, a folder without ``config.json``. Loads
    nothing (``wrap_proxy`` checks it before the proxy module is imported)."""
    where = f"--cache-aware-model {model!r}"
    path = os.path.expanduser(model)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ModelLoadError(f"{where} is a file; give the model folder the nodes serve (config.json, tokenizer "
                                 "and chat template files) or its hub name")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelLoadError(f"{where}: no config.json in that folder; give the model folder the nodes serve "
                                 "(config.json, tokenizer and chat template files)")
    elif _looks_like_path(model):
        raise ModelLoadError(f"{where}: no such file or folder; give the model folder the nodes serve or its hub "
                             "name")
    return path if os.path.exists(path) else model


def load_encoder(model: str) -> PromptEncoder:
    """``PromptEncoder(model)``, or ModelLoadError naming ``--cache-aware-model``: what ``check_model`` refuses,
    or a model whose tokenizer or chat template LMDeploy cannot load (the loader's message, on one line and
    shortened, as the reason)."""
    path = check_model(model)
    try:
        return PromptEncoder(path)
    except Exception as exc:   # the loaders raise OSError, ValueError, RuntimeError, ImportError...
        reason = " ".join(str(exc).split()) or type(exc).__name__
        reason = reason.split(": {", 1)[0]   # "Could not find model architecture from config: {...whole dict}"
        if len(reason) > 240:
            reason = reason[:237] + "..."
        raise ModelLoadError(f"--cache-aware-model {model!r}: cannot load its tokenizer and chat template: "
                             f"{type(exc).__name__}: {reason}") from None


class PromptEncoder:
    """Request body -> token ids, on the node's own path (LMDeploy 0.18's ``api_server``).

    A chat body is parsed into LMDeploy's ``ChatCompletionRequest`` and rewritten the way the node's
    ``ChatRunner.prepare`` rewrites it before the chat template sees it:

    - its response parser's request steps (``api_server.set_parsers`` picks the parser by the model's
      architecture): for GPT-OSS the ``gpt-oss`` parser itself (it loads the Harmony encoding, as the node
      does: where the proxy's host cannot, GPT-OSS chats are routed by text prefix); otherwise the default
      parser's steps, ``dump_tools`` (each tool reduced to its ``function`` part, the ``tool_choice``
      selection applied; every tool parser's ``adjust_request`` ends in it) then ``normalize_chat_request``
      (tool-call ``arguments`` strings turned into dicts). The default parser itself is not instantiated: what it
      adds depends on the node's ``--tool-call-parser`` / ``--reasoning-parser`` (not known here) and
      never changes the prompt;
    - ``_chat_template_kwargs_from_request`` (the top-level ``enable_thinking`` folded into
      ``chat_template_kwargs``), then ``MultimodalProcessor.get_prompt_input`` with the request's
      ``messages``, ``tools`` and ``reasoning_effort``, as ``AsyncEngine.preprocess`` calls it;
    - a body with empty ``messages`` and ``input_ids`` (and no ``image_data``) is those ids, unrendered.

    A body the node would reject (a validation error, an unknown allowed tool, tool-call arguments that
    are not JSON) raises here; the caller then routes the request by text prefix.
    """

    def __init__(self, model_path: str) -> None:
        from lmdeploy.model import get_chat_template
        from lmdeploy.serve.processors.multimodal import MultimodalProcessor
        from lmdeploy.tokenizer import Tokenizer

        self.model_path = model_path
        self.processor = MultimodalProcessor(Tokenizer(model_path), get_chat_template(model_path, None))
        self.parser_cls = _node_parser_class(model_path)

    def chat_request(self, body: dict):
        """``body`` as the node renders it: LMDeploy's ``ChatCompletionRequest``, after its response parser's
        request steps (see the class docstring). Raises what the node would reject."""
        from lmdeploy.serve.openai.protocol import ChatCompletionRequest
        from lmdeploy.serve.parsers.response_parser import normalize_chat_request
        from lmdeploy.serve.parsers.tool_parser.tool_parser import dump_tools

        request = ChatCompletionRequest.model_validate(body)
        if self.parser_cls is not None:
            return self.parser_cls(request).request
        return normalize_chat_request(dump_tools(request))

    async def encode(self, path: str, body: dict) -> list[int] | None:
        if path.endswith("/chat/completions"):
            from lmdeploy.serve.core.chat_runner import _chat_template_kwargs_from_request

            request = self.chat_request(body)
            if not request.messages and request.input_ids is not None:
                # api_server's /generate-style input; with image_data it becomes multimodal (not ours to render)
                return list(request.input_ids) if request.image_data is None else None
            out = await self.processor.get_prompt_input(
                prompt=request.messages, do_preprocess=True, tools=request.tools,
                reasoning_effort=request.reasoning_effort,
                chat_template_kwargs=_chat_template_kwargs_from_request(request),
                media_io_kwargs=request.media_io_kwargs, mm_processor_kwargs=request.mm_processor_kwargs)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str):
                return None
            out = await self.processor.get_prompt_input(prompt=prompt, do_preprocess=False)
        ids = out.get("input_ids")
        return list(ids) if ids is not None else None


GPT_OSS_ARCH = "GptOssForCausalLM"   # api_server.set_parsers: this architecture gets the 'gpt-oss' response parser


def _node_parser_class(model_path: str):
    """The response parser class whose ``request`` the node renders, when it is not the default one (GPT-OSS:
    ``api_server.set_parsers`` picks the ``gpt-oss`` parser by the model's architecture); None: the default
    parser's request steps (``PromptEncoder.chat_request``)."""
    try:
        from lmdeploy.archs import get_model_arch

        arch, _ = get_model_arch(model_path)
    except Exception as exc:   # no readable config: the default parser (what the node uses for any other arch)
        logger.debug("cache_aware routing: no model architecture for %s (%r); default response parser", model_path,
                     exc)
        return None
    if arch != GPT_OSS_ARCH:
        return None
    from lmdeploy.serve.parsers import ResponseParserManager

    return ResponseParserManager.get("gpt-oss")


def request_text(path: str, body: dict) -> str | None:
    """The text a request's prompt starts with (text-prefix fallback)."""
    if path.endswith("/chat/completions"):
        msgs = body.get("messages")
        if isinstance(msgs, str):
            return msgs
        if not isinstance(msgs, list):
            return None
        parts = []
        for m in msgs:
            if isinstance(m, dict):
                c = m.get("content")
                if isinstance(c, list):
                    c = "".join(x.get("text", "") for x in c if isinstance(x, dict))
                parts.append(f"<{m.get('role', '')}>{c or ''}")
        return "".join(parts)
    p = body.get("prompt")
    if isinstance(p, list) and p and isinstance(p[0], str):
        p = p[0]
    return p if isinstance(p, str) else None


def is_node_fault(text) -> bool:
    """A non-streamed node answer that says the *node* failed: not JSON, the proxy's own
    timeout/connection answer (``error_code``), or LMDeploy's error object with a server-side
    code (>= 500, or none). A client's bad request (LMDeploy's 400 error object: a bad
    ``max_tokens``, a prompt longer than the context) is the client's fault, not the node's."""
    import json

    try:
        obj = json.loads(text)
    except (TypeError, ValueError):
        return True
    if not isinstance(obj, dict):
        return False
    if "error_code" in obj:
        return True
    if obj.get("object") != "error":
        return False
    code = obj.get("code")
    return not (isinstance(code, int) and not isinstance(code, bool) and code < 500)


def session_key(body: dict) -> str | None:
    """An explicit session key: ``session_id`` (>= 0) or ``user`` (the router keeps only its 16-byte digest,
    ``routing.router.session_digest``, however long the ``user``)."""
    sid = body.get("session_id")
    if isinstance(sid, int) and not isinstance(sid, bool) and sid >= 0:
        return f"session:{sid}"
    user = body.get("user")
    if isinstance(user, str) and user:
        return f"user:{user}"
    return None


# ---------------------------------------------------------------------------------- service
API_PROBE_TIMEOUT_S = 1.0


def _host_port(url: str) -> tuple[str, int]:
    """(host, port) of a node or feed URL (a bare ``host:port`` taken as http; the scheme's port by default);
    ValueError for a port out of range."""
    from urllib.parse import urlsplit

    p = urlsplit(url if "://" in url else "http://" + url)
    return (p.hostname or "").lower(), p.port or (443 if p.scheme == "https" else 80)


def api_answers(node_url: str, timeout_s: float = API_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``node_url``'s host and port opens within ``timeout_s`` (the poller's probe
    of a node whose feed, served elsewhere, did not answer: a process killed, a host gone, refuses or times
    out; a live api_server accepts)."""
    import socket

    try:
        socket.create_connection(_host_port(node_url), timeout=timeout_s).close()
        return True
    except (OSError, ValueError):
        return False


class RoutingService:
    """The router, the prompt encoder and the feed poller of one proxy process."""

    def __init__(self, options: dict, node_manager=None) -> None:
        from collections import deque

        from ..routing.cost import NodeProfile

        self.options = dict(options)
        self.node_manager = node_manager
        self.lock = threading.RLock()
        self.router = make_router(self.options)
        self._deferred: deque = deque()   # (kind, url, ticket) the request path could not apply at once
        self.lock_timeouts = 0            # requests routed by the stock strategy because the router was busy
        self.adapter_requests = 0         # requests for a LoRA adapter (matched against nothing exact)
        self.encode_fallbacks = 0         # requests the encoder could not tokenize (routed by text prefix)
        self.default_profile = NodeProfile(int(options["gpu_blocks"]), int(options["host_blocks"]),
                                           int(options["block_size"]))
        self.encoder: PromptEncoder | None = None
        self.text_mode_logged = False
        if options.get("model"):
            self.encoder = load_encoder(options["model"])   # ModelLoadError naming --cache-aware-model
        else:
            logger.warning("lmdeploy-hostcache cache_aware routing: no --cache-aware-model given, so requests are "
                           "matched by text prefix against what this proxy routed (approximate; nodes' feeds "
                           "cannot be matched without the model's tokenizer)")
        self._feed_state: dict[str, dict] = {}
        # node -> monotonic time its error cooldown ends (dropped when the node leaves, or expired at the next error)
        self._cooldown: dict[str, float] = {}
        self._too_many = False                   # more nodes than the table has bits: stock routing
        self._unmatched_feed_urls: set[str] = set()   # --cache-aware-feed-url mappings warned about (no such node)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors = 0

    # -- membership ----------------------------------------------------------------------
    def _sync_nodes(self, urls: list[str]) -> bool:
        """Track exactly ``urls``; False (stock routing for everything, warned once) when they are more
        nodes than the block table has bits for."""
        limit = self.router.table.max_nodes
        if len(urls) > limit:
            if not self._too_many:
                self._too_many = True
                logger.warning("cache_aware routing covers at most %d nodes and the proxy has %d: every request is "
                               "routed by the stock strategy until the cluster is back to %d nodes or fewer",
                               limit, len(urls), limit)
            return False
        if self._too_many:
            self._too_many = False
            logger.warning("cache_aware routing: %d nodes, cache-aware routing resumes", len(urls))
        mapped = self.options.get("feed_urls") or {}
        if urls and mapped:
            known = {u.rstrip("/") for u in urls}
            for node in mapped:
                if node not in known and node not in self._unmatched_feed_urls:
                    self._unmatched_feed_urls.add(node)   # once per mapping (a node may still register later)
                    logger.warning("cache_aware routing: --cache-aware-feed-url names node %s, which is not a node "
                                   "registered now (%s); the node's URL must match exactly (host, port, scheme: "
                                   "localhost is not 127.0.0.1)", node, ", ".join(sorted(known)))
        with self.lock:
            for url in urls:
                if url not in self.router.nodes:
                    self._track(url)
            for url in [u for u in self.router.nodes if u not in urls]:
                self.router.remove_node(url)
                self._feed_state.pop(url, None)
                self._cooldown.pop(url, None)   # per-node state goes with the node (URLs churn)
        return True

    def _track(self, url: str) -> None:
        """Start routing to ``url`` (under ``self.lock``): a router node with the default profile, no feed yet."""
        self.router.add_node(url, self.default_profile)
        self._feed_state[url] = {"last_ok": None, "has_feed": None}

    # -- routing -------------------------------------------------------------------------
    async def capture(self, raw_request) -> None:
        """Dependency of the routed endpoints: body -> RoutingRequest in the context."""
        from ..routing.request import RoutingRequest
        from .request_salt import request_salt_for, salt_from_key_enabled

        if raw_request.url.path not in ROUTED_PATHS:
            return
        try:
            body = await raw_request.json()
            if not isinstance(body, dict):
                return
            tokens = None
            if self.encoder is not None:
                try:
                    tokens = await self.encoder.encode(raw_request.url.path, body)
                except Exception as exc:   # a body the node would reject, multimodal content: text prefix
                    self.encode_fallbacks += 1
                    logger.debug("cache_aware routing: could not tokenize the request as the node does (%r); "
                                 "routed by text prefix", exc)
            sess = session_key(body)
            # the salt the nodes give the request partitions the router's ids too (a bad cache_salt: the node
            # answers 400, and the router routes it as unsalted)
            try:
                part = request_salt_for(body, raw_request.headers.get("authorization"),
                                        from_api_key=salt_from_key_enabled())
            except ValueError:
                part = ""
            if tokens is not None:
                req = RoutingRequest(tokens, session=sess, partition=part)
            else:
                text = request_text(raw_request.url.path, body)
                if text is None:
                    return
                req = RoutingRequest.from_text(text, session=sess, partition=part)
            _current.set(req)
        except Exception as exc:  # routing never fails a request
            self.errors += 1
            logger.warning("cache_aware routing: could not read the request (%r); stock routing for it", exc)

    def choose(self, candidates: list[str], model_name: str | None = None) -> str | None:
        """The node for the request in the current context (None: let the stock strategy pick). ``model_name``:
        the request's model (a LoRA adapter's name matches nothing exact)."""
        req = _current.get()
        _ticket.set(None)
        if req is None or not candidates:
            return None
        _current.set(None)
        adapter = self.adapter_of(model_name, candidates)
        if adapter:
            req.set_adapter(adapter)
        # the event loop waits at most CHOOSE_LOCK_TIMEOUT_S (the poller may be applying a large snapshot)
        if not self.lock.acquire(timeout=CHOOSE_LOCK_TIMEOUT_S):
            self.lock_timeouts += 1
            return None
        try:
            self._drain()
            if not self._sync_nodes(list(self.node_manager.nodes) if self.node_manager is not None else candidates):
                return None
            d = self.router.route(req, candidates)
            if d is None:
                return None
            ticket = self.router.dispatched(d, req)
            if adapter:
                self.adapter_requests += 1
        finally:
            self.lock.release()
        if ticket is not None:
            _ticket.set((d.node, ticket))
        return d.node

    def adapter_of(self, model_name: str | None, candidates: list[str]) -> str:
        """``model_name`` when it names a LoRA adapter on a candidate node (not the node's base model, which its
        ``/v1/models`` lists first), else ""."""
        nodes = getattr(self.node_manager, "nodes", None) if self.node_manager is not None else None
        if not model_name or not isinstance(model_name, str) or not nodes:
            return ""
        for url in candidates:
            models = getattr(nodes.get(url), "models", None) or []
            if models and model_name in models and models[0] != model_name:
                return model_name
        return ""

    def take_ticket(self, node_url: str) -> int | None:
        """The ticket of the request this context's ``choose`` placed on ``node_url`` (once; ``pre_call``)."""
        got = _ticket.get()
        if got is None:
            return None
        _ticket.set(None)
        return got[1] if got[0] == node_url else None

    def finished(self, url: str, ticket: int | None = None) -> None:
        """The request of ``ticket`` (from ``choose``, via ``pre_call``'s start value) on ``url`` ended. A request
        without a ticket was not placed by this strategy: nothing of the router's changes."""
        if ticket is not None:
            if self.lock.acquire(blocking=False):   # the event loop never waits here: queued otherwise
                try:
                    self._drain()
                    self.router.finished(url, ticket)
                finally:
                    self.lock.release()
            else:
                self._deferred.append(("finished", url, ticket))
        self._wake.set()

    def _drain(self) -> None:
        """Apply what the request path queued (under ``self.lock``)."""
        while self._deferred:
            try:
                kind, url, ticket = self._deferred.popleft()
            except IndexError:
                return
            if kind == "finished":
                self.router.finished(url, ticket)
            else:
                self._node_error_locked(url)

    def node_error(self, url: str) -> None:
        """``url`` answered a request with a node fault: skip it for ``error_cooldown`` seconds."""
        now = time.monotonic()
        for u in [u for u, end in list(self._cooldown.items()) if end <= now]:   # expired: no entry kept
            self._cooldown.pop(u, None)
        self._cooldown[url] = now + float(self.options.get("error_cooldown") or 10.0)
        if self.lock.acquire(blocking=False):   # the event loop never waits here: queued otherwise
            try:
                self._drain()
                self._node_error_locked(url)
            finally:
                self.lock.release()
        else:
            self._deferred.append(("error", url, None))
        logger.warning("cache_aware routing: node %s answered with an error; skipped for %.0f s", url,
                       float(self.options.get("error_cooldown") or 10.0))

    def _node_error_locked(self, url: str) -> None:
        if url not in self.router.nodes and len(self.router.nodes) < self.router.table.max_nodes:
            self._track(url)   # not polled yet: the cooldown holds anyway
        self.router.set_health(url, False)

    def _healthy_again(self, url: str, now: float) -> bool:
        return now >= self._cooldown.get(url, 0.0)

    # -- feeds ---------------------------------------------------------------------------
    def poll_once(self, session=None) -> None:
        import requests

        urls = list(self.node_manager.nodes) if self.node_manager is not None else list(self.router.nodes)
        if not self._sync_nodes(urls):
            return
        http = session or requests
        headers = feed_headers(self.options)
        now = time.monotonic()
        readers: dict[str, list[str]] = {}
        for url in urls:
            readers.setdefault(self.feed_url(url), []).append(url)
        for url in urls:   # in turn, on this one thread: one reader contends with the requests for the lock
            fs = self._feed_state.get(url)
            if fs is not None and now < fs.get("skip_until", 0.0) and not self._answers_again(url, fs, now):
                self._expire_view(url, fs, now)   # its feed timed out lately: not read now
                continue
            self._poll_node(url, http, headers, now, readers)

    def _poll_node(self, url: str, http, headers: dict, now: float, readers: dict) -> None:
        """One round of ``url``'s feed reads (``poll_once``)."""
        import requests

        from ..routing.feed import FeedError, FeedOverflow

        with self.lock:
            st = self.router.nodes.get(url)
            if st is None:
                return
            params = st.cursor.params()
            # under the lock, with the node still there: a node that leaves takes its feed state with it
            # (``_sync_nodes``), and a round that began before it left never puts the state back
            fs = self._feed_state.setdefault(url, {"last_ok": None, "has_feed": None})
        sharing = readers[self.feed_url(url)]
        if len(sharing) > 1:
            # one feed read for several nodes (data-parallel engines of one host under --cache-aware-feed-port,
            # or a --cache-aware-feed-url given twice) is at most one engine's cache: never any node's exact view
            if not fs.get("shared"):
                fs["shared"] = True
                logger.warning("cache_aware routing: nodes %s would all read the cache-state feed at %s, which "
                               "serves one engine's cache at most; routing them with an approximate model of "
                               "their caches (give each its own --cache-aware-feed-url)",
                               ", ".join(sharing), self.feed_url(url))
            self._without_feed(url, fs, now)
            return
        fs.pop("shared", None)
        t_read = time.monotonic()
        try:
            # at most FEED_READS_PER_POLL reads per node and round: a node that always says "more"
            # cannot starve the others (its cursor resumes next round)
            for _ in range(FEED_READS_PER_POLL):
                t_read = time.monotonic()
                r = http.get(self.feed_url(url), params=params, timeout=FEED_READ_TIMEOUT_S, headers=headers)
                if r.status_code == 404:
                    if not fs.get("no_feed"):
                        fs["no_feed"] = True
                        logger.warning("cache_aware routing: node %s has no cache-state feed at %s (HTTP 404: a stock "
                                       "node, or a feed address that is not this node's); routing to it with an "
                                       "approximate model of its cache", url, self.feed_url(url))
                    self._without_feed(url, fs, now)
                    break
                if r.status_code in (401, 403) and not fs.get("refused"):
                    fs["refused"] = True
                    logger.warning("cache_aware routing: node %s refused the feed read (HTTP %d): set "
                                   "--cache-aware-feed-api-key to one of its LMDEPLOY_HOSTCACHE_FEED_API_KEYS",
                                   url, r.status_code)
                if r.status_code != 200:
                    raise ConnectionError(f"HTTP {r.status_code}")
                msg = r.json()
                try:   # validate and decode outside the lock (changes nothing)
                    pending = self.router.prepare_feed(url, msg)
                except KeyError:   # the node left meanwhile
                    break
                with self.lock:
                    plan = self.router.plan_room(pending)
                # the table growth this message needs, built outside the lock too (installed only if
                # nothing changed the table meanwhile; else the commit grows it under the lock)
                built = self.router.table.build_resized(plan[1]) if plan is not None else None
                with self.lock:
                    self._drain()
                    if built is not None:
                        self.router.table.install_resized(built, plan[0])
                    del built
                    if self.router.commit_feed(pending, pause=self._let_requests_in) is None:
                        break   # the node left or was reset meanwhile: nothing applied, next round resumes
                    self.router.set_health(url, self._healthy_again(url, now))
                    params = self.router.nodes[url].cursor.params()
                fs["has_feed"], fs["last_ok"] = True, now
                fs.pop("slow", None)
                fs.pop("skip_until", None)
                fs.pop("no_feed", None)
                fs.pop("invalid", None)
                fs.pop("unreachable", None)
                fs.pop("down", None)
                if not msg.get("more"):
                    break
        except FeedError as exc:
            # once until the feed is valid again, not at every poll; a view outgrowing its capacity once per
            # node (its next snapshot is valid again: the flag would not stop a log line per cycle)
            flag = "overflow" if isinstance(exc, FeedOverflow) else "invalid"
            if not fs.get(flag):
                fs[flag] = True
                logger.warning("cache_aware routing: node %s sent an invalid cache-state feed: %s", url, exc)
            with self.lock:
                self._drop_exact_view(url)
        except Exception as exc:
            unreachable = isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout))
            if isinstance(exc, requests.exceptions.Timeout) or time.monotonic() - t_read >= 0.9 * FEED_READ_TIMEOUT_S:
                # a feed that answers only at the read timeout (or stalls mid-body: requests raises a
                # ConnectionError then) holds up the nodes read after it: not read for 1, 2, 4, then 8 poll
                # intervals after each such read, until one succeeds
                fs["slow"] = min(SLOW_FEED_MAX_SKIP, 2 * fs.get("slow", 0) or 1)
                step = min(float(self.options["feed_interval"]), FEED_READ_TIMEOUT_S)   # at most 40 s in all
                fs["skip_until"] = time.monotonic() + fs["slow"] * step
            # the node is down when its own API address does not answer: read there, or probed now
            # when its feed is served on another port or URL (--cache-aware-feed-port/-url, and every
            # real node's engine feed). A feed elsewhere that does not answer while the API does is a
            # node without a feed (stock LMDeploy, or its feed failed to start): approximate, not skipped
            down = unreachable and (self._feed_is_on_api(url) or not api_answers(url))
            if down and not fs.get("down"):
                fs["down"] = True
                logger.warning("cache_aware routing: node %s does not answer (its cache-state feed at %s "
                               "neither); no request goes to it until it answers again", url, self.feed_url(url))
            if not down:
                fs.pop("down", None)
            if unreachable and not down and not fs.get("unreachable"):
                fs["unreachable"] = True
                logger.warning("cache_aware routing: the cache-state feed of node %s does not answer at %s; "
                               "routing to it with an approximate model of its cache", url, self.feed_url(url))
            with self.lock:
                if url in self.router.nodes:
                    # unreachable: skip the node until it answers; a feed that errors while the
                    # node answers: its view goes stale, then approximate after the timeout
                    self.router.set_health(url, not down and self._healthy_again(url, now))
            self._expire_view(url, fs, now)
            logger.debug("cache_aware routing: feed of %s failed: %r", url, exc)

    def _answers_again(self, url: str, fs: dict, now: float) -> bool:
        """A node marked down by its API probe while its slow feed (served elsewhere) is skipped: whether its API
        address answers again (probed at most once per poll interval), so that it is read, and routed to, within
        a round of coming back. (A feed read at the API address is its own probe: it waits out the window.)"""
        if (not fs.get("down") or self._feed_is_on_api(url)
                or now - fs.get("probed_at", float("-inf")) < float(self.options["feed_interval"])):
            return False
        fs["probed_at"] = now
        return api_answers(url)

    def _expire_view(self, url: str, fs: dict, now: float) -> None:
        """A node whose feed has not been read successfully for ``--cache-aware-feed-timeout`` seconds is routed
        on the approximate index (its exact view would go stale)."""
        last = fs.get("last_ok")
        if last is None or now - last > float(self.options["feed_timeout"]):
            with self.lock:
                self._drop_exact_view(url)

    def _without_feed(self, url: str, fs: dict, now: float) -> None:
        """``url`` has no feed of its own (404, or one shared with other nodes): routed on the approximate
        index, healthy unless in an error cooldown."""
        fs["has_feed"] = False
        with self.lock:
            if url in self.router.nodes:
                self.router.set_health(url, self._healthy_again(url, now))
                self._drop_exact_view(url)

    def _drop_exact_view(self, url: str) -> None:
        """(Under ``self.lock``.) Route ``url`` on the approximate index from now on; a node already routed so
        keeps the approximate index it has."""
        st = self.router.nodes.get(url)
        if st is not None and st.exact:
            self.router.set_approximate(url, self.default_profile)

    def _let_requests_in(self) -> None:
        """Between two chunks of a large snapshot (``commit_feed``'s ``pause``, called under ``self.lock``, held
        once by the poller): release the lock for a moment, so a waiting ``choose`` gets it."""
        self.lock.release()
        try:
            time.sleep(0.001)
        finally:
            self.lock.acquire()

    def _feed_is_on_api(self, node_url: str) -> bool:
        """Whether ``node_url``'s feed is read at the node's own API address (same host and port)."""
        return _host_port(self.feed_url(node_url)) == _host_port(node_url)

    def feed_url(self, node_url: str) -> str:
        """Where ``node_url``'s cache-state feed is read: its ``--cache-aware-feed-url`` mapping, else the
        node's host at ``feed_port``, else the node's own URL."""
        from urllib.parse import urlsplit

        from ..routing.feed import FEED_PATH

        mapped = (self.options.get("feed_urls") or {}).get(node_url.rstrip("/"))
        if mapped:
            return mapped if mapped.rstrip("/").endswith(FEED_PATH) else mapped.rstrip("/") + FEED_PATH
        port = self.options.get("feed_port")
        if not port:
            return node_url.rstrip("/") + FEED_PATH
        u = urlsplit(node_url)
        host = f"[{u.hostname}]" if u.hostname and ":" in u.hostname else u.hostname
        return f"{u.scheme or 'http'}://{host}:{int(port)}{FEED_PATH}"

    def _run(self) -> None:
        import requests

        with requests.Session() as s:
            while not self._stop.is_set():
                try:
                    self.poll_once(s)
                except Exception as exc:  # pragma: no cover - keep polling
                    logger.warning("cache_aware routing: feed poll failed: %r", exc)
                self._wake.wait(float(self.options["feed_interval"]))
                self._wake.clear()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="hostcache-feed-poller", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def status(self) -> dict:
        with self.lock:
            out = self.router.status()
        out["strategy"] = STRATEGY
        out["tokenizer"] = self.encoder.model_path if self.encoder is not None else None
        out["mode"] = "tokens" if self.encoder is not None else "text-prefix (approximate)"
        out["errors"] = self.errors
        out["lock_timeouts"] = self.lock_timeouts
        out["adapter_requests"] = self.adapter_requests
        out["encode_fallbacks"] = self.encode_fallbacks
        for n in out["nodes"]:
            n["has_feed"] = self._feed_state.get(n["name"], {}).get("has_feed")
        return out


def _status_endpoint(nm):
    """``GET /hostcache/routing``, for clients on the proxy's own host only: its per-node counters
    (predicted hit tokens) change with each request, so a remote client could tell whether a prompt it
    sends is cached for someone else."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    def routing_status(request: Request):
        if not _is_loopback(request.client.host if request.client is not None else ""):
            return JSONResponse({"error": f"{STATUS_PATH} answers clients on the proxy's host only"},
                                status_code=403)
        return nm._hostcache_routing.status()

    routing_status.__annotations__ = {"request": Request}   # the real class: FastAPI injects by type
    return routing_status


def _cache_aware_class(base: type) -> type:
    """A subclass of the live NodeManager's class routing Hybrid requests through the service."""

    class CacheAwareNodeManager(base):
        _hostcache_routing: RoutingService

        def get_node_url(self, model_name, role=None):
            from lmdeploy.pytorch.disagg.config import EngineRole

            role = EngineRole.Hybrid if role is None else role
            if role == EngineRole.Hybrid:
                try:
                    cands = [u for u, s in self.get_nodes(role).items() if model_name in s.models]
                    url = self._hostcache_routing.choose(cands, model_name)
                    if url is not None:
                        return url
                except Exception as exc:  # never fail a request over routing
                    self._hostcache_routing.errors += 1
                    logger.warning("cache_aware routing failed (%r); stock routing for this request", exc)
            return super().get_node_url(model_name, role)

        async def forward_raw_request_generate(self, raw_request, node_url, endpoint):
            text = await super().forward_raw_request_generate(raw_request, node_url, endpoint)
            if is_node_fault(text):
                self._hostcache_routing.node_error(node_url)
            return text

        def pre_call(self, node_url):
            start = super().pre_call(node_url)
            try:   # the endpoint calls pre_call right after get_node_url, in the same task (context)
                ticket = self._hostcache_routing.take_ticket(node_url)
                if ticket is not None and isinstance(start, (int, float)):
                    return RoutedStart(start, node_url, ticket)
            except Exception as exc:  # never fail a request over routing
                self._hostcache_routing.errors += 1
                logger.warning("cache_aware routing: pre_call failed (%r)", exc)
            return start

        def post_call(self, node_url, start):
            super().post_call(node_url, start)
            ticket = start.ticket if isinstance(start, RoutedStart) and start.node == node_url else None
            self._hostcache_routing.finished(node_url, ticket)

    CacheAwareNodeManager.__qualname__ = f"CacheAware{base.__qualname__}"
    return CacheAwareNodeManager


def install(options: dict, proxy_module=None) -> RoutingService:
    """Turn the live proxy module's routing into ``cache_aware`` (see the module docstring)."""
    if proxy_module is None:
        import importlib

        proxy_module = importlib.import_module("lmdeploy.serve.proxy.proxy")
    from lmdeploy.serve.utils.server_utils import validate_json_request

    nm = proxy_module.node_manager
    service = RoutingService(options, nm)
    if not getattr(type(nm), "_hostcache_routing", None):
        nm.__class__ = _cache_aware_class(type(nm))
    nm._hostcache_routing = service

    stock_check = getattr(validate_json_request, "__wrapped__", validate_json_request)  # under the salt wrapper

    async def validate_and_capture(raw_request):
        stock_check(raw_request)
        await service.capture(raw_request)

    from starlette.requests import Request

    validate_and_capture.__annotations__ = {"raw_request": Request}  # real class: FastAPI injects by type

    proxy_module.app.dependency_overrides[validate_json_request] = validate_and_capture
    if not any(getattr(r, "path", None) == STATUS_PATH for r in proxy_module.app.routes):
        proxy_module.app.add_api_route(STATUS_PATH, _status_endpoint(nm), methods=["GET"])
    service.start()
    logger.info("lmdeploy-hostcache: cache_aware routing installed (tokenizer: %s)", options.get("model") or "none")
    return service
