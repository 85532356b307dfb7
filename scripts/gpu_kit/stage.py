"""Assemble the GPU kit's wheel folder from downloaded wheels (run by ``stage.sh``; no network here).

usage: python stage.py --download DIR --dest DIR [--repo DIR] [--no-own-wheel]

* LMDeploy's wheel is rewritten without TurboMind's binaries and build artefacts
  (``STRIP_PATTERNS``: ``_turbomind*.so``, ``turbomind/lib*/``, ``turbomind/include/``, any other
  ``.so``/``.a``): the PyTorch engine never loads them, and they are >99% of the wheel's bytes.
  Its RECORD is rewritten to list exactly what is left, so ``pip install`` accepts it; the file
  name (tags) is kept.
* Every other downloaded wheel is copied as is.
* This package is built as a wheel (``pip wheel --no-deps``) from the checkout.
* ``manifest.json`` lists every staged wheel with its size and sha256, what was stripped, and the
  checkout's commit.
* ``--checkout-json FILE`` (``stage.sh``: ``.gpu_kit/checkout.json``): the checkout as staged
  (``kitlib.checkout_state``: ``git describe --always --dirty``, sha256 of ``git diff HEAD`` and of the
  untracked package files, sha256 of ``lmdeploy_hostcache/**/*.py``); the driver puts it in its
  result next to the hash of the package it actually imported.

Invariant: the wheel folder holds exactly one wheel per distribution (pip stops on two).
"""
from __future__ import annotations

import argparse
import base64
import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

STRIP_PATTERNS = (
    "lmdeploy/turbomind/_turbomind*.so",
    "lmdeploy/turbomind/lib/*",
    "lmdeploy/turbomind/lib64/*",
    "lmdeploy/turbomind/include/*",
    "lmdeploy/lib/*",
    "*.so",
    "*.a",
)


def dist_name(wheel: str | os.PathLike) -> str:
    """Normalised distribution name of a wheel file name (PEP 503: lower case, runs of -_. -> -)."""
    base = Path(wheel).name.split("-")[0]
    out = []
    for ch in base.lower():
        out.append("-" if ch in "-_." else ch)
    name = "".join(out)
    while "--" in name:
        name = name.replace("--", "-")
    return name


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def strip_wheel(src: Path, dst: Path, patterns=STRIP_PATTERNS) -> dict:
    """Copy wheel ``src`` to ``dst`` without members matching ``patterns``; RECORD rewritten."""
    removed, kept_bytes = [], 0
    with zipfile.ZipFile(src) as zin:
        record_name = next((n for n in zin.namelist() if n.endswith(".dist-info/RECORD")), None)
        if record_name is None:
            raise SystemExit(f"{src}: not a wheel (no .dist-info/RECORD)")
        tmp = dst.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zout:
            rows = []
            for info in zin.infolist():
                name = info.filename
                if name == record_name:
                    continue
                if any(fnmatch.fnmatch(name, p) for p in patterns):
                    removed.append({"path": name, "bytes": info.file_size})
                    continue
                data = zin.read(info)
                zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
                kept_bytes += len(data)
                if not name.endswith("/"):
                    rows.append(f"{name},{_record_hash(data)},{len(data)}")
            rows.append(f"{record_name},,")
            zout.writestr(record_name, "\n".join(rows) + "\n")
    tmp.replace(dst)
    return {"removed": removed, "removed_bytes": sum(r["bytes"] for r in removed), "kept_bytes": kept_bytes}


def build_own_wheel(repo: Path, dest: Path) -> Path:
    """``pip wheel --no-deps`` of the checkout into ``dest``; returns the wheel's path."""
    before = set(dest.glob("lmdeploy_hostcache-*.whl"))
    for old in before:
        old.unlink()
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
           "-w", str(dest), str(repo)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"building this package's wheel failed:\n{proc.stdout}{proc.stderr}")
    built = sorted(dest.glob("lmdeploy_hostcache-*.whl"))
    if len(built) != 1:
        raise SystemExit(f"expected one lmdeploy_hostcache wheel in {dest}, found {[p.name for p in built]}")
    return built[0]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _git_commit(repo: Path) -> str | None:
    proc = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() or None


def write_checkout_json(repo: Path, path: Path) -> dict:
    """``kitlib.checkout_state(repo)`` written to ``path`` (what code this kit was staged from)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import kitlib

    state = kitlib.checkout_state(repo)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state, indent=2) + "\n")
    return state


def stage(download: Path, dest: Path, repo: Path, own_wheel: bool = True) -> dict:
    wheels = sorted(download.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"{download}: no wheels to stage (run stage.sh, which downloads them)")
    names: dict[str, str] = {}
    for w in wheels:
        n = dist_name(w)
        if n in names:
            raise SystemExit(f"{download}: two wheels of {n}: {names[n]} and {w.name} (keep one)")
        names[n] = w.name
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    stripped = None
    for w in wheels:
        if dist_name(w) == "lmdeploy":
            stripped = strip_wheel(w, dest / w.name)
            stripped["wheel"] = w.name
            stripped["original_bytes"] = w.stat().st_size
        else:
            shutil.copy2(w, dest / w.name)
    if stripped is None:
        raise SystemExit(f"{download}: no lmdeploy wheel among the downloads")
    if own_wheel:
        build_own_wheel(repo, dest)
    files = [{"wheel": p.name, "dist": dist_name(p), "bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(dest.glob("*.whl"))]
    manifest = {
        "wheels": files,
        "total_bytes": sum(f["bytes"] for f in files),
        "lmdeploy_stripped": {k: v for k, v in stripped.items() if k != "removed"}
        | {"removed": [r["path"] for r in stripped["removed"]]},
        "commit": _git_commit(repo),
    }
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="assemble the GPU kit's wheel folder")
    parser.add_argument("--download", required=True, type=Path, help="folder of downloaded wheels")
    parser.add_argument("--dest", required=True, type=Path, help="staged wheel folder (emptied first)")
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[2])
    parser.add_argument("--no-own-wheel", action="store_true", help="do not build this package's wheel")
    parser.add_argument("--checkout-json", type=Path, default=None,
                        help="also write the checkout's state (describe --dirty, diff and untracked hashes) here")
    args = parser.parse_args(argv)
    if not args.download.is_dir():
        raise SystemExit(f"--download {args.download}: not a folder")
    m = stage(args.download, args.dest, args.repo, own_wheel=not args.no_own_wheel)
    if args.checkout_json is not None:
        write_checkout_json(args.repo, args.checkout_json)
    s = m["lmdeploy_stripped"]
    print(f"staged {len(m['wheels'])} wheels in {args.dest}: {m['total_bytes'] / 2**20:.1f} MiB "
          f"(lmdeploy {s['original_bytes'] / 2**20:.1f} MiB -> stripped of {len(s['removed'])} files, "
          f"{s['removed_bytes'] / 2**20:.1f} MiB uncompressed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
