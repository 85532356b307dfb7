"""Version and source-hash guard (integration/guard.py)."""
from __future__ import annotations

import importlib
import inspect
import shutil

import pytest

from lmdeploy_hostcache.integration import guard

pytest.importorskip("lmdeploy")

ALL_TARGETS = list(guard.PATCHED_TARGETS) + list(guard.RELIED_TARGETS)


def _live(target: str):
    module, _, qualname = target.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = inspect.getattr_static(obj, part)
        obj = getattr(obj, "__func__", obj)  # staticmethod/classmethod
        obj = getattr(obj, "fget", obj)  # property
    return inspect.unwrap(obj)  # the stock object behind our wrapper, if activated


def test_installed_lmdeploy_matches_every_pin():
    result = guard.verify()
    assert result.ok, result.problems
    assert result.version == guard.SUPPORTED_LMDEPLOY_VERSION


def test_pins_cover_exactly_the_patched_and_relied_targets():
    assert set(guard.PINS) == set(ALL_TARGETS)


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_pin_recomputed_from_the_live_object(target):
    """The pin is sha256(inspect.getsource(obj)); the file-based reader agrees with inspect."""
    live_source = inspect.getsource(_live(target))
    assert guard.target_source(target) == live_source
    assert guard.source_digest(live_source) == guard.PINS[target]


def test_every_rebinding_made_by_activation_is_pinned():
    from lmdeploy_hostcache.integration import activate as act

    st = act.activate()
    if st["status"] != "active":
        pytest.skip(st["reason"])
    for name in act.PATCHERS:
        importlib.import_module(name)
    targets = {p.target for p in act._state.patches}
    assert targets, "activation recorded no patch"
    assert targets <= set(guard.PATCHED_TARGETS)
    assert {t.split(":")[0] for t in guard.PATCHED_TARGETS} == set(act.PATCHERS) | set(act.COMPANION_MODULES)
    assert set(act.COMPANION_MODULES.values()) <= set(act.PATCHERS)


def test_another_version_is_refused_by_name():
    result = guard.verify(version="0.17.1")
    assert not result.ok
    assert "0.17.1" in result.message() and "0.18.0" in result.message()
    assert "LMDeploy runs as stock" in result.message()


def _copy_targets(tmp_path):
    """A minimal lmdeploy tree holding only the files the guard reads."""
    root = guard.lmdeploy_root()
    dst = tmp_path / "lmdeploy"
    files = {"version.py"} | {t.split(":")[0] for t in ALL_TARGETS}
    for f in files:
        rel = f if f.endswith(".py") else f.split(".", 1)[1].replace(".", "/") + ".py"
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / rel, dst / rel)
    return dst


def test_copy_of_the_sources_passes(tmp_path):
    assert guard.verify(_copy_targets(tmp_path)).ok


def test_modified_function_is_refused_naming_it(tmp_path):
    dst = _copy_targets(tmp_path)
    path = dst / "pytorch/paging/scheduler.py"
    text = path.read_text()
    marker = "        self.scheduler_tick = 0\n"
    assert marker in text
    path.write_text(text.replace(marker, marker + "        self.extra = 1\n", 1))
    result = guard.verify(dst)
    assert not result.ok
    assert len(result.problems) == 1
    assert "lmdeploy.pytorch.paging.scheduler:Scheduler.__init__" in result.problems[0]


def test_missing_function_is_refused_naming_it(tmp_path):
    dst = _copy_targets(tmp_path)
    path = dst / "pytorch/kv_connector/factory.py"
    path.write_text(path.read_text().replace("def build_kv_connector(", "def build_connector(", 1))
    result = guard.verify(dst)
    assert not result.ok
    assert any("factory:build_kv_connector: no such definition" in p for p in result.problems)


def test_guard_reads_files_without_importing_lmdeploy():
    import subprocess
    import sys

    code = ("import sys; from lmdeploy_hostcache.integration import guard; r = guard.verify(); "
            "print(r.ok, any(m == 'lmdeploy' or m.startswith('lmdeploy.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "LMDEPLOY_HOSTCACHE_DISABLE": "1"})
    assert out.stdout.split() == ["True", "False"], out.stderr


def test_file_pins_are_current_and_the_full_check_agrees():
    assert guard.compute_file_pins() == guard.FILE_PINS
    assert set(guard.FILE_PINS) == {t.split(":")[0] for t in ALL_TARGETS}
    assert guard.verify(pins=dict(guard.PINS)).ok  # a copy of the pins forces the per-function check


def test_unrelated_edit_in_a_pinned_file_still_passes(tmp_path):
    dst = _copy_targets(tmp_path)
    path = dst / "pytorch/paging/scheduler.py"
    path.write_text(path.read_text() + "\n# a downstream comment outside every pinned function\n")
    result = guard.verify(dst)
    assert result.ok, result.problems
