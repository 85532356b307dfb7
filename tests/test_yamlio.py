"""The one strict YAML loader (issue 9 item 9): duplicate keys refused anywhere, YAML 1.2 numbers,
safe loading, every unusable file a YamlError naming it."""
from __future__ import annotations

import pytest

from lmdeploy_hostcache.yamlio import YamlError, dump_yaml, load_yaml_file, load_yaml_text


@pytest.mark.parametrize("text, line", [("a: 1\na: 2\n", 2), ("x:\n  y: 1\n  z: 2\n  y: 3\n", 4),
                                        ("nodes:\n  - {name: a, name: b}\n", 2)])
def test_duplicate_keys_are_refused_at_any_depth(text, line):
    with pytest.raises(YamlError) as info:
        load_yaml_text(text, source="f.yaml")
    assert str(info.value).startswith(f"f.yaml:{line}: duplicate key")


@pytest.mark.parametrize("text, value", [("1.0e9", 1e9), ("1e9", 1e9), ("-2E-3", -0.002), ("1.5", 1.5), (".5", 0.5),
                                         ("100000000", 100000000), ("1_000", 1000), (".inf", float("inf")),
                                         ("'1e9'", "1e9"), ("1e", "1e"), ("e9", "e9"),
                                         # YAML 1.1 (PyYAML) reads these as 8, 90 and 5430.5
                                         ("010", 10), ("08", 8), ("1:30", "1:30"), ("1:30:30.5", "1:30:30.5"),
                                         ("0o10", 8), ("-0x1F", -31), ("0b101", 5), ("0o", "0o"), ("0x_1", "0x_1")])
def test_numbers_follow_yaml_1_2(text, value):
    assert load_yaml_text(f"v: {text}\n") == {"v": value}


def test_safe_loading_only():
    with pytest.raises(YamlError, match="not valid YAML"):
        load_yaml_text("!!python/object/apply:os.system ['true']\n")


def test_dump_round_trips_number_like_strings():
    data = {"salt": "1e3", "gb": 1e9, "s": "1.5", "n": 3, "flag": True, "none": None,
            "t": "1:30", "o": "0o7", "z": "010", "f": "1:30.5"}
    text = dump_yaml(data)
    assert load_yaml_text(text) == data
    import yaml
    assert yaml.safe_load(text) == data   # a YAML 1.1 reader elsewhere gets the strings too


def test_unusable_files_name_the_file(tmp_path):
    cases = {"bin.yaml": b"\x00\x01", "latin.yaml": b"a: \xe9\n", "bad.yaml": b"a: [1\n"}
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
    for name, match in (("bin.yaml", "binary data"), ("latin.yaml", "not UTF-8"), ("bad.yaml", "not valid YAML"),
                        ("missing.yaml", "no such file"), (".", "is a folder")):
        path = tmp_path / name
        with pytest.raises(YamlError) as info:
            load_yaml_file(path)
        assert str(info.value).startswith(str(path)) and match in str(info.value) and "\n" not in str(info.value)
    (tmp_path / "bom.yaml").write_bytes(b"\xef\xbb\xbfa: 1\n")
    assert load_yaml_file(tmp_path / "bom.yaml") == {"a": 1}


def test_a_settings_file_too_large_to_parse_cheaply_is_refused_unparsed(tmp_path, monkeypatch):
    """PyYAML's nodes take hundreds of times a file's bytes: the cap keeps a mistaken (or hostile) file of
    short items from costing gigabytes (a 2 MiB one took about 0.9 GB before the cap came down from 16 MiB)."""
    from lmdeploy_hostcache import yamlio
    from lmdeploy_hostcache.yamlio import MAX_YAML_BYTES

    big = tmp_path / "big.yaml"
    big.write_text("- 1\n" * (MAX_YAML_BYTES // 4 + 1))
    parse = yamlio.load_yaml_text
    with monkeypatch.context() as m:
        m.setattr(yamlio, "load_yaml_text", lambda *a, **k: pytest.fail("the oversized file was parsed"))
        with pytest.raises(YamlError, match="larger than 256 KiB: not a settings file"):
            load_yaml_file(big)
    assert yamlio.load_yaml_text is parse
    fits = tmp_path / "fits.yaml"
    fits.write_text("- 1\n" * (MAX_YAML_BYTES // 4))
    assert len(load_yaml_file(fits)) == MAX_YAML_BYTES // 4
