"""Docs cannot drift: README's config table, the example YAML, the two top commands, the docs index."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from lmdeploy_hostcache import cli
from lmdeploy_hostcache.config import HostCacheConfig, markdown_reference

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
EXAMPLE = ROOT / "examples" / "hostcache.yaml"

SETUP_AND_PLAN = "bash scripts/setup.sh && .venv/bin/lmdeploy-hostcache plan"
SETUP_AND_TEST = "bash scripts/setup.sh && bash .ci/test"


def _table_rows(text: str) -> dict[str, str]:
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\| `([a-z_]+)` \|", line)
        if m:
            rows[m.group(1)] = line
    return rows


def test_readme_config_table_is_the_generated_one():
    assert markdown_reference() in README, (
        "README's configuration table differs from lmdeploy_hostcache/config.py: "
        "regenerate it with `python -m lmdeploy_hostcache.config`")


def test_every_field_in_readme_table_and_example():
    rows = _table_rows(README)
    example_text = EXAMPLE.read_text()
    example_keys = list(yaml.safe_load(example_text))
    for name in HostCacheConfig.field_names():
        assert name in rows, f"{name} missing from README's configuration table"
        assert name in example_keys, f"{name} missing from examples/hostcache.yaml"
        # each key in the example is preceded by a comment line
        lines = example_text.splitlines()
        i = next(i for i, line in enumerate(lines) if line.startswith(f"{name}:"))
        assert lines[i - 1].startswith("#"), f"{name} in examples/hostcache.yaml has no comment"
    assert set(example_keys) == set(HostCacheConfig.field_names())


def test_example_is_valid_and_shows_the_defaults():
    assert HostCacheConfig.from_yaml(EXAMPLE) == HostCacheConfig()


def test_readme_opens_with_exactly_the_two_commands():
    blocks = re.findall(r"```(?:bash)?\n(.*?)```", README, flags=re.S)
    assert blocks[0].strip().splitlines() == [SETUP_AND_PLAN, SETUP_AND_TEST]
    before = README[:README.index("```")]
    assert before.strip().splitlines() == ["# lmdeploy-hostcache"], "nothing but the title before the commands"


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "set -euo pipefail" in ci
    commands = [line for line in ci.splitlines() if line.strip() and not line.startswith("#")]
    assert SETUP_AND_TEST in commands


def test_readme_mentions_every_command_and_links_every_doc():
    for name in cli.COMMANDS:
        assert f"lmdeploy-hostcache {name}" in README, name
    for name in cli.BENCH_COMMANDS:
        assert f"lmdeploy-hostcache bench {name}" in README, name
    for doc in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{doc.name})" in README, f"README's Docs section does not link docs/{doc.name}"
    assert "NOT YET VERIFIED ON A GPU" in README
    assert ("lmdeploy serve api_server MODEL --backend pytorch --enable-prefix-caching --host-cache-gb 64"
            in README)
