"""The tiny module the ``.pth`` auto-loader imports at every interpreter start.

``install()`` puts ``PostImportFinder`` first on ``sys.meta_path``. The finder does
nothing for any module except the LMDeploy modules in ``TARGET_MODULES``: for those it
lets the real loader execute the module, then hands it to ``activate._apply`` (guard,
then patch). Nothing else is imported here (only ``os``/``sys``, already loaded by
``site``), so the start-up cost is one small module; ``activate`` loads on the first
LMDeploy import. ``LMDEPLOY_HOSTCACHE_DISABLE=1`` skips all of it.
"""
import os
import sys

ENV_DISABLE = "LMDEPLOY_HOSTCACHE_DISABLE"
# Must equal activate.PATCHERS' keys (tests/integration/test_activation_pth.py checks it).
TARGET_MODULES = frozenset({
    "lmdeploy.messages",
    "lmdeploy.pytorch.kv_connector.factory",
    "lmdeploy.pytorch.paging.scheduler",
    "lmdeploy.pytorch.engine.executor.base",
    "lmdeploy.pytorch.engine.engine",
    "lmdeploy.pytorch.engine.model_agent.agent",
    "lmdeploy.cli.serve",
    "lmdeploy.metrics.stats",
    "lmdeploy.metrics.loggers",
    "lmdeploy.pytorch.messages",
    "lmdeploy.serve.utils.server_utils",
})
# Set by activate when the guard refused or a patch failed: the finder steps aside, except for
# the modules in ``still_patched`` (activate.REFUSAL_PATCHERS: the flags stay registered and
# refuse with one message on an unsupported LMDeploy).
stopped = False
still_patched = frozenset()


OFF_WORDS = ("", "0", "false", "no")   # what an on/off variable of ours reads as off (the .pth repeats them)


def is_disabled() -> bool:
    """True when ``LMDEPLOY_HOSTCACHE_DISABLE`` is set to anything but '', '0', 'false', 'no'."""
    return os.environ.get(ENV_DISABLE, "").strip().lower() not in OFF_WORDS


class _PatchingLoader:
    """Delegates to the real loader, then patches the executed module."""

    def __init__(self, loader, name):
        self._loader = loader
        self._name = name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        # The module should look stock to everybody else (inspect, pickling, reload).
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        from . import activate

        activate._apply(self._name, module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class PostImportFinder:
    """``sys.meta_path`` entry that wraps the real loader of the ``TARGET_MODULES`` only."""

    def __init__(self):
        self._busy = set()

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in TARGET_MODULES or fullname in self._busy:
            return None
        if stopped and fullname not in still_patched:
            return None
        self._busy.add(fullname)
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            self._busy.discard(fullname)
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _PatchingLoader(spec.loader, fullname)
        return spec

    def invalidate_caches(self):
        pass


finder = PostImportFinder()


def install_finder():
    if finder not in sys.meta_path:
        sys.meta_path.insert(0, finder)


def remove_finder():
    if finder in sys.meta_path:
        sys.meta_path.remove(finder)


def install():
    """Entry point of the ``.pth`` line. Never raises: an interpreter must always start."""
    try:
        if is_disabled():
            return
        install_finder()
        if any(name in sys.modules for name in TARGET_MODULES):  # LMDeploy imported before us
            from . import activate

            activate.activate()
    except Exception as exc:  # pragma: no cover
        sys.stderr.write(f"lmdeploy-hostcache: auto-activation skipped: {exc!r}\n")
