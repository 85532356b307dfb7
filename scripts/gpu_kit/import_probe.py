"""Import the GPU kit's engine path and print, as JSON, which top-level modules it pulled in.

usage: python import_probe.py --out FILE [--module NAME ...] [--only] [--activate] [--engine-run DIR]

Run by ``check.py`` in a subprocess of this CPU machine's ``.venv`` (which has LMDeploy and its
dependencies). It imports every module the kit's GPU run imports (``ENGINE_PATH_MODULES``: LMDeploy's
PyTorch engine, uni executor, model agent, the Llama/Qwen2 models, the CUDA backend and kernels, the
scheduler, the KV-connector factory, the tokenizer; this package's modules and the kit driver), and
records each import edge ``importer top-level -> imported top-level`` through a ``sys.meta_path``
finder. ``check.py`` walks those edges from the kit's roots, stopping at stdlib and at packages the
device image already has, so a dependency of a device package (say ``huggingface_hub``'s HTTP
client) is never demanded of the staged set, while every module that LMDeploy or this package
imports itself is.

Module-level imports are what a plain import sees; an import inside a function counts only when that
function runs. ``--engine-run`` runs them: one tier-on multi-turn replay (with host restores) through
LMDeploy's real engine on CPU under ``lmdeploy_hostcache.testing.cpu_shim``, as the kit's e2e runs do
on a GPU. The kit's GPU run is the final word.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

ENGINE_PATH_MODULES = (
    "lmdeploy",
    "lmdeploy.messages",
    "lmdeploy.pytorch.engine",
    "lmdeploy.pytorch.engine.engine",
    "lmdeploy.pytorch.engine.engine_instance",
    "lmdeploy.pytorch.engine.engine_loop",
    "lmdeploy.pytorch.engine.executor",
    "lmdeploy.pytorch.engine.executor.uni_executor",
    "lmdeploy.pytorch.engine.model_agent",
    "lmdeploy.pytorch.engine.cache_engine",
    "lmdeploy.pytorch.engine.cache_engine.plan",
    "lmdeploy.pytorch.strategies.ar.sequence",
    "lmdeploy.pytorch.engine.guided_process",
    "lmdeploy.pytorch.models.llama",
    "lmdeploy.pytorch.models.qwen2",
    "lmdeploy.pytorch.models.module_map",
    "lmdeploy.pytorch.models.patch",
    "lmdeploy.pytorch.backends.cuda",
    "lmdeploy.pytorch.backends.cuda.op_backend",
    "lmdeploy.pytorch.backends.cuda.attention",
    "lmdeploy.pytorch.backends.cuda.graph_runner",
    "lmdeploy.pytorch.kernels.cuda",
    "lmdeploy.pytorch.kernels.cuda.fill_kv_cache",
    "lmdeploy.pytorch.kernels.cuda.pagedattention",
    "lmdeploy.pytorch.kernels.cuda.flashattention",
    "lmdeploy.pytorch.paging.scheduler",
    "lmdeploy.pytorch.kv_connector.factory",
    "lmdeploy.pytorch.check_env",
    "lmdeploy.tokenizer",
    "lmdeploy_hostcache",
    "lmdeploy_hostcache.config",
    "lmdeploy_hostcache.restore_cost",
    "lmdeploy_hostcache.cli",
    "lmdeploy_hostcache.transfer",
    "lmdeploy_hostcache.bench.transfer",
    "lmdeploy_hostcache.integration.activate",
    "lmdeploy_hostcache.integration.connector",
    "lmdeploy_hostcache.integration.worker",
    "lmdeploy_hostcache.integration.engine_config",
    "lmdeploy_hostcache.planner.generator",
    "lmdeploy_hostcache.testing.models",
    "lmdeploy_hostcache.testing.compare",
    "safetensors.torch",
    "pytest",
)


class _Recorder:
    """A meta-path finder that finds nothing; it only notes who imports whom (top-level names)."""

    def __init__(self):
        self.edges: set[tuple[str, str]] = set()
        self.failed: dict[str, str] = {}

    def find_spec(self, fullname, path=None, target=None):
        importer = _importer()
        top = fullname.partition(".")[0]
        if importer and importer != top:
            self.edges.add((importer, top))
        return None


def _importer() -> str | None:
    """Top-level package of the first frame outside the import machinery and this file."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not name.startswith(("importlib", "_frozen_importlib")) and name != __name__:
            return name.partition(".")[0] or None
        frame = frame.f_back
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", action="append", default=[], help="extra module to import (repeatable)")
    parser.add_argument("--only", action="store_true", help="import only --module names, not the engine path")
    parser.add_argument("--out", required=True, help="write the JSON here (imported modules may print)")
    parser.add_argument("--activate", action="store_true",
                        help="install the post-import hook first (the kit's tier-on runs): its patches' imports count")
    parser.add_argument("--engine-run", metavar="DIR", default=None,
                        help="then run LMDeploy's engine once on CPU (testing.cpu_shim, a tiny model written to DIR, "
                             "host tier on, a multi-turn replay that restores) so imports made inside functions count")
    args = parser.parse_args(argv)
    rec = _Recorder()
    sys.meta_path.insert(0, rec)
    if args.engine_run:  # the CPU shim must precede every LMDeploy import (test-only; never on a GPU run)
        from lmdeploy_hostcache.testing import cpu_shim

        cpu_shim.install()
    if args.activate:
        from lmdeploy_hostcache.integration import autoload

        autoload.install()
        sys.meta_path.remove(rec)
        sys.meta_path.insert(0, rec)  # first again: it records, the hook patches
    wanted = list(args.module) if args.only else [*ENGINE_PATH_MODULES, *args.module]
    for name in wanted:
        rec.edges.add(("<kit>", name.partition(".")[0]))
        try:
            importlib.import_module(name)
        except Exception as exc:  # reported, judged by check.py
            rec.failed[name] = f"{type(exc).__name__}: {exc}"
    engine_run = None
    if args.engine_run:
        try:
            engine_run = _engine_run(args.engine_run)
        except Exception as exc:  # reported, judged by check.py
            engine_run = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
    sys.meta_path.remove(rec)
    loaded = sorted(m for m in sys.modules if m.startswith(("lmdeploy.", "lmdeploy_hostcache.")))
    if args.activate:
        from lmdeploy_hostcache.integration.activate import status

        st = status()
        if st["status"] != "active":
            rec.failed["<activation>"] = f"{st['status']}: {st['reason']}"
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump({"edges": sorted(rec.edges), "failed": rec.failed, "loaded_submodules": loaded,
                   "roots": wanted, "python": sys.version.split()[0], "engine_run": engine_run}, fh)
    if engine_run is not None:
        sys.stdout.flush()
        os._exit(0)  # the engine's threads: skip interpreter teardown (as e2e_worker does)
    return 0


def _engine_run(work_dir: str) -> dict:
    """One tier-on replay through LMDeploy's real engine on CPU (what the kit's e2e runs do on a GPU)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import e2e_worker
    import kitlib
    import model_writer
    from driver import MODEL_SIZES

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model_writer.write_random_llama(work / "model", MODEL_SIZES["tiny"], device="cpu")
    spec = kitlib.WorkloadSpec(sessions=3, turns=2, system_tokens=16, first_user_tokens=48, user_tokens=16,
                               new_tokens=2)
    (work / "workload.json").write_text(json.dumps(kitlib.make_workload(spec)))
    bs = 16
    run = {"name": "probe_small_on_qp0", "tier": True, "quant_policy": 0, "block_size": bs,
           "num_gpu_blocks": kitlib.gpu_blocks_for(spec, bs, 4.0), "host_cache_gb": 0.01, "min_restore_tokens": 0,
           "eager_mode": True, "concurrency": 1, "session_len": kitlib.final_context_tokens(spec) + 2 * bs,
           "calibrate": False}
    ns = argparse.Namespace(run=json.dumps(run), workload=str(work / "workload.json"), model=str(work / "model"),
                            cpu_shim=True, fake_engine=False)
    res = e2e_worker.run(ns)
    return {"status": res.get("status"), "failed_requests": res.get("failed_requests"),
            "restored_tokens": (res.get("host_tier") or {}).get("restored_tokens"),
            "activation": (res.get("activation") or {}).get("status")}


if __name__ == "__main__":
    sys.exit(main())
