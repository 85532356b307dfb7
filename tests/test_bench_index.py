"""Smoke test of ``lmdeploy-hostcache bench index`` on a tiny prompt (real LMDeploy scheduler on CPU)."""
from __future__ import annotations

import argparse
import json

import pytest

pytest.importorskip("lmdeploy.pytorch.paging.scheduler")

from lmdeploy_hostcache.bench import index as bench_index  # noqa: E402
from lmdeploy_hostcache.cli import main  # noqa: E402

SMALL = ["--blocks", "8", "--block-size", "16", "--repeats", "3", "--metadata-blocks", "64"]


def test_json_has_the_required_keys_and_a_measured_ratio(capsys):
    assert main(["bench", "index", "--json", *SMALL]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("host_lookup_us_per_block", "blocktrie_match_us_per_block", "lookup_ratio",
                "metadata_bytes_per_block"):
        assert out[key] > 0, key
    assert out["lookup_ratio"] == pytest.approx(
        out["host_lookup_us_per_block"] / out["blocktrie_match_us_per_block"])
    # the stored tokens alone are block_size * 4 bytes: the measurement cannot be below that
    assert out["metadata_bytes_per_block"] > 16 * 4
    assert (out["blocks"], out["block_size"], out["prompt_tokens"]) == (8, 16, 8 * 16 + 1)


def test_table_output(capsys):
    assert main(["bench", "index", *SMALL]) == 0
    text = capsys.readouterr().out
    assert "lookup_ratio" in text and "BlockTrie.match" in text and "metadata" in text


@pytest.mark.parametrize("flag, value", [("--blocks", "0"), ("--repeats", "0"), ("--block-size", "-1")])
def test_bad_arguments_name_the_flag(flag, value, capsys):
    assert main(["bench", "index", flag, value]) == 2
    assert flag in capsys.readouterr().err


def test_metadata_measurement_counts_what_the_index_keeps():
    from lmdeploy_hostcache.tier.digest import Namespace

    ns = Namespace(model="m", block_size=64)
    r = bench_index.measure_metadata_bytes(ns, num_blocks=256, prompt_blocks=64, seed=0, vocab=1000)
    assert r["metadata_blocks_measured"] == 256
    assert r["metadata_bytes_per_block"] >= 64 * 4 + 100  # tokens + at least a HostBlock and a dict entry
    assert r["metadata_bytes_per_block"] == pytest.approx(
        r["metadata_bytes_per_block_excl_empty_index"] + r["metadata_empty_index_bytes_per_slot"])


def test_parser_defaults_match_the_issue():
    p = argparse.ArgumentParser()
    bench_index.add_arguments(p)
    args = p.parse_args([])
    assert (args.blocks, args.block_size) == (512, 64)


def test_scale_reports_the_slowest_touch_and_bytes_per_block(capsys):
    """``--scale N``: N single-block chains per policy, every block touched 4 times; the figures are this run's."""
    assert main(["bench", "index", "--json", *SMALL, "--scale", "3000", "--scale-policies", "lru", "arc"]) == 0
    rows = json.loads(capsys.readouterr().out)["scale"]
    assert [r["policy"] for r in rows] == ["lru", "arc"]
    for r in rows:
        assert r["blocks"] == 3000 and r["touches"] == 12000
        assert 0 < r["mean_touch_us"] and r["mean_touch_us"] / 1e3 <= r["slowest_touch_ms"]
        assert 100 < r["bytes_per_block_after_touches"] < 10_000
    assert main(["bench", "index", *SMALL, "--scale", "100", "--scale-policies", "nope"]) == 2
    assert "--scale-policies" in capsys.readouterr().err
