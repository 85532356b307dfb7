"""Replay request traces through a GPU+host prefix cache: hit rates, restored tokens, TTFT estimate.

With no trace argument the bundled Mooncake conversation trace is replayed (12,031 requests,
see lmdeploy_hostcache/data/PROVENANCE.md) for Llama-3-8B bf16 with a 20 GiB GPU KV budget and a
200 GiB host tier.  Capacities come either in GiB (converted with the model's KV geometry) or in
blocks of the trace's own block size.  docs/planner.md explains the model and its limits.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from importlib import resources
from pathlib import Path

from .concurrency import APPROXIMATE_ADMISSION, DEFAULT_DECODE_TOKENS_PER_S
from .generator import WORKLOAD_FAMILIES
from .traces import TRACE_FORMATS

DEFAULT_MODEL = "Llama-3-8B"
DEFAULT_GPU_KV_GB = 20.0
DEFAULT_HOST_GB = 200.0
DEFAULT_STAGGER_S = 60.0
DEFAULT_PLOT = "plan_sweep.png"
BUNDLED_TRACE = "conversation_trace.jsonl.gz"
# engine_steps.LONG_POLICIES (repeated to keep the parser light; a test keeps them equal)
LONG_POLICIES = ("size", "fifo")


def bundled_trace_path() -> Path:
    """The Mooncake conversation trace shipped in ``lmdeploy_hostcache/data``."""
    return Path(str(resources.files("lmdeploy_hostcache") / "data" / BUNDLED_TRACE))


def _csv_floats(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals or any(not v >= 0 or v == float("inf") for v in vals):
        raise argparse.ArgumentTypeError(f"expected finite numbers >= 0, got {text!r}")
    return vals


MAX_STEP_MODEL_CHUNKS = 100_000        # prefill chunks of one prompt in --engine-steps
MAX_STEP_MODEL_OUTPUT_TOKENS = 1_000_000   # output tokens of one request in --engine-steps
MAX_STEP_MODEL_LOAD_STEPS = 100_000        # steps one host block's load may take in --engine-steps (each is replayed)
MAX_INT_ARG = 2**48          # a block count, token count or size beyond any real node or trace
MIN_RATE, MAX_RATE = 1e-9, 1e18   # rates and times: outside, the estimates overflow to inf / NaN


def bounded_int_arg(text: str, minimum: int, maximum: int = MAX_INT_ARG) -> int:
    """argparse type body: an int in [minimum, maximum], else one error naming the range."""
    try:
        v = int(text)
    except ValueError:
        v = None
    if v is None or not minimum <= v <= maximum:
        shown = text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"
        top = "2**48" if maximum == MAX_INT_ARG else str(maximum)
        raise argparse.ArgumentTypeError(f"expected an int in [{minimum}, {top}], got {shown!r}")
    return v


def _nonneg_int(text: str) -> int:
    return bounded_int_arg(text, 0)


def _load_delay_arg(text: str) -> int:
    return bounded_int_arg(text, 0, MAX_STEP_MODEL_LOAD_STEPS)


def min_restore_arg(text: str) -> int | str:
    """argparse type of ``--min-restore-tokens``: an int >= 0, or ``auto`` (resolved once the model's bytes
    per token are known: ``resolve_min_restore``)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return bounded_int_arg(text, 0)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("expected an int", "expected auto or an int", 1)) from None


def plot_path_arg(text: str) -> str:
    """argparse type of a plot path: a folder is refused, and a name without a suffix gets ``.png`` (matplotlib
    would add it silently, and the path printed would not be the file written)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a file path for the plot, got an empty one")
    p = Path(text)
    if os.path.isdir(text):   # os.path: False (not a traceback) under a folder it cannot enter
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file path such as {p / 'plot.png'}")
    return str(p.with_name(p.name + ".png")) if not p.suffix else text


def refuse_output_over_input(option: str, output: str, inputs) -> None:
    """PlanError when ``output`` is one of the ``inputs`` (paths or None): writing it would destroy an input."""
    from ..outfile import same_file

    same = next((i for i in inputs if i and same_file(output, i)), None)
    if same is not None:
        raise PlanError(f"{option} {output} is the input {same}: writing it would destroy it; give another path")


def positive_int_arg(text: str) -> int:
    return bounded_int_arg(text, 1)


def _pos_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = None
    if v is None or not MIN_RATE <= v <= MAX_RATE:
        raise argparse.ArgumentTypeError(f"expected a number in [{MIN_RATE:g}, {MAX_RATE:g}], got {text[:40]!r}")
    return v


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not 0 <= v < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return v


class _Explicit(argparse.Action):
    """Store like ``store`` (or ``store_true`` with ``nargs=0``) and record the option as given, so
    ``--cluster`` can refuse options it would otherwise ignore (even when given their default)."""

    def __init__(self, option_strings, dest, const=None, nargs=None, **kwargs):
        self._flag = nargs == 0
        super().__init__(option_strings, dest, nargs=nargs, const=const, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True if self._flag else values)
        given = dict(getattr(namespace, "explicit_options", None) or {})
        given[self.dest] = option_string or self.option_strings[0]
        namespace.explicit_options = given


# Options a cluster file replaces or that make no sense with --cluster: refused together with it.
CLUSTER_CONFLICTS = ("model", "quant_policy", "host_kv_format", "tp", "kernel_block_size", "policy",
                     "min_restore_tokens",
                     "gpu_kv_gb", "host_gb",
                     "gpu_blocks", "host_blocks", "sweep", "sweep_tier", "sweep_values", "plot")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.set_defaults(explicit_options={})
    src = p.add_argument_group("trace")
    src.add_argument("traces", nargs="*", metavar="TRACE",
                     help="Mooncake JSONL(.gz) or WEKA session JSON files (or folders of *.json); several "
                          "WEKA files are merged. Default: the bundled Mooncake conversation trace.")
    src.add_argument("--format", choices=TRACE_FORMATS, default="auto",
                     help="trace format (default: sniffed from the first file)")
    src.add_argument("--block-size", type=positive_int_arg, default=None, metavar="N",
                     help="tokens per block of a Mooncake-layout trace's hash_ids (default: the file's own "
                          "'block_size' field, which captured files state, else 512); a file stating another "
                          "size is refused")
    src.add_argument("--stagger", type=_nonneg_float, default=None, metavar="S",
                     help=f"seconds between the starts of merged WEKA session files (default {DEFAULT_STAGGER_S:g}); "
                          "refused for other input, where it would not act")
    src.add_argument("--generate", choices=WORKLOAD_FAMILIES, default=None, metavar="FAMILY",
                     help=f"replay a built-in workload instead of a trace file: one of {', '.join(WORKLOAD_FAMILIES)} "
                          "(multi-turn chat, shared documents, growing agent sessions)")
    src.add_argument("--workload-param", action="append", default=[], metavar="FIELD=VALUE",
                     help="set one field of the --generate workload (repeatable; ranges as LO,HI), e.g. "
                          "documents=500, zipf=1.1, order=cycle, block_size=128; a bad field is named with the "
                          "family's fields")
    src.add_argument("--chat", action="store_true", help="short for --generate chat")
    src.add_argument("--chat-sessions", type=positive_int_arg, default=None, metavar="N",
                     help="chat generator sessions (default 300; short for --workload-param sessions=N)")
    src.add_argument("--chat-block-size", type=positive_int_arg, default=None, metavar="N",
                     help="chat generator block size in tokens (default 64, LMDeploy's default; short for "
                          "--workload-param block_size=N)")
    src.add_argument("--seed", type=_nonneg_int, default=None,
                     help="seed of the --generate/--chat workload (default 0); a trace file has none")
    src.add_argument("--limit", type=_nonneg_int, default=None, metavar="N", help="replay only the first N requests")

    m = p.add_argument_group("model and KV format (for GiB <-> blocks)")
    m.add_argument("--model", action=_Explicit, default=DEFAULT_MODEL,
                   help=f"preset (Llama-3-8B, Qwen2.5-7B, Llama-3-70B) or a HF config.json path "
                        f"(default {DEFAULT_MODEL})")
    m.add_argument("--quant-policy", action=_Explicit, type=int, choices=(0, 4, 8), default=0, help="GPU KV cache quant_policy")
    m.add_argument("--host-kv-format", action=_Explicit, choices=("same", "int8", "int4"), default="same",
                   help="host storage format; int8/int4 compress fp16/bf16 caches on offload (default same)")
    m.add_argument("--tp", action=_Explicit, type=positive_int_arg, default=1,
                   help="tensor-parallel ranks (each rank holds kv_heads/tp heads, or one replicated head when tp "
                        "is a multiple of kv_heads)")
    m.add_argument("--kernel-block-size", action=_Explicit, type=positive_int_arg, default=None, metavar="N",
                   help="LMDeploy's --kernel-block-size, tokens per kernel page: a power of 2 >= 16 dividing the "
                        "block size; smaller pages round more tensors up to 256 bytes (default: the block size)")

    c = p.add_argument_group("capacities")
    c.add_argument("--gpu-kv-gb", action=_Explicit, type=_nonneg_float, default=DEFAULT_GPU_KV_GB, metavar="GIB",
                   help=f"KV-cache memory per GPU (default {DEFAULT_GPU_KV_GB:g})")
    c.add_argument("--host-gb", action=_Explicit, type=_nonneg_float, default=DEFAULT_HOST_GB, metavar="GIB",
                   help=f"host RAM for the tier on the node, all ranks together (default {DEFAULT_HOST_GB:g})")
    c.add_argument("--gpu-blocks", action=_Explicit, type=_nonneg_int, default=None, metavar="N",
                   help="GPU tier size in the trace's blocks (overrides --gpu-kv-gb)")
    c.add_argument("--host-blocks", action=_Explicit, type=_nonneg_int, default=None, metavar="M",
                   help="host tier size in the trace's blocks (overrides --host-gb)")
    from ..tier.eviction import DEFAULT_POLICY, POLICIES  # light: no torch, no lmdeploy

    c.add_argument("--policy", action=_Explicit, default=DEFAULT_POLICY,
                   help=f"host-tier eviction policy: {', '.join(POLICIES)} "
                        f"(default {DEFAULT_POLICY}, the server's default)")
    from .replay import SERVER_MIN_RESTORE_TOKENS

    c.add_argument("--min-restore-tokens", action=_Explicit, type=min_restore_arg, default=SERVER_MIN_RESTORE_TOKENS,
                   metavar="N|auto", help="the server's min_restore_tokens: a host hit shorter than N tokens is "
                                          f"recomputed, not restored (default {SERVER_MIN_RESTORE_TOKENS}, the "
                                          "server's default; 0 restores every hit; auto: the threshold the server "
                                          "derives for this model and format from --calibration)")
    c.add_argument("--calibration", action=_Explicit, default=None, metavar="JSON",
                   help="restore calibration for --min-restore-tokens auto (the GPU kit's calibration.json; "
                        "default: $LMDEPLOY_HOSTCACHE_CALIBRATION, else the server's assumed figures)")

    k = p.add_argument_group("cost model (assumptions, not measurements)")
    k.add_argument("--prefill-tokens-per-s", type=_pos_float, default=None, metavar="R",
                   help="prefill rate (default: 30,000 tokens/s scaled by 8B/model size; an assumption)")
    k.add_argument("--h2d-gbps", type=_pos_float, default=None, metavar="GBPS",
                   help="host->GPU copy rate in GB/s (default 25, PCIe Gen4 x16 pinned; an assumption): the TTFT "
                        "estimate's copy time, and with --engine-steps how many steps a host load takes to land")
    k.add_argument("--decode-tokens-per-s", type=_pos_float, default=None, metavar="R",
                   help="output tokens per second per running request, for request lifetimes in the "
                        "concurrency replay (default 40; an assumption; planner/concurrency.py)")
    k.add_argument("--host-write-s", action=_Explicit, type=_nonneg_float, default=0.0, metavar="S",
                   help="seconds after a GPU eviction before its host copy can be restored, in the concurrency "
                        "replay (default 0: any later request; the engine needs about two scheduler steps; "
                        "planner/concurrency.py)")
    k.add_argument("--engine-steps", action="store_true",
                   help="concurrency replay on LMDeploy's step clock: prefill and decode steps, admission by "
                        "--max-batches, --prefill-interval and --max-prefill-tokens; one step lasts 1 / "
                        "--decode-tokens-per-s seconds (planner/engine_steps.py)")
    k.add_argument("--max-batches", type=positive_int_arg, default=None, metavar="N",
                   help=f"with --engine-steps: the engine's max_batch_size (default {_STEP_DEFAULTS[0]}; an assumption)")
    k.add_argument("--prefill-interval", type=positive_int_arg, default=None, metavar="N",
                   help=f"with --engine-steps: LMDeploy's prefill_interval (default {_STEP_DEFAULTS[1]}, LMDeploy's)")
    k.add_argument("--max-prefill-tokens", type=positive_int_arg, default=None, metavar="N",
                   help=f"with --engine-steps: LMDeploy's max_prefill_token_num (default {_STEP_DEFAULTS[2]}, LMDeploy's)")
    k.add_argument("--short-prefill-turns", type=positive_int_arg, default=None, metavar="N",
                   help="with --engine-steps: short-prompt prefill passes between two chunks of a long prompt "
                        "(LMDeploy's LMDEPLOY_PT_TTFT_SHORT_TURNS; default 3, LMDeploy's)")
    k.add_argument("--long-prefill-aging-s", type=_pos_float, default=None, metavar="S",
                   help="with --engine-steps: seconds of the trace's clock a waiting long prompt needs to gain one "
                        "chunk of priority (LMDeploy's LMDEPLOY_PT_TTFT_AGING_SEC; default 2, LMDeploy's)")
    k.add_argument("--long-prefill-policy", choices=LONG_POLICIES, default=None,
                   help="with --engine-steps: the order of waiting long prompts: size (fewest chunks first, aged; "
                        "LMDeploy's default) or fifo (arrival order) (LMDeploy's LMDEPLOY_PT_TTFT_POLICY)")
    k.add_argument("--load-delay-steps", type=_load_delay_arg, default=None, metavar="N",
                   help="with --engine-steps: steps every host load takes beyond its copy time (default 0); the "
                        "copy time itself follows each load's bytes per rank at --h2d-gbps, one step lasting 1 / "
                        "--decode-tokens-per-s s (an assumption: loads do not queue behind each other)")
    k.add_argument("--no-concurrency", action="store_true",
                   help="skip the replay with request lifetimes (only the one-request-at-a-time replay)")

    s = p.add_argument_group("sweep and cluster")
    s.add_argument("--sweep", action=_Explicit, nargs=0, default=False,
                   help="capacity-vs-hit-rate table and PNG plot (the plot needs matplotlib: the 'plot' extra)")
    s.add_argument("--sweep-tier", action=_Explicit, choices=("host", "gpu"), default="host", help="tier to sweep (default host)")
    s.add_argument("--sweep-values", action=_Explicit, type=_csv_floats, default=None, metavar="LIST",
                   help="comma-separated sizes to sweep, in GiB (in blocks with --gpu-blocks/--host-blocks); "
                        "default 0, 1/16 .. 2x the configured size (--sweep-tier gpu: 1/8 .. 4x, no 0)")
    s.add_argument("--plot", action=_Explicit, default=DEFAULT_PLOT, metavar="PNG", type=plot_path_arg, help=f"sweep plot path (default ./{DEFAULT_PLOT})")
    s.add_argument("--cluster", default=None, metavar="YAML",
                   help="heterogeneous cluster file (see examples/cluster.yaml): it sets the model, format, policy and "
                        "every node's sizes, so --model/--quant-policy/--host-kv-format/--tp/--policy, the "
                        "size options and --sweep/--plot are refused with it")
    s.add_argument("--l3-gb", type=_nonneg_float, default=None, metavar="GIB",
                   help="with --cluster: add one shared L3 store (Mooncake Store) of GIB under every node and "
                        "report the cluster hit rate with it next to the nodes alone (planner/l3.py)")
    s.add_argument("--l3-gbps", type=_pos_float, default=None, metavar="GBPS",
                   help="with --l3-gb: store->host transfer rate for the L3 estimate in GB/s (default 5; an "
                        "assumption)")

    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    o.add_argument("--quiet", action="store_true", help="no progress bar")


class PlanError(ValueError):
    """A bad argument or input file; printed as 'error: ...' with exit code 2."""


def load_trace(args):
    from .generator import generate, workload_from_params
    from .traces import read_traces

    block_size = getattr(args, "block_size", None)
    stagger, seed = getattr(args, "stagger", None), getattr(args, "seed", None)
    family = _generator_family(args)
    if family is not None:
        if args.traces:
            raise PlanError(f"--generate {family} replays a built-in workload; do not also give trace files")
        if block_size is not None:
            raise PlanError("--block-size applies to Mooncake-layout trace files; a generated workload takes "
                            "--workload-param block_size=N" + (" or --chat-block-size" if family == "chat" else ""))
        for opt, given in (("--format", args.format != "auto"), ("--stagger", stagger is not None)):
            if given:
                raise PlanError(f"{opt} applies to trace files; --generate {family} replays a built-in workload")
        trace = generate(workload_from_params(family, _workload_params(args), seed=seed or 0), limit=args.limit)
    else:
        if seed is not None:
            raise PlanError("--seed seeds a built-in workload: add --generate FAMILY (or --chat); a trace file "
                            "replays as recorded")
        sources = args.traces or [str(bundled_trace_path())]
        trace = read_traces(sources, args.format, block_size, DEFAULT_STAGGER_S if stagger is None else stagger)
        if stagger is not None:
            unused = stagger_unused(sources, args.format)
            if unused:
                raise PlanError(unused)
    if args.limit is not None:
        trace = trace.head(args.limit)
    if not trace.requests:
        why = f" ({trace.read_warnings[0]})" if trace.read_warnings else ""
        raise PlanError(f"trace {trace.name} has no requests{why}")
    return trace


def stagger_unused(sources, fmt: str) -> str | None:
    """Why ``--stagger`` would not act on these trace sources, or None.  It spaces the starts of merged
    WEKA session files, so Mooncake-layout input and a single session file leave it unused.  Call it on
    sources ``read_traces`` has read (one format, every file a regular file)."""
    from .traces import list_trace_files, sniff_format

    files = list_trace_files(sources)
    if (fmt if fmt != "auto" else sniff_format(files[0])) != "weka":
        return (f"--stagger spaces the starts of merged WEKA session files; {', '.join(map(str, sources))} "
                "is Mooncake-layout input, which keeps its own timestamps")
    if len(files) < 2:
        return (f"--stagger spaces the starts of merged WEKA session files; {sources[0]} is one session, "
                "which starts at 0")
    return None


def _generator_family(args) -> str | None:
    """The built-in workload to replay (``--generate``, or ``--chat`` for chat), or None for trace files."""
    if args.chat and args.generate not in (None, "chat"):
        raise PlanError(f"--chat is short for --generate chat; it contradicts --generate {args.generate}")
    family = "chat" if args.chat else args.generate
    chat_opts = [o for o, v in (("--chat-sessions", args.chat_sessions), ("--chat-block-size", args.chat_block_size))
                 if v is not None]
    if chat_opts and family != "chat":
        raise PlanError(f"{', '.join(chat_opts)} set the chat generator: add --chat (or --generate chat)")
    if args.workload_param and family is None:
        raise PlanError("--workload-param sets a built-in workload: add --generate FAMILY")
    return family


def _workload_params(args) -> dict[str, str]:
    """``--workload-param FIELD=VALUE`` pairs (and the chat shorthands) as text by field."""
    params: dict[str, str] = {}
    for opt, field, v in (("--chat-sessions", "sessions", args.chat_sessions),
                          ("--chat-block-size", "block_size", args.chat_block_size)):
        if v is not None:
            params[field] = str(v)
    for item in args.workload_param:
        field, eq, value = item.partition("=")
        field = field.strip()
        if not eq or not field:
            raise PlanError(f"--workload-param {item!r}: expected FIELD=VALUE")
        if field in params:
            raise PlanError(f"--workload-param sets {field} twice (or also through a --chat-* option)")
        params[field] = value.strip()
    return params


# EngineSteps defaults (planner/engine_steps.py; repeated here to keep the parser light): max_batches
# (an assumption), prefill_interval and max_prefill_token_num (LMDeploy 0.18's defaults)
_STEP_DEFAULTS = (128, 16, 8192)


def run(args) -> int:
    try:
        return _run(args)
    except ValueError as exc:  # bad input: say what and where, no traceback
        msg = str(exc) if isinstance(exc, UnicodeError) or not exc.args else exc.args[0]
        print(f"error: {msg}", file=sys.stderr)
        return 2


def restore_calibration(setting, path: str | None):
    """The restore calibration that ``min_restore_tokens: auto`` is resolved with (``--calibration``, else
    ``$LMDEPLOY_HOSTCACHE_CALIBRATION``, else the server's assumed figures: ``restore_cost.load_calibration``,
    the server's own rule); None for a number, which needs none.  Read before the trace, so a bad file fails fast."""
    from ..restore_cost import CalibrationError, load_calibration

    if setting != "auto":
        if path is not None:
            raise PlanError(f"--calibration {path} sets the restore threshold of min_restore_tokens auto; "
                            f"the threshold here is the number {setting}")
        return None
    try:
        return load_calibration(path)
    except CalibrationError as exc:
        raise PlanError(str(exc)) from None


def _calibration_dict(args) -> dict | None:
    """The calibration ``auto`` was resolved with, for ``--json`` (None: a number was given)."""
    cal = args.min_restore_calibration
    return None if cal is None else cal.to_dict()


def describe_min_restore(tokens: int, calibration) -> str:
    """The report's phrase for the threshold replayed."""
    from ..restore_cost import NEVER

    if calibration is None:
        return f"host hits under {tokens} tokens are recomputed (min_restore_tokens)"
    if tokens >= NEVER:
        return (f"every host hit is recomputed (min_restore_tokens auto: restoring never beats recomputing with "
                f"{calibration.source})")
    return f"host hits under {tokens} tokens are recomputed (min_restore_tokens auto, {calibration.source})"


def _describe_model(geometry, sizing) -> str:
    from .report import fmt_bytes

    f = sizing.cache_format
    return (f"{geometry.name} ({geometry.num_layers} layers, {geometry.num_kv_heads} KV heads x {geometry.head_dim}, "
            f"{geometry.dtype_label}), quant_policy {f.quant_policy}, host format {f.host_kv_format}, tp {f.tp}"
            f"{f', kernel page {f.kernel_block_size} tokens' if f.kernel_block_size else ''}: "
            f"{fmt_bytes(sizing.gpu_block_bytes)} per GPU block, {fmt_bytes(sizing.host_block_bytes)} per host "
            f"block per rank")


def _concurrency_options(args) -> list[str]:
    """The options given that set the single run's concurrency replay (which ``--cluster`` and ``--sweep``
    do not run): refused with those modes rather than ignored.  ``--host-write-s`` counts when given at all,
    its default value included."""
    given = getattr(args, "explicit_options", None) or {}
    return [opt for opt, on in (("--engine-steps", args.engine_steps), ("--no-concurrency", args.no_concurrency),
                                ("--decode-tokens-per-s", args.decode_tokens_per_s is not None),
                                ("--host-write-s", "host_write_s" in given or args.host_write_s != 0.0)) if on]


def _run(args) -> int:
    from ..tier.eviction import POLICIES
    from .cluster import load_cluster
    from .cost import CostModel
    from .geometry import BlockSizing, CacheFormat, resolve_model
    from .replay import distinct_blocks, prepare_trace
    from .traces import trace_warnings

    if args.policy not in POLICIES:
        raise PlanError(f"--policy {args.policy!r} is not one of {sorted(POLICIES)}")
    if args.tp <= 0:
        raise PlanError(f"--tp must be a positive int, got {args.tp}")
    show = False if (args.quiet or args.json) else None
    if args.cluster:
        clash = [opt for dest, opt in (getattr(args, "explicit_options", None) or {}).items()
                 if dest in CLUSTER_CONFLICTS]
        if clash:
            raise PlanError(f"--cluster {args.cluster} sets the model, format, policy and node sizes itself and has "
                            f"no sweep: drop {', '.join(clash)} (or drop --cluster)")
        unused = _concurrency_options(args)
        if unused:
            raise PlanError(f"--cluster replays each request at once, without request lifetimes: drop "
                            f"{', '.join(unused)} (they set the single-node concurrency replay)")
    sweep_only = [opt for dest, opt in (getattr(args, "explicit_options", None) or {}).items()
                  if dest in ("sweep_tier", "sweep_values", "plot")]
    if sweep_only and not args.sweep:
        raise PlanError(f"{', '.join(sweep_only)} set the capacity sweep: add --sweep")
    if args.plot:
        refuse_output_over_input("--plot", args.plot, [*(args.traces or ()), args.cluster, args.calibration, args.model])
    step_opts = [opt for opt, v in (("--max-batches", args.max_batches), ("--prefill-interval", args.prefill_interval),
                                    ("--max-prefill-tokens", args.max_prefill_tokens),
                                    ("--short-prefill-turns", args.short_prefill_turns),
                                    ("--long-prefill-aging-s", args.long_prefill_aging_s),
                                    ("--long-prefill-policy", args.long_prefill_policy),
                                    ("--load-delay-steps", args.load_delay_steps)) if v is not None]
    if step_opts and not args.engine_steps:
        raise PlanError(f"{', '.join(step_opts)} set the step model: add --engine-steps")
    if args.engine_steps and args.sweep:
        raise PlanError("--engine-steps applies to a single run's concurrency replay, not to --sweep")
    if args.sweep:
        unused = _concurrency_options(args)
        if unused:
            raise PlanError(f"--sweep replays each request at once, without request lifetimes: drop "
                            f"{', '.join(unused)} (they set a single run's concurrency replay)")
    if args.no_concurrency:
        unused = [opt for opt in _concurrency_options(args) if opt != "--no-concurrency"]
        if unused:
            raise PlanError(f"--no-concurrency skips the concurrency replay that {', '.join(unused)} "
                            f"{'sets' if len(unused) == 1 else 'set'}: drop one or the other")
    steps = None
    if args.engine_steps:
        from .engine_steps import EngineSteps

        lane = {k: v for k, v in (("short_turns", args.short_prefill_turns),
                                  ("long_aging_s", args.long_prefill_aging_s),
                                  ("long_policy", args.long_prefill_policy),
                                  ("load_delay_steps", args.load_delay_steps)) if v is not None}
        steps = EngineSteps(*(v if v is not None else d for v, d in zip(
            (args.max_batches, args.prefill_interval, args.max_prefill_tokens), _STEP_DEFAULTS)), **lane)
    if (args.l3_gb is not None or args.l3_gbps is not None) and not args.cluster:
        raise PlanError("--l3-gb/--l3-gbps model a store shared by the nodes of a cluster: give --cluster YAML")
    if args.l3_gbps is not None and args.l3_gb is None:
        raise PlanError("--l3-gbps sets the transfer rate of the shared L3 store's estimate: add --l3-gb GIB "
                        "(the store's size), or drop --l3-gbps")
    # validate every setting before the (slower) trace load
    spec = load_cluster(args.cluster) if args.cluster else None
    geometry = spec.geometry() if spec else resolve_model(args.model)
    fmt = spec.cache_format if spec else CacheFormat(args.quant_policy, args.host_kv_format, args.tp,
                                                         args.kernel_block_size)
    calibration = restore_calibration(spec.min_restore_tokens if spec else args.min_restore_tokens, args.calibration)

    t0 = time.perf_counter()
    trace = load_trace(args)
    if steps is not None:
        check_step_model_work(trace, steps)
    warnings = trace_warnings(trace)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    prepared = prepare_trace(trace)
    distinct = distinct_blocks(prepared)
    t_load = time.perf_counter() - t0
    sizing = BlockSizing.build(geometry, fmt, trace.block_size)
    args.trace_warnings = warnings
    args.distinct_blocks = distinct
    from .replay import resolve_min_restore

    if spec is not None:
        spec = dataclasses.replace(spec, min_restore_tokens=resolve_min_restore(spec.min_restore_tokens, sizing,
                                                                                calibration))
    else:
        args.min_restore_tokens = resolve_min_restore(args.min_restore_tokens, sizing, calibration)
    args.min_restore_calibration = calibration

    if spec is not None:
        return _run_cluster(args, spec, geometry, sizing, trace, prepared, t_load, show)

    cost = CostModel.for_model(geometry.params_b, args.prefill_tokens_per_s, args.h2d_gbps)
    decode_rate = args.decode_tokens_per_s or DEFAULT_DECODE_TOKENS_PER_S   # the concurrency replays' assumption
    if steps is not None:
        # a host load's copy time in the step model: its blocks' bytes per rank at the cost model's link rate
        steps = dataclasses.replace(steps, load_block_s=cost.copy_s(sizing.host_block_bytes))
        one = steps.load_steps(1, decode_rate)
        if one > MAX_STEP_MODEL_LOAD_STEPS:
            raise PlanError(f"--h2d-gbps {cost.h2d_gbps:g}: one host block's load would take {one:,} steps of the step "
                            f"model (1 / {decode_rate:g} s each; at most {MAX_STEP_MODEL_LOAD_STEPS:,}, each replayed): raise "
                            "--h2d-gbps or --decode-tokens-per-s, lower --load-delay-steps, or drop --engine-steps")
    in_blocks_gpu = args.gpu_blocks is not None
    in_blocks_host = args.host_blocks is not None
    gpu_blocks = args.gpu_blocks if in_blocks_gpu else sizing.gpu_blocks(args.gpu_kv_gb)
    host_blocks = args.host_blocks if in_blocks_host else sizing.host_blocks(args.host_gb)
    head = {
        "trace": trace.name, "trace_source": trace.source, "block_size": trace.block_size,
        "model": geometry.name, "quant_policy": args.quant_policy, "host_kv_format": args.host_kv_format,
        "tp": args.tp, "kernel_block_size": fmt.kernel_block_size or trace.block_size,
        "host_policy": args.policy, "min_restore_tokens": args.min_restore_tokens,
        "restore_calibration": _calibration_dict(args),
        "gpu_block_bytes": sizing.gpu_block_bytes, "host_block_bytes_per_rank": sizing.host_block_bytes,
        "cost_model": {"prefill_tokens_per_s": cost.prefill_tokens_per_s, "h2d_gbps": cost.h2d_gbps,
                       "prefill_assumed": cost.prefill_assumed, "h2d_assumed": cost.h2d_assumed,
                       "note": "model inputs, not measurements"},
    }
    if args.sweep:
        return _run_sweep(args, trace, prepared, sizing, cost, gpu_blocks, host_blocks, head, t_load, show,
                          geometry)
    from .replay import replay
    from .report import TTFTEstimate, single_run_table

    if gpu_blocks == 0:
        print("warning: the GPU tier holds no block: nothing can be cached", file=sys.stderr)
    st = replay(prepared, gpu_blocks, host_blocks, args.policy, trace.block_size, show,
                min_restore_tokens=args.min_restore_tokens)
    ttft = TTFTEstimate.of(st, sizing, cost)
    conc = conc_lifetimes = None
    if not args.no_concurrency:
        from .concurrency import Lifetimes, replay_concurrent

        conc_lifetimes = Lifetimes(decode_rate, cost.prefill_tokens_per_s)
        if steps is not None:
            from .engine_steps import replay_stepped

            conc = replay_stepped(prepared, gpu_blocks, host_blocks, args.policy, trace.block_size, conc_lifetimes,
                                  steps, show, host_write_s=args.host_write_s,
                                  min_restore_tokens=args.min_restore_tokens)
        else:
            conc = replay_concurrent(prepared, gpu_blocks, host_blocks, args.policy, trace.block_size,
                                     conc_lifetimes, show, host_write_s=args.host_write_s,
                                     min_restore_tokens=args.min_restore_tokens)
    unbounded = unbounded_notes(args.distinct_blocks, gpu_blocks=gpu_blocks, host_blocks=host_blocks)
    if steps is not None:
        unbounded += chunked_prefill_notes(trace, steps) + slow_load_notes(steps, conc_lifetimes.decode_tokens_per_s)
    if args.json:
        out = dict(head)
        out.update(st.as_dict())
        out["distinct_blocks"] = args.distinct_blocks
        out["notes"] = unbounded
        out["warnings"] = args.trace_warnings
        out["gpu_only"] = {"hit_rate": st.gpu_hit_rate, "gpu_hit_rate": st.gpu_hit_rate, "host_hit_rate": 0.0,
                           "recomputed_tokens": st.prompt_tokens - st.gpu_hit_tokens}
        # the configured sizes (whole blocks) and the memory the tiers held at their fullest (the trace may have
        # fewer distinct blocks than a tier holds: memory follows the trace, never the configured size)
        out["gpu_gb_capacity"] = sizing.gpu_gb_for(gpu_blocks)
        out["host_gb_capacity"] = sizing.host_gb_for(host_blocks)
        out["gpu_gb_used"] = sizing.gpu_gb_for(st.gpu_peak_blocks)
        out["host_gb_used"] = sizing.host_gb_for(st.host_peak_blocks)
        out["ttft"] = ttft.as_dict()
        out["load_seconds"] = t_load
        out["replay_seconds"] = st.elapsed_s
        if conc is not None:
            out["with_concurrency"] = {**conc.as_dict(), "lifetimes": conc_lifetimes.as_dict(),
                                       "host_write_s": args.host_write_s,
                                       "engine_steps": steps.as_dict() if steps is not None else None,
                                       "note": "running requests pin their blocks (planner/concurrency.py)"
                                       + ("" if steps is not None else f"; {APPROXIMATE_ADMISSION}")}
        print(json.dumps(out, indent=1, sort_keys=True))
        return 0
    print(f"trace: {trace.name}: {len(trace):,} requests, {trace.total_prompt_tokens:,} prompt tokens, "
          f"{trace.block_size}-token blocks")
    print(f"model: {_describe_model(geometry, sizing)}")
    print(f"host-tier policy: {args.policy}; GPU tier: LRU over leaves (as LMDeploy's BlockTrie); "
          f"{describe_min_restore(args.min_restore_tokens, args.min_restore_calibration)}")
    for note in unbounded:
        print(f"note: {note}")
    print()
    print(single_run_table(st, sizing, ttft))
    print()
    print(f"est. TTFT saving from host hits: {ttft.saving_s:,.1f} s in total, {ttft.mean_saving_ms:.1f} ms per "
          f"request, {ttft.mean_saving_ms_host_hit_requests:.1f} ms per request with host hits "
          f"({st.requests_with_host_hits:,} of {st.requests:,})")
    if conc is not None:
        print(f"with concurrency (running requests pin their blocks; at most {conc.max_running:,} at once, "
              f"{conc.queued_requests:,} waited for room, {conc.queue_delay_s / max(conc.queued_requests, 1):,.1f} s on "
              f"average): hit rate {conc.hit_rate:.3f} (GPU {conc.gpu_hit_rate:.3f}, "
              f"host {conc.host_hit_rate:.3f}) vs {st.hit_rate:.3f} (GPU {st.gpu_hit_rate:.3f}, host "
              f"{st.host_hit_rate:.3f}) one request at a time")
        if steps is None:
            model = f"{conc_lifetimes.describe()}; {APPROXIMATE_ADMISSION}"
        else:
            model = (f"{steps.describe()}; one step = 1 / {conc_lifetimes.decode_tokens_per_s:g} s (the assumed decode "
                     "rate per request); a prefill takes one step (the prefill rate is not used); a host load "
                     f"lands {2 + steps.load_delay_steps} steps after it starts when "
                     "its copy fits in a step, a step later per further step its copy takes")
        print(f"concurrency model: {model}; a host copy is restorable {args.host_write_s:g} s after its eviction")
        if conc.queued_requests and conc.queue_delay_s / conc.queued_requests > 10.0:
            print(f"note: at these assumed rates the GPU tier cannot hold the requests that arrive: "
                  f"{conc.queued_requests:,} of {conc.requests:,} waited, {conc.queue_delay_s / conc.queued_requests:,.0f} s "
                  "on average (the queue grows); the concurrency figures describe a saturated node")
    print(f"cost model: {cost.describe()}")
    if ttft.saving_s < 0:
        print("note: on these rates a host restore is slower than recomputing; the tier would not pay off")
    if st.gpu_overflow_requests:
        print(f"note: {st.gpu_overflow_requests:,} requests were longer than the GPU tier; their tail was "
              f"computed uncached")
    conc_time = f", {conc.elapsed_s:.2f} s with concurrency" if conc is not None else ""
    print(f"replay: {st.requests:,} requests in {st.elapsed_s:.2f} s{conc_time} (+{t_load:.2f} s to read and "
          f"digest the trace), measured on this machine")
    return 0


def check_step_model_work(trace, steps) -> None:
    """Refuse a trace the step model would take ages on: it decides every step, a prompt's prefill takes one
    step per ``max_prefill_tokens`` chunk and a request one step per output token, redone after each
    preemption; a request past these bounds is no real request."""
    from .traces import MAX_PLAUSIBLE_INPUT_TOKENS

    for i, r in enumerate(trace.requests):
        chunks = -(-r.input_length // steps.max_prefill_tokens)
        if r.input_length > MAX_PLAUSIBLE_INPUT_TOKENS or chunks > MAX_STEP_MODEL_CHUNKS:
            raise PlanError(f"--engine-steps: request {i} of {trace.name} has input_length {r.input_length:,}: "
                            f"{chunks:,} prefill chunks of --max-prefill-tokens {steps.max_prefill_tokens:,} (at most "
                            f"{MAX_STEP_MODEL_CHUNKS:,}; and no real prompt is above {MAX_PLAUSIBLE_INPUT_TOKENS:,} "
                            "tokens); the step model would prefill it chunk by chunk: drop --engine-steps, raise "
                            "--max-prefill-tokens or fix the trace")
        if r.output_length > MAX_STEP_MODEL_OUTPUT_TOKENS:
            raise PlanError(f"--engine-steps: request {i} of {trace.name} has output_length {r.output_length:,}, above "
                            f"{MAX_STEP_MODEL_OUTPUT_TOKENS:,}: the step model decodes it a step per token (again after "
                            "each preemption): drop --engine-steps or fix the trace")


def chunked_prefill_notes(trace, steps) -> list[str]:
    """A sentence when some prompts are longer than ``max_prefill_tokens``: LMDeploy prefills the
    uncached part of such a prompt in chunks, through a lane of its own, which the step model follows
    with the lane settings ``steps`` gives (docs/planner.md "Long prompts: chunked prefill")."""
    limit = steps.max_prefill_tokens
    n = sum(r.input_length > limit for r in trace.requests)
    if not n:
        return []
    return [f"step model: {n:,} of {len(trace):,} prompts are longer than max_prefill_tokens ({limit:,}); LMDeploy "
            "prefills the uncached part of such a prompt in chunks, one long prompt at a time, with up to "
            f"{steps.short_turns} short-prompt prefills between two chunks (LMDEPLOY_PT_TTFT_SHORT_TURNS) and the "
            + (f"waiting long prompts in size order, aged one chunk per {steps.long_aging_s:g} s of the trace's clock "
               "(LMDEPLOY_PT_TTFT_AGING_SEC)" if steps.long_policy == "size" else
               "waiting long prompts in arrival order (LMDEPLOY_PT_TTFT_POLICY=fifo)")
            + "; the step model follows these settings (docs/planner.md)"]


def slow_load_notes(steps, steps_per_s: float) -> list[str]:
    """A sentence when one host block's copy takes more than a step at the link rate: every load then lands later
    than two steps, which moves the step model's figures (and it runs through each of those steps)."""
    per_block = steps.load_block_s * steps_per_s
    if per_block <= 1:
        return []
    return [f"step model: one host block's copy takes {per_block:,.4g} steps at the link rate (--h2d-gbps; "
            f"one step = 1 / {steps_per_s:g} s), so every host load lands at least "
            f"{steps.load_steps(1, steps_per_s):,} steps after it starts; the replay runs through those steps"]


def unbounded_notes(distinct: int, *, gpu_blocks: int | None = None, host_blocks: int | None = None,
                    label: str = "") -> list[str]:
    """Sentences for tiers sized at or above every distinct block of the trace: such a tier never
    evicts, so it behaves as an unbounded one (and the replay's memory follows the trace's
    ``distinct`` blocks, never the configured size)."""
    out = []
    for tier, n in (("GPU", gpu_blocks), ("host", host_blocks)):
        if n is not None and n >= distinct:
            out.append(f"{label}{tier} tier: {n:,} blocks configured, at least the trace's {distinct:,} distinct "
                       "blocks: effectively unbounded (it never evicts; a larger size changes nothing)")
    return out


def _sweep_values(args, tier: str, gpu_blocks: int, host_blocks: int, sizing) -> tuple[list[float], bool]:
    in_blocks = (args.host_blocks is not None) if tier == "host" else (args.gpu_blocks is not None)
    if args.sweep_values is not None:
        return sorted(set(args.sweep_values)), in_blocks
    if tier == "host":
        base = host_blocks if in_blocks else args.host_gb
        fr = (0, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1, 2)
    else:
        base = gpu_blocks if in_blocks else args.gpu_kv_gb
        fr = (1 / 8, 1 / 4, 1 / 2, 1, 2, 4)
    vals = sorted({(round(base * f) if in_blocks else round(base * f, 2)) for f in fr})
    return [float(v) for v in vals], in_blocks


def _run_sweep(args, trace, prepared, sizing, cost, gpu_blocks, host_blocks, head, t_load, show, geometry) -> int:
    from .replay import replay
    from .report import TTFTEstimate, pick_recommendation, sweep_table

    tier = args.sweep_tier
    values, in_blocks = _sweep_values(args, tier, gpu_blocks, host_blocks, sizing)
    points = []
    t0 = time.perf_counter()
    for v in values:
        if tier == "host":
            hb = int(v) if in_blocks else sizing.host_blocks(v)
            gb = gpu_blocks
        else:
            gb = int(v) if in_blocks else sizing.gpu_blocks(v)
            hb = host_blocks
        st = replay(prepared, gb, hb, args.policy, trace.block_size, show, desc=f"{tier}={v:g}",
                    min_restore_tokens=args.min_restore_tokens)
        points.append((v, st, TTFTEstimate.of(st, sizing, cost)))
    elapsed = time.perf_counter() - t0
    unit = "blocks" if in_blocks else "GiB"
    values_swept = [p[0] for p in points]
    # a GPU size with requests longer than the GPU tier is not recommended: LMDeploy would refuse those requests,
    # and the replay, which computes their tails uncached, keeps them out of both tiers (other hits can rise, so
    # the curve can fall as the GPU grows). A host sweep has the same fixed GPU tier at every point: noted only.
    overflowing = [v for v, st, _ in points if st.gpu_overflow_requests] if tier == "gpu" else []
    eligible = [(v, st.hit_rate) for v, st, _ in points if not (tier == "gpu" and st.gpu_overflow_requests)]
    rec = pick_recommendation(*zip(*eligible)) if eligible else None
    saturated = rec is not None and (len(points) < 2 or rec < max(values_swept))
    sizes = [(hb if tier == "host" else gb) for hb, gb in
             (((int(v) if in_blocks else sizing.host_blocks(v)), (int(v) if in_blocks else sizing.gpu_blocks(v)))
              for v in values_swept)]
    unbounded_from = next((v for v, n in zip(values_swept, sizes) if n >= args.distinct_blocks), None)
    title = (f"{trace.name}: {geometry.name}, other tier fixed "
             f"({'GPU' if tier == 'host' else 'host'} {fmt_fixed(tier, gpu_blocks, host_blocks)} blocks)")
    if args.json:  # the object is printed before the plot is tried: a failed plot loses nothing
        out = dict(head)
        best = max(points, key=lambda p: p[1].hit_rate)[1]
        out.update(best.as_dict())
        out["summary_point"] = "the sweep point with the best hit rate (all points under 'sweep')"
        out["sweep_tier"] = tier
        out["sweep_unit"] = unit
        out["sweep"] = [{"value": v, **st.as_dict(), "ttft": t.as_dict()} for v, st, t in points]
        out["recommended"] = {"tier": tier, "value": rec if saturated else None, "unit": unit, "saturated": saturated,
                              "largest_swept": max(values_swept), "not_recommendable": overflowing,
                              "rule": "smallest swept size within 0.01 of the best hit rate of the points with no "
                                      "request longer than the GPU tier (not_recommendable: LMDeploy would refuse "
                                      "those requests); none when that is the largest size swept (the curve has not "
                                      "flattened) or no point qualifies"}
        out["distinct_blocks"] = args.distinct_blocks
        out["unbounded_from"] = unbounded_from
        out["warnings"] = args.trace_warnings
        out["plot"] = os.path.abspath(args.plot)
        out["load_seconds"] = t_load
        out["replay_seconds"] = elapsed
        print(json.dumps(out, indent=1, sort_keys=True))
        sys.stdout.flush()
        return _write_plot(args.plot, values_swept, [p[1] for p in points], f"{tier} tier ({unit})", title)
    print(f"trace: {trace.name}: {len(trace):,} requests, {trace.block_size}-token blocks")
    print(f"model: {_describe_model(geometry, sizing)}")
    other = "GPU" if tier == "host" else "host"
    print(f"sweeping the {tier} tier; {other} tier fixed at {fmt_fixed(tier, gpu_blocks, host_blocks)} blocks; "
          f"host policy {args.policy}")
    print()
    print(sweep_table(points, tier, unit))
    print()
    if overflowing:
        print(f"note: at {', '.join(f'{v:g}' for v in overflowing)} {unit} some requests are longer than the GPU tier "
              "(column 'longer than GPU'): LMDeploy would refuse them; the replay computes their tails uncached and "
              "caches none of them, which can raise the other requests' hit rate there, so those points are not "
              "recommended")
    longest = max(st.gpu_overflow_requests for _, st, _ in points) if tier == "host" else 0
    if longest:
        print(f"note: {longest:,} requests are longer than the fixed GPU tier: LMDeploy would refuse them; the replay "
              "computes their tails uncached and caches none of them, which can raise the other requests' host "
              "hits: give the GPU tier more blocks for a curve the engine would show")
    if saturated:
        print(f"recommended {tier} size: {rec:g} {unit} (smallest swept size within 0.01 of the best hit rate"
              + (" of the points with no request longer than the GPU tier)" if overflowing else ")"))
    elif rec is None:
        print(f"recommended {tier} size: none: every swept point has requests longer than the GPU tier; give the "
              "GPU tier more blocks")
    elif len(eligible) < 2 and len(points) > 1:
        print(f"recommended {tier} size: none: only the largest size swept ({rec:g} {unit}) has no request longer "
              "than the GPU tier, so there is nothing to compare it with; sweep larger sizes (--sweep-values)")
    else:
        print(f"recommended {tier} size: none: not saturated: the hit rate still grows at the largest size swept "
              f"({max(values_swept):g} {unit}, more than 0.01 above every smaller point"
              + (" it could recommend" if overflowing else "") + "); sweep larger sizes (--sweep-values)")
    if unbounded_from is not None:
        print(f"note: from {unbounded_from:g} {unit} on the {tier} tier holds all {args.distinct_blocks:,} distinct "
              "blocks of the trace: effectively unbounded, larger sizes change nothing")
    print(f"cost model: {cost.describe()}")
    print(f"replay: {len(points)} points x {len(trace):,} requests in {elapsed:.2f} s, measured on this machine")
    sys.stdout.flush()
    rc = _write_plot(args.plot, values_swept, [p[1] for p in points], f"{tier} tier ({unit})", title)
    if rc == 0:
        print(f"plot: {os.path.abspath(args.plot)}")
    return rc


def _write_plot(path, xs, stats, xlabel, title) -> int:
    """Write the sweep PNG after the results are printed; a failure is one line on stderr, exit 2."""
    from .report import plot_sweep

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("error: the sweep plot needs matplotlib, which is not installed: pip install "
              "'lmdeploy-hostcache[plot]' (or matplotlib); the results above are complete", file=sys.stderr)
        return 2
    try:
        plot_sweep(path, xs, stats, xlabel, title)
    except (OSError, ValueError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        print(f"error: --plot {path}: cannot write the plot ({why}); the results above are complete",
              file=sys.stderr)
        return 2
    return 0


def fmt_fixed(tier: str, gpu_blocks: int, host_blocks: int) -> str:
    return f"{gpu_blocks:,}" if tier == "host" else f"{host_blocks:,}"


def _run_cluster(args, spec, geometry, sizing, trace, prepared, t_load, show) -> int:
    from .cluster import recommend_host_gb
    from .cost import CostModel
    from .report import TTFTEstimate, fmt_int, render_table

    cost = CostModel.for_model(geometry.params_b, args.prefill_tokens_per_s, args.h2d_gbps)
    res = recommend_host_gb(prepared, spec, sizing, show_progress=show)
    tot = res.totals()
    prefill_total = sum(n.stats.recomputed_tokens for n in res.nodes) or 1  # load: who computes the prefill

    def prefill_share(n) -> float:
        return n.stats.recomputed_tokens / prefill_total

    def saturated(n) -> bool:  # False: the node's full host_gb is the only size within 0.01 of itself
        return not (n.spec.host_gb > 0 and n.recommended_host_gb is not None
                    and n.recommended_host_gb >= n.spec.host_gb)

    notes = [note for n in res.nodes
             for note in unbounded_notes(args.distinct_blocks, gpu_blocks=n.gpu_blocks, host_blocks=n.host_blocks,
                                         label=f"node {n.spec.name}: ")]
    l3_res = None
    if args.l3_gb is not None:
        from .l3 import DEFAULT_L3_GBPS, simulate_cluster_l3

        l3_res = simulate_cluster_l3(prepared, spec, sizing, args.l3_gb, args.l3_gbps or DEFAULT_L3_GBPS, cost, show)
    if args.json:
        out = {"trace": trace.name, "block_size": trace.block_size, "model": geometry.name,
               "routing": spec.routing, "quant_policy": spec.quant_policy, "host_kv_format": spec.host_kv_format,
               "tp": spec.tp, "kernel_block_size": spec.kernel_block_size or trace.block_size,
               "host_policy": spec.host_policy, "min_restore_tokens": spec.min_restore_tokens,
               "restore_calibration": _calibration_dict(args), **tot,
               "restored_tokens": tot["host_hit_blocks"] * trace.block_size,
               "nodes": [], "replay_seconds": res.elapsed_s, "load_seconds": t_load,
               "recommendation_rule": "smallest of 0, 1/8, 1/4, 1/2, 3/4, 1 x host_gb within 0.01 of the node's "
                                      "hit rate at its full host_gb"}
        for n in res.nodes:
            out["nodes"].append({"name": n.spec.name, "gpu_kv_gb": n.spec.gpu_kv_gb, "host_gb": n.spec.host_gb,
                                 "gpu_blocks": n.gpu_blocks, "host_blocks": n.host_blocks,
                                 **n.stats.as_dict(), "ttft": TTFTEstimate.of(n.stats, sizing, cost).as_dict(),
                                 "recommended_host_cache_gb": n.recommended_host_gb if saturated(n) else None,
                                 "saturated": saturated(n),
                                 "prefill_tokens_share": prefill_share(n),
                                 "hit_rate_by_host_gb": {str(k): v for k, v in n.hit_rate_by_host_gb.items()}})
        out["distinct_blocks"] = args.distinct_blocks
        out["notes"] = notes
        out["warnings"] = args.trace_warnings
        if l3_res is not None:
            out["l3"] = l3_res.as_dict()
        print(json.dumps(out, indent=1, sort_keys=True))
        return 0
    print(f"trace: {trace.name}: {len(trace):,} requests, {trace.block_size}-token blocks")
    print(f"cluster: {args.cluster}: {len(spec.nodes)} nodes, routing {spec.routing}, host policy {spec.host_policy}, "
          f"{describe_min_restore(spec.min_restore_tokens, args.min_restore_calibration)}")
    print(f"model: {_describe_model(geometry, sizing)}")
    print()
    rows = []
    for n in res.nodes:
        st = n.stats
        ttft = TTFTEstimate.of(st, sizing, cost)
        rows.append([n.spec.name, f"{n.spec.gpu_kv_gb:g}", f"{n.spec.host_gb:g}", fmt_int(st.requests),
                     f"{st.gpu_hit_rate:.3f}", f"{st.hit_rate:.3f}", f"{st.host_hit_rate:.3f}",
                     f"{prefill_share(n):.3f}", f"{ttft.mean_saving_ms:.1f}",
                     f"{n.recommended_host_gb:g}" if saturated(n) else "not saturated"])
    rows.append(["cluster", f"{sum(n.spec.gpu_kv_gb for n in res.nodes):g}",
                 f"{sum(n.spec.host_gb for n in res.nodes):g}", fmt_int(tot["requests"]),
                 f"{tot['gpu_hit_rate']:.3f}", f"{tot['hit_rate']:.3f}", f"{tot['host_hit_rate']:.3f}", "1.000", "",
                 f"{sum(n.recommended_host_gb for n in res.nodes):g}" if all(saturated(n) for n in res.nodes)
                 else ""])
    print(render_table(rows, ["node", "GPU KV GiB", "host GiB", "requests", "GPU-only hit", "GPU+host hit",
                              "host hit", "prefill share", "est. TTFT saving ms/req", "recommended host_cache_gb"]))
    print()
    print("recommended host_cache_gb: smallest of 0, 1/8, 1/4, 1/2, 3/4, 1 x host_gb whose hit rate on that node "
          "is within 0.01 of its hit rate at the full host_gb; \"not saturated\": only the full host_gb is, so the "
          "hit rate still grows there: try a larger host_gb")
    for note in notes:
        print(f"note: {note}")
    if l3_res is not None:
        from .l3 import describe_l3

        print()
        print("\n".join(describe_l3(l3_res, tot["hit_rate"])))
    print(f"cost model: {cost.describe()}")
    print(f"replay: {len(res.nodes)} nodes x 6 host sizes over {len(trace):,} requests in {res.elapsed_s:.2f} s, "
          f"measured on this machine")
    return 0
