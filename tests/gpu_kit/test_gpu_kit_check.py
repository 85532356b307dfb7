"""The staged-set checks on small fake sets: tags, top-level names, import walk, size, stripping."""
from __future__ import annotations

import base64
import hashlib
import zipfile

import pytest

import check
import stage


@pytest.mark.parametrize("name,ok", [
    ("addict-2.4.0-py3-none-any.whl", True),
    ("pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl", True),
    ("pyzmq-27.3.0-cp312-abi3-manylinux_2_26_x86_64.manylinux_2_28_x86_64.whl", True),
    ("xgrammar-0.2.9-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl", True),
    ("pydantic_core-2.50.5-cp311-cp311-manylinux_2_17_x86_64.whl", False),    # another Python
    ("pybase64-1.5.1-cp312-cp312-manylinux_2_17_aarch64.whl", False),         # another CPU
    ("foo-1.0-cp312-cp312-manylinux_2_40_x86_64.whl", False),                 # newer glibc than the image
    ("foo-1.0-cp312-cp312-macosx_11_0_x86_64.whl", False),
    ("foo-1.0-1-py3-none-any.whl", True),                                     # with a build tag
])
def test_wheel_tags(name, ok):
    assert check.wheel_tags_ok(name) is ok


def test_wheel_tags_rejects_non_wheel_names():
    with pytest.raises(ValueError, match="not a wheel file name"):
        check.wheel_tags("foo.whl")


def test_top_levels_from_members():
    names = ["yapf/__init__.py", "yapf_third_party/x/y.py", "typing_extensions.py", "zmq/backend/c.so",
             "_cffi_backend.cpython-312-x86_64-linux-gnu.so", "yapf-0.43.0.dist-info/RECORD",
             "foo-1.data/scripts/bar", "lmdeploy_hostcache_autoload.pth"]
    assert check.wheel_top_levels(names) == {"yapf", "yapf_third_party", "typing_extensions", "zmq", "_cffi_backend"}


def test_dist_name_normalises():
    assert stage.dist_name("mmengine_lite-0.10.7-py3-none-any.whl") == "mmengine-lite"
    assert stage.dist_name("/x/Typing.Inspection-0.4.5-py3-none-any.whl") == "typing-inspection"
    assert check.normalise("PyYAML") == "pyyaml" and check.normalise("opencv_python.headless") == \
        "opencv-python-headless"


def _resolve(edges, staged=(), device=(), present=None):
    tops = {b for _, b in edges}
    return check.resolve_imports(edges, lambda t: t in {"os", "json"}, lambda t: t in set(device), set(staged),
                                 tops if present is None else set(present))


def test_resolve_walks_staged_packages_and_stops_at_device_ones():
    edges = [("<kit>", "lmdeploy"), ("lmdeploy", "pydantic"), ("pydantic", "pydantic_core"),
             ("lmdeploy", "torch"), ("torch", "sympy"), ("lmdeploy", "os"), ("lmdeploy", "zmq")]
    r = _resolve(edges, staged={"lmdeploy", "pydantic", "pydantic_core"}, device={"torch"})
    assert r["staged"] == {"lmdeploy", "pydantic", "pydantic_core"}
    assert r["device"] == {"torch"} and r["stdlib"] == {"os"}
    assert r["missing"] == {"zmq": ["lmdeploy"]}    # named with who imports it
    # torch's own needs (sympy) are the image's business: never demanded of the staged set
    assert "sympy" not in r["missing"]


def test_resolve_ignores_failed_optional_imports_and_unreached_modules():
    edges = [("<kit>", "lmdeploy"), ("lmdeploy", "dlslime"), ("other", "zmq")]
    r = _resolve(edges, staged={"lmdeploy"}, present={"lmdeploy", "zmq"})
    assert r["missing"] == {}   # dlslime failed to import (optional); 'other' is not on the kit's path


def test_resolve_missing_transitive_dependency_of_a_staged_package():
    edges = [("<kit>", "lmdeploy"), ("lmdeploy", "mmengine"), ("mmengine", "addict")]
    r = _resolve(edges, staged={"lmdeploy", "mmengine"})
    assert r["missing"] == {"addict": ["mmengine"]}


def test_size_and_one_per_dist():
    assert check.check_size({"a.whl": 30 * 2**20, "b.whl": 30 * 2**20}, 60)["ok"]
    over = check.check_size({"a.whl": 30 * 2**20, "b.whl": 30 * 2**20 + 1}, 60)
    assert not over["ok"] and over["total_mib"] == 60.0
    dup = check.check_one_per_dist(["x/pydantic-2.1-py3-none-any.whl", "pydantic-2.2-py3-none-any.whl",
                                    "addict-2.4.0-py3-none-any.whl"])
    assert not dup["ok"] and list(dup["duplicates"]) == ["pydantic"]


def _fake_wheel(path, members):
    with zipfile.ZipFile(path, "w") as z:
        rows = []
        for name, data in members.items():
            z.writestr(name, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            rows.append(f"{name},sha256={digest},{len(data)}")
        z.writestr("lmdeploy-0.18.0.dist-info/RECORD", "\n".join(rows + ["lmdeploy-0.18.0.dist-info/RECORD,,"]))


def test_strip_wheel_removes_binaries_and_rewrites_record(tmp_path):
    src = tmp_path / "src" / "lmdeploy-0.18.0-cp312-cp312-manylinux_2_28_x86_64.whl"
    src.parent.mkdir()
    _fake_wheel(src, {
        "lmdeploy/__init__.py": b"x = 1\n",
        "lmdeploy/pytorch/engine.py": b"y = 2\n",
        "lmdeploy/turbomind/_turbomind.cpython-312-x86_64-linux-gnu.so": b"\0" * 5000,
        "lmdeploy/turbomind/lib64/libxgrammar.a": b"\0" * 3000,
        "lmdeploy/turbomind/include/a.h": b"int a;",
        "lmdeploy/turbomind/turbomind.py": b"z = 3\n",
        "lmdeploy-0.18.0.dist-info/METADATA": b"Name: lmdeploy\n",
    })
    dst = tmp_path / src.name
    info = stage.strip_wheel(src, dst)
    assert sorted(r["path"] for r in info["removed"]) == [
        "lmdeploy/turbomind/_turbomind.cpython-312-x86_64-linux-gnu.so", "lmdeploy/turbomind/include/a.h",
        "lmdeploy/turbomind/lib64/libxgrammar.a"]
    with zipfile.ZipFile(dst) as z:
        names = z.namelist()
        record = z.read("lmdeploy-0.18.0.dist-info/RECORD").decode().splitlines()
        assert check.check_stripped(names)["ok"]
        listed = {row.split(",")[0] for row in record}
        assert listed == set(names)              # RECORD lists exactly what is in the wheel
        for row in record:                       # and its hashes are right
            name, digest, size = row.split(",")
            if digest:
                data = z.read(name)
                assert int(size) == len(data)
                assert digest == "sha256=" + base64.urlsafe_b64encode(
                    hashlib.sha256(data).digest()).rstrip(b"=").decode()
    assert not check.check_stripped(["lmdeploy/turbomind/_turbomind.so"])["ok"]


def test_stage_refuses_two_versions_of_one_dist(tmp_path):
    for v in ("2.1", "2.2"):
        (tmp_path / f"pydantic-{v}-py3-none-any.whl").write_bytes(b"")
    with pytest.raises(SystemExit, match="two wheels of pydantic"):
        stage.stage(tmp_path, tmp_path / "out", tmp_path, own_wheel=False)


def test_device_package_list_is_read_normalised():
    device = check.read_device_packages()
    assert {"torch", "triton", "transformers", "safetensors", "xxhash", "pyyaml", "numpy"} <= device
    assert not {"lmdeploy", "pydantic", "fastapi", "mmengine-lite"} & device
