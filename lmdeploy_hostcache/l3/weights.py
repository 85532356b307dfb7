"""Names of a local checkpoint's weights: a fingerprint, part of every store key, and an exact
content name for Hugging Face cache snapshots.

Store objects outlive the process that wrote them, and other nodes read them. The model's path
alone does not say which weights produced a block: two nodes can mount different fine-tunes at the
same path, and a retrained checkpoint can be written over the old one between two runs. Tokens and
checksums still match in those cases, so a store key without the weights would restore KV computed
by other weights. ``checkpoint_fingerprint(path)`` names the weights instead:

* the bytes of ``config.json`` (architecture, dtype, rope settings), for a LoRA adapter's folder of
  ``adapter_config.json`` (rank, alpha, target modules), and of the folder's top-level ``*.py`` (remote
  configuration code, which fills in what ``config.json`` leaves out);
* for every weight file under ``path`` (``WEIGHT_SUFFIXES``, hidden folders skipped): its path
  relative to ``path``, its size, and ``SAMPLES`` pieces of ``PIECE_BYTES`` spread evenly over it,
  the first and the last piece included (a file up to ``SAMPLES * PIECE_BYTES`` is read whole).

Invariants: the same bytes give the same fingerprint on every machine (no modification times, inode
numbers or absolute paths enter it); at most ``SAMPLES * PIECE_BYTES`` bytes are read per weight file
(16 MiB per configuration file), so a 140 GB checkpoint costs a few MiB of reads per shard; any file
that cannot be read raises ``ValueError`` naming it (no fingerprint is better than a wrong one). A fine-tune changes nearly
every piece and a partial update (a merged adapter) changes whole tensors, so sampled pieces
differ unless the update touches none of them: a sample, not a proof. ``l3.weights_id`` in the
settings replaces it where the operator names the weights (a commit hash, a run id).

``exact_content_name(path)`` is not a sample: a snapshot whose files are all links to
``blobs/<content hash>`` is named by its weight files' blob names (no weight byte is read) and its
other files' bytes; anything else gets None. ``integration/namespace.py`` uses it to let nodes that
keep one snapshot under different paths share; ``config_fingerprint`` names the configuration alone,
for ``l3.weights_id``.
"""
from __future__ import annotations

import os
import struct

import xxhash

__all__ = ["PIECE_BYTES", "SAMPLES", "WEIGHT_SUFFIXES", "checkpoint_fingerprint", "config_fingerprint",
           "exact_content_name"]

CONFIG_FILES = ("config.json", "adapter_config.json")   # a model's, a LoRA adapter's (rank, alpha, targets)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack", ".npz")
SAMPLES = 64
PIECE_BYTES = 64 * 1024
MAX_FILES = 100_000


def _part(h, data: bytes) -> None:
    h.update(struct.pack("<Q", len(data)))
    h.update(data)


def _weight_files(root: str) -> list[str]:
    found: list[str] = []

    def fail(exc: OSError) -> None:
        raise ValueError(f"{exc.filename or root}: cannot list the checkpoint's files "
                         f"({exc.strerror or exc})") from None

    for folder, dirs, files in os.walk(root, onerror=fail, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.lower().endswith(WEIGHT_SUFFIXES):
                found.append(os.path.relpath(os.path.join(folder, name), root))
                if len(found) > MAX_FILES:
                    raise ValueError(f"{root}: more than {MAX_FILES:,} weight files; not a checkpoint folder")
    return sorted(found)


def _sample(h, path: str, rel: str) -> None:
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            _part(h, rel.replace(os.sep, "/").encode())
            _part(h, str(size).encode())
            if size <= SAMPLES * PIECE_BYTES:
                _part(h, fh.read())
                return
            span = size - PIECE_BYTES
            for i in range(SAMPLES):
                fh.seek(span * i // (SAMPLES - 1))
                _part(h, fh.read(PIECE_BYTES))
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it to fingerprint the weights ({exc.strerror or exc})") from None


def _config_files(folder: str) -> list[str]:
    """The folder's configuration: ``CONFIG_FILES`` and its top-level ``*.py`` (with
    ``trust_remote_code``, a ``configuration_*.py`` fills in what ``config.json`` leaves out)."""
    try:
        code = sorted(n for n in os.listdir(folder) if n.endswith(".py") and os.path.isfile(os.path.join(folder, n)))
    except OSError as exc:
        raise ValueError(f"{folder}: cannot list it ({exc.strerror or exc})") from None
    return [n for n in CONFIG_FILES if os.path.isfile(os.path.join(folder, n))] + code


def _read_small(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(16 * 2**20)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it ({exc.strerror or exc})") from None


def _hash_configs(h, folder: str) -> int:
    """Hash the folder's configuration files (``_config_files``) into ``h``; how many there were."""
    names = _config_files(folder)
    for name in names:
        _part(h, name.encode())
        _part(h, _read_small(os.path.join(folder, name)))
    return len(names)


def config_fingerprint(path: str) -> str | None:
    """32 hex digits naming the configuration of the checkpoint folder at ``path`` (``_config_files``),
    or None when ``path`` is not a folder on this machine or holds none of them.
    With ``l3.weights_id`` it keeps two different models an operator gave one id apart (an
    architecture, a size, a rope setting)."""
    if not path or not os.path.isdir(path):
        return None
    h = xxhash.xxh3_128()
    _part(h, b"lhc-config-1")
    return h.hexdigest() if _hash_configs(h, path) else None


_HEX = frozenset("0123456789abcdef")


def _content_blob(path: str) -> str | None:
    """The content hash a Hugging Face cache file is named by: a link to ``blobs/<sha256 or git sha1>``."""
    if not os.path.islink(path):
        return None
    target = os.path.realpath(path)
    name = os.path.basename(target)
    if os.path.basename(os.path.dirname(target)) != "blobs" or len(name) not in (40, 64) or not set(name) <= _HEX:
        return None
    return name if os.path.isfile(target) else None


def exact_content_name(path: str) -> str | None:
    """32 hex digits naming the checkpoint folder at ``path`` exactly, or None when it cannot be named
    without reading the weights. A Hugging Face cache snapshot (``snapshots/<revision>/``) holds links to
    ``blobs/<content hash>``: when every file under ``path`` is such a link (and there are a
    ``config.json`` and weight files), the weight files are named by their blobs' hashes, every other
    file (configuration, remote code, tokenizer) by its bytes, since an edit through the link (an
    editor, ``json.dump``) rewrites the blob in place without renaming it. Weight blobs written over in
    place are not detected. A folder with any plain file (a copy, ``--local-dir``) gives None."""
    if not path or not os.path.isdir(path) or _content_blob(os.path.join(path, "config.json")) is None:
        return None
    rels: list[str] = []
    for folder, dirs, files in os.walk(path):
        dirs.sort()
        rels.extend(os.path.relpath(os.path.join(folder, n), path) for n in sorted(files))
        if len(rels) > MAX_FILES:
            return None
    h = xxhash.xxh3_128()
    _part(h, b"lhc-exact-2")
    weights = 0
    for rel in sorted(rels):
        full = os.path.join(path, rel)
        blob = _content_blob(full)
        if blob is None:
            return None
        _part(h, rel.replace(os.sep, "/").encode())
        _part(h, blob.encode())
        if rel.lower().endswith(WEIGHT_SUFFIXES):
            weights += 1
        else:
            _part(h, _read_small(full))
    return h.hexdigest() if weights else None


def checkpoint_fingerprint(path: str) -> str | None:
    """32 hex digits naming the weights at ``path`` (a folder or one weight file), or None when
    ``path`` is not on this machine (a hub id the engine resolves elsewhere)."""
    if not path or not os.path.exists(path):
        return None
    h = xxhash.xxh3_128()
    _part(h, b"lhc-weights-1")
    if os.path.isdir(path):
        _hash_configs(h, path)
        for rel in _weight_files(path):
            _sample(h, os.path.join(path, rel), rel)
    else:
        _sample(h, path, os.path.basename(path))
    return h.hexdigest()
