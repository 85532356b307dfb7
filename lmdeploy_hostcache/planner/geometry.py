"""KV-cache geometry: bytes per block on the GPU and on the host, and GB -> block counts.

The formula mirrors LMDeploy 0.18's packed cache plan (``pytorch/engine/cache_engine/schema.py``
and ``layout.py``), without importing it (the planner is LMDeploy-free; a test cross-checks the
numbers against LMDeploy's own plan on the 'meta' device):

* one kernel page holds ``kernel_block_size`` tokens (LMDeploy's default: the block size);
* per layer and page the pool stores ``k_cache``, ``v_cache`` and, for quant_policy 4/8, the
  ``quant_0``/``quant_1`` scale+zero tensors, each rounded up to 256 bytes;
* ``quant_policy`` 0: K and V in the model dtype; 8: one uint8 per element; 4: two elements per
  byte (``head_dim/2`` bytes); scales and zeros are two model-dtype values per token per head,
  for K and for V;
* with tensor parallelism each rank holds ``kv_heads / tp`` heads of every block, or one head when
  ``tp`` is a multiple of ``kv_heads`` (LMDeploy replicates the heads; each replica holds its copy).

Units: ``GB`` means GiB (2**30 bytes) everywhere in the planner, as LMDeploy's own sizing does.
Host slots are per TP rank (every rank holds the same slots), so a node's host budget buys
``host_gb * 2**30 // (tp * host_block_bytes_per_rank)`` blocks.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

GIB = 1 << 30
ALIGNMENT = 256
QUANT_POLICIES = (0, 4, 8)
HOST_KV_FORMATS = ("same", "int8", "int4")
_DTYPE_BYTES = {"float16": 2, "fp16": 2, "half": 2, "bfloat16": 2, "bf16": 2, "float32": 4, "fp32": 4,
                "float": 4}


def _round_up(x: int, a: int = ALIGNMENT) -> int:
    return -(-x // a) * a


@dataclass(frozen=True)
class KVGeometry:
    """What sets a model's KV bytes per token.  ``params`` (billions) only scales the assumed
    prefill rate of the cost model; it does not enter any byte count."""

    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"
    params_b: float | None = None
    v_head_dim: int | None = None

    def __post_init__(self) -> None:
        for f in ("num_layers", "num_kv_heads", "head_dim"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"model geometry {self.name!r}: {f} must be a positive int, got {v!r}")
        if self.v_head_dim is not None and (not isinstance(self.v_head_dim, int) or self.v_head_dim <= 0):
            raise ValueError(f"model geometry {self.name!r}: v_head_dim must be a positive int")
        if self.dtype not in _DTYPE_BYTES:
            raise ValueError(f"model geometry {self.name!r}: dtype {self.dtype!r} is not one of "
                             f"{sorted(_DTYPE_BYTES)}")

    @property
    def dtype_bytes(self) -> int:
        return _DTYPE_BYTES[self.dtype]

    @property
    def dtype_label(self) -> str:
        return {2: "bf16" if "b" in self.dtype else "fp16", 4: "fp32"}[self.dtype_bytes]

    def heads_per_rank(self, tp: int) -> int:
        """KV heads each TP rank holds, by LMDeploy's rule (``update_num_kv_heads``): ``kv_heads / tp``
        when ``tp`` divides ``kv_heads``; one when ``tp`` is a multiple of ``kv_heads`` (every head is
        replicated on ``tp / kv_heads`` ranks, each rank holding its copy); anything else is refused."""
        if tp > self.num_kv_heads:
            if tp % self.num_kv_heads:
                raise ValueError(f"tp={tp} is neither a divisor nor a multiple of num_kv_heads={self.num_kv_heads} "
                                 f"of {self.name}")
            return 1
        if self.num_kv_heads % tp:
            raise ValueError(f"tp={tp} does not divide num_kv_heads={self.num_kv_heads} of {self.name}")
        return self.num_kv_heads // tp

    def block_bytes(self, block_size: int, quant_policy: int = 0, tp: int = 1,
                    kernel_block_size: int | None = None) -> int:
        """Bytes of one scheduler block of ``block_size`` tokens on one TP rank, as LMDeploy's
        packed pool lays it out for ``quant_policy`` (0, 4 or 8)."""
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if quant_policy not in QUANT_POLICIES:
            raise ValueError(f"quant_policy must be one of {QUANT_POLICIES}, got {quant_policy!r}")
        if isinstance(tp, bool) or not isinstance(tp, int) or tp <= 0:
            raise ValueError(f"tp must be a positive int, got {tp!r}")
        heads = self.heads_per_rank(tp)
        page = block_size if kernel_block_size is None else kernel_block_size
        if page <= 0 or block_size % page:
            raise ValueError(f"kernel_block_size {page} must divide block_size {block_size}")
        kd, vd = self.head_dim, self.v_head_dim or self.head_dim
        es = self.dtype_bytes
        if quant_policy == 0:
            specs = [page * heads * kd * es, page * heads * vd * es]
        else:
            if quant_policy == 4:
                if kd % 2 or vd % 2:
                    raise ValueError(f"quant_policy 4 needs an even head_dim ({self.name}: {kd}/{vd})")
                kd, vd = kd // 2, vd // 2
            specs = [page * heads * kd, page * heads * vd,           # uint8 K / V
                     page * heads * 2 * es, page * heads * 2 * es]   # scale+zero for K, for V
        per_page = sum(_round_up(s) for s in specs)
        return self.num_layers * (block_size // page) * per_page

    def token_bytes(self, quant_policy: int = 0, tp: int = 1) -> float:
        """Average bytes per token per rank (block size 64, LMDeploy's default)."""
        return self.block_bytes(64, quant_policy, tp) / 64


@dataclass(frozen=True)
class CacheFormat:
    """GPU cache format plus the host tier's storage format.

    ``host_kv_format``: ``same`` stores the GPU bytes as they are; ``int8``/``int4`` quantize an
    fp16/bf16 cache on offload (LMDeploy's asymmetric per-token-per-head scheme), so a host block
    costs what an int8/int4 GPU block costs.  They are refused for already-quantized caches.
    """

    quant_policy: int = 0
    host_kv_format: str = "same"
    tp: int = 1
    # LMDeploy's --kernel-block-size: tokens per kernel page (None: the block size, LMDeploy's default)
    kernel_block_size: int | None = None

    def __post_init__(self) -> None:
        kbs = self.kernel_block_size
        if kbs is not None and (isinstance(kbs, bool) or not isinstance(kbs, int) or kbs < 16 or kbs & (kbs - 1)):
            raise ValueError(f"kernel_block_size must be a power of 2 >= 16 (LMDeploy's rule), got {kbs!r}")
        if self.quant_policy not in QUANT_POLICIES:
            raise ValueError(f"quant_policy must be one of {QUANT_POLICIES}, got {self.quant_policy!r}")
        if self.host_kv_format not in HOST_KV_FORMATS:
            raise ValueError(f"host_kv_format must be one of {HOST_KV_FORMATS}, got {self.host_kv_format!r}")
        if self.host_kv_format != "same" and self.quant_policy != 0:
            raise ValueError(f"host_kv_format={self.host_kv_format} applies to fp16/bf16 caches only "
                             f"(quant_policy 0), got quant_policy={self.quant_policy}; use 'same'")
        if isinstance(self.tp, bool) or not isinstance(self.tp, int) or self.tp <= 0:
            raise ValueError(f"tp must be a positive int, got {self.tp!r}")

    @property
    def host_quant_policy(self) -> int:
        return {"same": self.quant_policy, "int8": 8, "int4": 4}[self.host_kv_format]


@dataclass(frozen=True)
class BlockSizing:
    """Per-rank bytes of one block in each tier and the conversions GB <-> blocks."""

    geometry: KVGeometry
    cache_format: CacheFormat
    block_size: int
    gpu_block_bytes: int
    host_block_bytes: int

    @classmethod
    def build(cls, geometry: KVGeometry, cache_format: CacheFormat, block_size: int) -> "BlockSizing":
        return cls(geometry, cache_format, block_size,
                   geometry.block_bytes(block_size, cache_format.quant_policy, cache_format.tp,
                                        cache_format.kernel_block_size),
                   geometry.block_bytes(block_size, cache_format.host_quant_policy, cache_format.tp,
                                        cache_format.kernel_block_size))

    def gpu_blocks(self, gpu_kv_gb: float) -> int:
        """Blocks that ``gpu_kv_gb`` GiB of KV memory on each GPU holds."""
        _check_gb("gpu_kv_gb", gpu_kv_gb)
        return int(gpu_kv_gb * GIB) // self.gpu_block_bytes

    def host_blocks(self, host_gb: float) -> int:
        """Host slots that ``host_gb`` GiB of node RAM holds (every TP rank keeps its shard)."""
        _check_gb("host_gb", host_gb)
        return int(host_gb * GIB) // (self.host_block_bytes * self.cache_format.tp)

    def host_gb_for(self, blocks: int) -> float:
        """GiB of node RAM that ``blocks`` host slots take."""
        return blocks * self.host_block_bytes * self.cache_format.tp / GIB

    def gpu_gb_for(self, blocks: int) -> float:
        return blocks * self.gpu_block_bytes / GIB


# Planner sizes: "effectively unbounded" capacities (1e9 GiB) are fine, memory follows the trace; past 1e12 GiB
# a size is a typo (and near 1e300 it has no integer byte count)
MAX_GIB = 1e12


def _check_gb(name: str, v: float) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= MAX_GIB:
        raise ValueError(f"{name} must be a number of GiB in [0, {MAX_GIB:g}], got {v!r}")


# Geometry from the models' published config.json files (num_hidden_layers, num_key_value_heads,
# hidden_size / num_attention_heads, torch_dtype); params in billions from their model cards.
PRESETS: dict[str, KVGeometry] = {
    "Llama-3-8B": KVGeometry("Llama-3-8B", num_layers=32, num_kv_heads=8, head_dim=128,
                             dtype="bfloat16", params_b=8.0),
    "Qwen2.5-7B": KVGeometry("Qwen2.5-7B", num_layers=28, num_kv_heads=4, head_dim=128,
                             dtype="bfloat16", params_b=7.6),
    "Llama-3-70B": KVGeometry("Llama-3-70B", num_layers=80, num_kv_heads=8, head_dim=128,
                              dtype="bfloat16", params_b=70.6),
}
PRESET_ALIASES = {k.lower(): k for k in PRESETS}
PRESET_ALIASES.update({"llama-3.1-8b": "Llama-3-8B", "llama-3.1-70b": "Llama-3-70B",
                       "qwen2.5-7b-instruct": "Qwen2.5-7B"})


def geometry_from_hf_config(path: str | os.PathLike) -> KVGeometry:
    """Geometry from a Hugging Face ``config.json`` (or a folder holding one).

    Reads ``num_hidden_layers``, ``num_key_value_heads`` (default: ``num_attention_heads``),
    ``head_dim`` (default ``hidden_size / num_attention_heads``) and ``torch_dtype``/``dtype``;
    a multimodal config's ``text_config`` is used when present.  MLA models are refused: their
    latent cache does not follow the per-head formula."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    from ..yamlio import NotARegularFile, read_regular_file

    try:
        raw = read_regular_file(p, 16 * 2**20 + 1)    # a model's config.json is a few KiB; a FIFO is not waited on
        if len(raw) > 16 * 2**20:
            raise ValueError(f"model config {p} is larger than 16 MiB: not a config.json")
        cfg = json.loads(raw.decode("utf-8"), parse_int=_config_int)
    except FileNotFoundError:
        raise ValueError(f"model config {p} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"model config {p} is not JSON ({exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"model config {p} is not UTF-8 text (byte {exc.start})") from None
    except RecursionError:
        raise ValueError(f"model config {p} is JSON nested too deeply") from None
    except NotARegularFile as exc:
        raise ValueError(f"model config {p} {exc}") from None
    except OSError as exc:
        raise ValueError(f"model config {p} cannot be read ({exc.strerror or exc})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"model config {p}: expected a JSON object")
    if isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg, **cfg["text_config"]}
    if cfg.get("kv_lora_rank"):
        raise ValueError(f"model config {p}: MLA models (kv_lora_rank) are not supported by the planner")

    def need(key: str) -> int:
        v = cfg.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= MAX_CONFIG_INT:
            raise ValueError(f"model config {p}: field {key!r} must be a positive int <= {MAX_CONFIG_INT} "
                             f"(no model is larger), got {repr(v)[:80]}")
        return v

    layers = need("num_hidden_layers")
    heads = need("num_attention_heads")
    kv_heads = need("num_key_value_heads") if "num_key_value_heads" in cfg else heads
    if cfg.get("head_dim"):
        head_dim = need("head_dim")
    else:
        hidden = need("hidden_size")
        if hidden % heads:
            raise ValueError(f"model config {p}: hidden_size {hidden} is not a multiple of "
                             f"num_attention_heads {heads}; set head_dim")
        head_dim = hidden // heads
    dtype = _engine_dtype(cfg, p)
    name = cfg.get("_name_or_path") or p.parent.name or str(p)
    return KVGeometry(str(name), layers, kv_heads, head_dim, dtype)


MAX_CONFIG_INT = 1 << 20   # layers, heads, head_dim, hidden_size: real models stay far below this


class _LongInt:
    """A JSON integer too long to convert (Python refuses > 4300 digits), kept so that the field is named."""

    def __init__(self, digits: int):
        self.digits = digits

    def __repr__(self) -> str:
        return f"an int of {self.digits} digits"


def _config_int(text: str):
    return int(text) if len(text) <= 100 else _LongInt(len(text.lstrip("-")))


def _engine_dtype(cfg: dict, p) -> str:
    """The KV dtype LMDeploy's PyTorch engine runs this config in with ``--dtype auto`` (its
    ``_update_torch_dtype``): ``dtype``, else the text config's ``dtype``, else ``torch_dtype``;
    AWQ checkpoints and any dtype but float16/bfloat16 (float32 included) run in float16, and so
    does a config that names none."""
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    raw = cfg.get("dtype") or text.get("dtype") or cfg.get("torch_dtype")
    quant = cfg.get("quantization_config") if isinstance(cfg.get("quantization_config"), dict) else {}
    if raw is None or quant.get("quant_method") == "awq":
        return "float16"
    dtype = str(raw).replace("torch.", "")
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"model config {p}: field 'torch_dtype' {dtype!r} is not one of {sorted(_DTYPE_BYTES)}")
    if dtype in ("bfloat16", "bf16"):
        return "bfloat16"
    return "float16"


def resolve_model(spec: str) -> KVGeometry:
    """A preset name (case-insensitive) or a path to a config.json / model folder."""
    key = PRESET_ALIASES.get(spec.lower())
    if key is not None:
        return PRESETS[key]
    if os.path.exists(spec):
        return geometry_from_hf_config(spec)
    raise ValueError(f"model {spec!r} is neither a preset ({', '.join(PRESETS)}) nor an existing "
                     f"config.json path")
