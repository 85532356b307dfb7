"""Output files are written whole or not at all, never over an input, and checked before a run without being
created (bad-input audit, stop 43: a full disk left a truncated plot and soak JSON in place of good ones)."""
from __future__ import annotations

import errno
import gzip
import json
import os
from pathlib import Path

import pytest

from lmdeploy_hostcache import cli, outfile

REPO = Path(__file__).resolve().parents[1]


def _disk_full(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_write_that_fails_part_way_keeps_the_old_file_and_leaves_no_part(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old and good")
    with pytest.raises(OSError):
        with outfile.replacing(path) as fh:
            fh.write("new but ")
            _disk_full()
    assert path.read_text() == "old and good" and os.listdir(tmp_path) == ["out.json"]
    outfile.write_text(path, "new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["out.json"]
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()   # as open(path, "w") would make it


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_output_problem_names_what_is_wrong_and_creates_nothing(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    assert outfile.output_problem(tmp_path / "new.json") is None
    assert "does not exist" in outfile.output_problem(tmp_path / "no" / "x.json")
    assert outfile.output_problem(tmp_path / "dir") == "it is a folder, not a regular file"
    assert "FIFO" in outfile.output_problem(tmp_path / "fifo")
    assert sorted(os.listdir(tmp_path)) == ["dir", "fifo"]


def _trace(tmp_path, name="t.jsonl") -> Path:
    p = tmp_path / name
    with gzip.open(REPO / "lmdeploy_hostcache" / "data" / "conversation_trace.jsonl.gz", "rt") as fh:
        p.write_text("".join(next(fh) for _ in range(60)))
    return p


def test_a_plot_that_fails_to_write_keeps_the_previous_plot(tmp_path, capsys, monkeypatch):
    import matplotlib.figure

    trace, png = _trace(tmp_path), tmp_path / "s.png"
    argv = ["plan", str(trace), "--quiet", "--sweep", "--sweep-values", "0,10", "--plot", str(png)]
    assert cli.main(argv) == 0
    good = png.read_bytes()
    real = matplotlib.figure.Figure.savefig

    def half_then_full(self, fh, **kw):
        real(self, fh, **kw)
        fh.truncate(len(good) // 2)
        _disk_full()
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_then_full)
    assert cli.main(argv) == 2
    assert "cannot write the plot (No space left on device)" in capsys.readouterr().err
    assert png.read_bytes() == good and sorted(os.listdir(tmp_path)) == ["s.png", "t.jsonl"]


@pytest.mark.parametrize("command", [["plan", "--sweep", "--sweep-values", "0,10"], ["bench", "eviction", "--trace"]])
def test_a_plot_path_that_is_an_input_is_refused_before_anything_runs(tmp_path, capsys, command):
    trace = _trace(tmp_path, "t.png")
    before = trace.read_bytes()
    assert cli.main([*command, str(trace), "--plot", str(trace)]) == 2
    err = capsys.readouterr().err
    assert f"--plot {trace} is the input {trace}: writing it would destroy it" in err and "Traceback" not in err
    assert trace.read_bytes() == before


def test_soak_checks_its_json_path_without_creating_it(tmp_path, capsys, monkeypatch):
    from lmdeploy_hostcache.testing import soak

    # a budget no scenario finishes in (a real 0.01 s budget may or may not fit one, by how warm imports are)
    monkeypatch.setattr(soak, "soak", lambda seconds, seed, workers, **k: soak.summarize(
        [], seconds=seconds, seed=seed, workers=workers, wall_s=seconds))
    out = tmp_path / "soak.json"
    assert cli.main(["soak", "--seconds", "0.01", "--json", str(out)]) == 1
    captured = capsys.readouterr()
    assert "no scenario finished in the 0.01 s given" in captured.err
    assert captured.out.startswith("soak: 0 scenarios"), "the summary line comes before the file"
    assert json.loads(out.read_text())["totals"]["scenarios"] == 0
    assert cli.main(["soak", "--seconds", "1", "--json", str(tmp_path / "no" / "soak.json")]) == 2
    assert cli.main(["soak", "--seconds", "1", "--json", ""]) == 2
    assert "an empty path" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["soak.json"]
