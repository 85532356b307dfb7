"""Options that a mode of ``plan`` would accept and then ignore are refused (audit of 2026-12-05).

``--sweep`` replays each request at once (no request lifetimes), so the single run's concurrency options
(``--host-write-s``, ``--decode-tokens-per-s``, ``--no-concurrency``) would change nothing: refused as
``--cluster`` refuses them.  ``--l3-gbps`` only sets the rate of the shared store's estimate, which runs
with ``--l3-gb``: without it the option would do nothing.  Each refusal is one ``error:`` line, exit 2.
"""
import json
from pathlib import Path

import pytest

from lmdeploy_hostcache.cli import main

REPO = Path(__file__).resolve().parents[2]
CHAT = ["--chat", "--chat-sessions", "20", "--limit", "200", "--chat-block-size", "64", "--quiet"]
SWEEP = ["--gpu-blocks", "60", "--host-blocks", "200", "--sweep", "--sweep-values", "0,200"]


def _run(capsys, argv):
    rc = main(["plan", *argv])
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err
    return rc, cap.out, cap.err


@pytest.mark.parametrize("extra, named", [
    (["--host-write-s", "5"], "--host-write-s"),
    (["--host-write-s", "0"], "--host-write-s"),          # given at all, its default value included
    (["--decode-tokens-per-s", "0.5"], "--decode-tokens-per-s"),
    (["--no-concurrency"], "--no-concurrency"),
    (["--host-write-s", "5", "--decode-tokens-per-s", "0.5", "--no-concurrency"],
     "--no-concurrency, --decode-tokens-per-s, --host-write-s"),
])
def test_sweep_refuses_the_concurrency_options_it_would_ignore(capsys, tmp_path, extra, named):
    rc, out, err = _run(capsys, [*CHAT, *SWEEP, "--plot", str(tmp_path / "p.png"), *extra])
    assert rc == 2 and out == "", err
    assert err == (f"error: --sweep replays each request at once, without request lifetimes: drop {named} "
                   "(they set a single run's concurrency replay)\n"), err
    assert not (tmp_path / "p.png").exists()


def test_the_concurrency_options_still_act_on_a_single_run(capsys):
    rc, out, err = _run(capsys, [*CHAT, "--gpu-blocks", "60", "--host-blocks", "200", "--json",
                                 "--host-write-s", "5", "--decode-tokens-per-s", "0.5"])
    assert rc == 0, err
    conc = json.loads(out)["with_concurrency"]
    assert conc["host_write_s"] == 5 and conc["lifetimes"]["decode_tokens_per_s"] == 0.5
    rc, out, err = _run(capsys, [*CHAT, "--gpu-blocks", "60", "--host-blocks", "200", "--json", "--no-concurrency"])
    assert rc == 0 and "with_concurrency" not in json.loads(out), err


def _cluster(tmp_path) -> Path:
    y = tmp_path / "c.yaml"
    y.write_text("routing: session\nmin_restore_tokens: 0\nnodes:\n  - {name: a, gpu_kv_gb: 1, host_gb: 4}\n"
                 "  - {name: b, gpu_kv_gb: 1, host_gb: 4}\n")
    return y


def test_l3_gbps_without_l3_gb_is_refused(capsys, tmp_path):
    rc, out, err = _run(capsys, [*CHAT, "--cluster", str(_cluster(tmp_path)), "--l3-gbps", "0.001", "--json"])
    assert rc == 2 and out == "", err
    assert err.startswith("error: --l3-gbps") and "add --l3-gb" in err and err.count("\n") == 1, err
    # without --cluster the store is refused as before, naming --cluster
    rc, _, err = _run(capsys, [*CHAT, "--l3-gbps", "0.001"])
    assert rc == 2 and "give --cluster YAML" in err and err.count("\n") == 1, err


def test_l3_gbps_with_l3_gb_sets_the_store_rate(capsys, tmp_path):
    rc, out, err = _run(capsys, [*CHAT, "--cluster", str(_cluster(tmp_path)), "--l3-gb", "2", "--l3-gbps", "0.5",
                                 "--json"])
    assert rc == 0, err
    l3 = json.loads(out)["l3"]
    assert l3["l3_gbps"] == 0.5
