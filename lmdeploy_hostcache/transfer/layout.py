"""Geometry of LMDeploy's connector rows and of the host slot formats.

LMDeploy hands a KV connector ``connector_kv_caches``: one contiguous tensor per
cache-pool row (one row per layer for the packed K/V pool), shaped
``[num_kernel_pages, ...]``.  One scheduler block ``b`` is the byte run
``row[b*ppb:(b+1)*ppb]`` (``ppb`` = kernel pages per scheduler block) of every row.

Invariants of this module:

* a host slot holds one scheduler block across all rows, contiguous, rows in
  registration order (``row_offsets``); inside a row's segment the ``ppb`` page
  records follow each other;
* ``same`` format: the row segment is the row's block bytes, verbatim;
* ``int8``/``int4`` formats: a page record of a compressible row is laid out
  exactly as LMDeploy lays out one page under ``quant_policy`` 8/4 (k codes,
  v codes, ``quant_0``, ``quant_1``, then every other field raw, each rounded up
  to its alignment); rows that are not compressible are copied raw;
* every padding byte of a slot is written as zero, so a slot's bytes are a pure
  function of the block's bytes.

Nothing here imports LMDeploy: tensor specs are read by duck typing
(``spec.name``, ``spec.desc.shape``, ``spec.desc.dtype``, ``spec.desc.size``,
``spec.desc.aligned_size``).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

HOST_KV_FORMATS = ("same", "int8", "int4")
FLOAT_KV_DTYPES = (torch.float16, torch.bfloat16)
LMDEPLOY_PACKED_POOL_PREFIX = "cache_pool.0.row."


def _round_up(x: int, alignment: int) -> int:
    return (x + alignment - 1) // alignment * alignment


@dataclass(frozen=True)
class TensorSpec:
    """One typed field of a page: what LMDeploy's ``CacheTensorSpec`` describes."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    alignment: int = 256

    @property
    def size(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def aligned_size(self) -> int:
        return _round_up(self.size, self.alignment)


@dataclass(frozen=True)
class PageField:
    """A typed byte range inside one page record (offset and size in bytes)."""

    name: str
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    size: int
    aligned_size: int


@dataclass(frozen=True)
class RowGeometry:
    """One connector row: ``num_pages`` pages of ``page_bytes`` bytes."""

    name: str
    num_pages: int
    page_bytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Segment:
    """A raw byte run moved per block between a row and a slot.

    ``count`` pieces of ``length`` bytes; piece ``k`` starts at
    ``row_offset + k*row_stride`` inside the block's run of the row and at
    ``slot_offset + k*slot_stride`` inside the slot.  ``zero``: the slot side is
    padding, written as zeros on gather and ignored on scatter.
    """

    row: int
    row_offset: int
    slot_offset: int
    count: int
    length: int
    row_stride: int
    slot_stride: int
    zero: bool = False


@dataclass(frozen=True)
class QuantField:
    """An fp16/bf16 field ``[rows_per_page, head_dim]`` stored as LMDeploy int codes.

    Offsets: ``src_offset`` inside the row's page, ``codes_offset`` and
    ``scale_zero_offset`` inside the slot (row segment start included) for page 0;
    page ``p`` adds ``p*page_bytes`` on the row side and ``p*record_bytes`` on the slot side.
    """

    row: int
    name: str
    src_offset: int
    codes_offset: int
    scale_zero_offset: int
    rows_per_page: int
    head_dim: int
    page_bytes: int
    record_bytes: int


@dataclass(frozen=True)
class HostFormat:
    """How one block is laid out in a host slot for one ``host_kv_format``."""

    name: str
    bits: int  # 0 for "same", else 8 or 4
    slot_bytes: int
    row_offsets: tuple[int, ...]
    record_bytes: tuple[int, ...]  # host page-record size per row
    segments: tuple[Segment, ...]
    quant_fields: tuple[QuantField, ...]
    scale_dtype: torch.dtype | None
    record_fields: tuple[tuple[PageField, ...], ...]  # per row, host page record fields (empty: raw row)

    @property
    def lossy(self) -> bool:
        return self.bits != 0


def _spec_to_field_args(spec) -> tuple[str, tuple[int, ...], torch.dtype, int, int]:
    if isinstance(spec, TensorSpec):
        return spec.name, tuple(spec.shape), spec.dtype, spec.size, spec.aligned_size
    desc = getattr(spec, "desc", None)
    if desc is None:
        raise TypeError(f"tensor spec {spec!r} has neither TensorSpec fields nor a .desc")
    return spec.name, tuple(int(d) for d in desc.shape), desc.dtype, int(desc.size), int(desc.aligned_size)


def _packed_specs(specs: Sequence) -> list:
    """The leading run of specs LMDeploy packs into one pool (its first layout group)."""
    out = []
    for spec in specs:
        if getattr(spec, "per_row_contiguous", False) or getattr(spec, "consumer_rows", None) is not None:
            break
        out.append(spec)
    return out


def page_fields_from_specs(specs: Sequence) -> tuple[PageField, ...]:
    """Typed fields of one packed page, at LMDeploy's offsets (each field aligned)."""
    fields, offset = [], 0
    for spec in _packed_specs(specs):
        name, shape, dtype, size, aligned = _spec_to_field_args(spec)
        fields.append(PageField(name, offset, shape, dtype, size, aligned))
        offset += aligned
    return tuple(fields)


class KVRowLayout:
    """Validated geometry of the connector rows plus optional typed page fields.

    Build with :meth:`from_connector_caches`.  ``num_blocks`` scheduler blocks of
    ``pages_per_block`` pages each; block ids are physical GPU block ids.
    """

    def __init__(self, rows: Sequence[RowGeometry], pages_per_block: int,
                 row_fields: Mapping[int, tuple[PageField, ...]] | None = None,
                 device: torch.device | None = None):
        if isinstance(pages_per_block, bool) or not isinstance(pages_per_block, int) or pages_per_block <= 0:
            raise ValueError(f"pages_per_block must be a positive int, got {pages_per_block!r}")
        if not rows:
            raise ValueError("kv_caches is empty: nothing to move")
        num_pages = rows[0].num_pages
        for row in rows:
            if row.num_pages != num_pages:
                raise ValueError(f"row {row.name!r} has {row.num_pages} pages, row {rows[0].name!r} has "
                                 f"{num_pages}: every row must cover the same pages")
        if num_pages % pages_per_block:
            raise ValueError(f"num_kernel_pages {num_pages} is not a multiple of pages_per_block {pages_per_block}")
        self.rows = tuple(rows)
        self.pages_per_block = pages_per_block
        self.num_pages = num_pages
        self.num_blocks = num_pages // pages_per_block
        self.row_fields = dict(row_fields or {})
        self.device = device
        self._formats: dict[str, HostFormat] = {}

    # construction -----------------------------------------------------------------
    @classmethod
    def from_connector_caches(cls, kv_caches: Mapping[str, torch.Tensor], pages_per_block: int,
                              tensor_specs=None) -> "KVRowLayout":
        """Validate ``kv_caches`` (name -> contiguous ``[num_kernel_pages, ...]`` tensor).

        ``tensor_specs``: optional typed page fields for host compression, either a
        sequence of LMDeploy ``CacheTensorSpec`` (or :class:`TensorSpec`), applied to
        the rows named ``cache_pool.0.row.*`` (LMDeploy's packed K/V pool), or a
        mapping ``row-name prefix -> specs``.  Raises ``ValueError`` naming the bad row.
        """
        if not isinstance(kv_caches, Mapping):
            raise TypeError(f"kv_caches must be a mapping name -> tensor, got {type(kv_caches).__name__}")
        rows, device = [], None
        for name, t in kv_caches.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"kv_caches[{name!r}] is {type(t).__name__}, not a torch.Tensor")
            if t.dim() < 1 or t.shape[0] == 0:
                raise ValueError(f"kv_caches[{name!r}] has shape {tuple(t.shape)}: need [num_kernel_pages, ...]")
            if not t.is_contiguous():
                raise ValueError(f"kv_caches[{name!r}] is not contiguous (stride {t.stride()})")
            if device is None:
                device = t.device
            elif t.device != device:
                raise ValueError(f"kv_caches[{name!r}] is on {t.device}, other rows on {device}")
            nbytes = t.numel() * t.element_size()
            rows.append(RowGeometry(str(name), int(t.shape[0]), nbytes // int(t.shape[0]), t.dtype, tuple(t.shape)))
        row_fields: dict[int, tuple[PageField, ...]] = {}
        if tensor_specs is not None:
            by_prefix = tensor_specs if isinstance(tensor_specs, Mapping) else {LMDEPLOY_PACKED_POOL_PREFIX: tensor_specs}
            for prefix, specs in by_prefix.items():
                fields = page_fields_from_specs(specs)
                total = sum(f.aligned_size for f in fields)
                matched = [i for i, r in enumerate(rows) if r.name.startswith(prefix)]
                if not matched:
                    raise ValueError(f"tensor_specs for prefix {prefix!r} match no row of kv_caches "
                                     f"({[r.name for r in rows][:4]}...)")
                for i in matched:
                    if rows[i].page_bytes != total:
                        raise ValueError(f"row {rows[i].name!r} has {rows[i].page_bytes} bytes per page but "
                                         f"tensor_specs for {prefix!r} sum to {total} bytes")
                    row_fields[i] = fields
        return cls(rows, pages_per_block, row_fields, device)

    # queries ----------------------------------------------------------------------
    @property
    def row_names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.rows)

    @property
    def block_bytes(self) -> int:
        """Raw bytes of one scheduler block across all rows (= ``slot_bytes('same')``)."""
        return sum(r.page_bytes for r in self.rows) * self.pages_per_block

    def slot_bytes(self, host_kv_format: str = "same") -> int:
        return self.host_format(host_kv_format).slot_bytes

    def compression_error(self, host_kv_format: str) -> str | None:
        """Why ``host_kv_format`` cannot be used with these rows, or None."""
        if host_kv_format == "same":
            return None
        if host_kv_format not in HOST_KV_FORMATS:
            return f"host_kv_format must be one of {HOST_KV_FORMATS}, got {host_kv_format!r}"
        if not self.row_fields:
            return (f"host_kv_format={host_kv_format!r} needs tensor_specs (typed k_cache/v_cache byte "
                    f"ranges); none were given")
        for i, fields in self.row_fields.items():
            byname = {f.name: f for f in fields}
            if "quant_0" in byname or "quant_1" in byname:
                return (f"row {self.rows[i].name!r} already holds quantized K/V (LMDeploy's KV quantization, "
                        f"quant_policy other than 0, packs them); use host_kv_format='same' to move those packed "
                        f"bytes losslessly")
            for n in ("k_cache", "v_cache"):
                f = byname.get(n)
                if f is None:
                    return f"row {self.rows[i].name!r} has no {n} field"
                if f.dtype not in FLOAT_KV_DTYPES:
                    return (f"row {self.rows[i].name!r} {n} is {f.dtype}; host int8/int4 compression needs "
                            f"float16 or bfloat16 (use host_kv_format='same')")
                if n == "v_cache" and len(f.shape) == 3 and f.shape[-1] == 0:
                    return (f"row {self.rows[i].name!r} has an empty v_cache: an MLA model's latent KV cache, "
                            f"which int8/int4 host compression does not handle; use host_kv_format='same'")
                if len(f.shape) != 3 or f.shape[-1] == 0:
                    return f"row {self.rows[i].name!r} {n} has shape {f.shape}; need [block, heads, head_dim]"
                if host_kv_format == "int4" and f.shape[-1] % 2:
                    return f"row {self.rows[i].name!r} {n} head_dim {f.shape[-1]} is odd; int4 needs it even"
            if byname["k_cache"].dtype != byname["v_cache"].dtype:
                return f"row {self.rows[i].name!r} k_cache and v_cache dtypes differ"
        # one HostFormat.scale_dtype decodes every typed row (kernels and torch path alike)
        dtypes = {str(next(f.dtype for f in fields if f.name == "k_cache")): self.rows[i].name
                  for i, fields in self.row_fields.items()}
        if len(dtypes) > 1:
            named = ", ".join(f"{name!r} is {d.removeprefix('torch.')}" for d, name in sorted(dtypes.items()))
            return (f"host_kv_format={host_kv_format!r} needs one K/V dtype across the rows ({named}); "
                    f"use host_kv_format='same'")
        return None

    def host_format(self, host_kv_format: str = "same") -> HostFormat:
        """The slot layout for ``host_kv_format``; ``ValueError`` if it does not apply."""
        fmt = self._formats.get(host_kv_format)
        if fmt is None:
            err = self.compression_error(host_kv_format)
            if err:
                raise ValueError(err)
            fmt = self._build_format(host_kv_format)
            self._formats[host_kv_format] = fmt
        return fmt

    def _build_format(self, name: str) -> HostFormat:
        bits = {"same": 0, "int8": 8, "int4": 4}[name]
        ppb = self.pages_per_block
        row_offsets, record_bytes, segments, quant_fields, record_fields = [], [], [], [], []
        scale_dtype = None
        offset = 0
        for i, row in enumerate(self.rows):
            row_offsets.append(offset)
            fields = self.row_fields.get(i) if bits else None
            if not fields:
                run = ppb * row.page_bytes
                segments.append(Segment(i, 0, offset, 1, run, 0, 0))
                record_bytes.append(row.page_bytes)
                record_fields.append(())
                offset += run
                continue
            byname = {f.name: f for f in fields}
            k, v = byname["k_cache"], byname["v_cache"]
            scale_dtype = k.dtype
            host_fields: list[PageField] = []
            rec = 0

            def add(fname, shape, dtype, alignment=256):
                nonlocal rec
                size = math.prod(shape) * dtype.itemsize
                pf = PageField(fname, rec, tuple(shape), dtype, size, _round_up(size, alignment))
                host_fields.append(pf)
                rec += pf.aligned_size
                return pf

            kc = add("k_cache", (*k.shape[:-1], k.shape[-1] if bits == 8 else k.shape[-1] // 2), torch.uint8)
            vc = add("v_cache", (*v.shape[:-1], v.shape[-1] if bits == 8 else v.shape[-1] // 2), torch.uint8)
            q0 = add("quant_0", (*k.shape[:-1], 2), k.dtype)
            q1 = add("quant_1", (*v.shape[:-1], 2), v.dtype)
            others = [f for f in fields if f.name not in ("k_cache", "v_cache")]
            fixed = []
            for f in others:  # raw fields keep their source size and alignment
                fixed.append(PageField(f.name, rec, f.shape, f.dtype, f.size, f.aligned_size))
                rec += f.aligned_size
            host_fields += fixed
            record_bytes.append(rec)
            record_fields.append(tuple(host_fields))
            for src, qf, sz in ((k, kc, q0), (v, vc, q1)):
                quant_fields.append(QuantField(i, src.name, src.offset, offset + qf.offset, offset + sz.offset,
                                               math.prod(src.shape[:-1]), src.shape[-1], row.page_bytes, rec))
            for src, dst in zip(others, fixed):
                if src.size:
                    segments.append(Segment(i, src.offset, offset + dst.offset, ppb, src.size, row.page_bytes, rec))
            # zero every padding byte of the record
            for hf in host_fields:
                pad = hf.aligned_size - hf.size
                if pad:
                    segments.append(Segment(i, 0, offset + hf.offset + hf.size, ppb, pad, 0, rec, zero=True))
            offset += ppb * rec
        return HostFormat(name, bits, offset, tuple(row_offsets), tuple(record_bytes), tuple(segments),
                          tuple(quant_fields), scale_dtype, tuple(record_fields))

    def check_caches(self, kv_caches: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """The rows of ``kv_caches`` in layout order, as flat uint8 views; ``ValueError`` on mismatch."""
        if list(kv_caches.keys()) != list(self.row_names):
            raise ValueError(f"kv_caches rows {list(kv_caches.keys())[:4]}... differ from the layout's "
                             f"{list(self.row_names)[:4]}...")
        out = []
        for row in self.rows:
            t = kv_caches[row.name]
            if tuple(t.shape) != row.shape or t.dtype != row.dtype:
                raise ValueError(f"kv_caches[{row.name!r}] is {t.dtype}{tuple(t.shape)}, layout expects "
                                 f"{row.dtype}{row.shape}")
            if not t.is_contiguous():
                raise ValueError(f"kv_caches[{row.name!r}] is not contiguous")
            out.append(t.view(-1).view(torch.uint8) if t.element_size() != 1 or t.dtype != torch.uint8
                       else t.view(-1))
        return out

    def __repr__(self) -> str:
        return (f"KVRowLayout(rows={len(self.rows)}, pages_per_block={self.pages_per_block}, "
                f"num_blocks={self.num_blocks}, block_bytes={self.block_bytes}, "
                f"typed_rows={len(self.row_fields)})")
