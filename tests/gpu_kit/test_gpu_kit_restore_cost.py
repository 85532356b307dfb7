"""min_restore_tokens: auto — the restore-or-recompute threshold and its calibration file."""
from __future__ import annotations

import json

import pytest

from lmdeploy_hostcache import restore_cost as rc

LLAMA8B_FP16_TOKEN = 32 * 8 * 128 * 2 * 2  # layers x KV heads x head_dim x (K, V) x 2 bytes


def _model(n, cal, bpt):
    restore = cal.restore_overhead_ms / 1e3 + n * bpt / (cal.restore_gbps * 1e9)
    recompute = n / cal.prefill_tokens_per_s
    return restore, recompute


@pytest.mark.parametrize("gbps,rate,ms,bpt", [(20, 10_000, 20, LLAMA8B_FP16_TOKEN), (50, 40_000, 8, 65536),
                                              (5, 2_000, 1, 4096), (25, 100_000, 30, 131072)])
def test_threshold_is_where_restore_starts_to_win(gbps, rate, ms, bpt):
    cal = rc.RestoreCalibration(gbps, rate, ms)
    n = rc.threshold_tokens(cal, bpt)
    assert 0 < n < rc.NEVER
    r, c = _model(n, cal, bpt)
    assert r < c                       # at the threshold restoring wins
    r, c = _model(n - 1, cal, bpt)
    assert r >= c                      # one token less it does not
    assert rc.should_restore(n, cal, bpt) and not rc.should_restore(n - 1, cal, bpt)


def test_assumed_default_for_an_8b_fp16_cache():
    # 20 GB/s, 10k tokens/s, 20 ms: 0.02 / (1e-4 - 131072 / 20e9) = 214.06... -> 215 tokens
    assert rc.threshold_tokens(rc.ASSUMED, LLAMA8B_FP16_TOKEN) == 215
    assert "assumed" in rc.ASSUMED.source and "not measured" in rc.ASSUMED.source


def test_never_when_copying_costs_more_than_computing():
    cal = rc.RestoreCalibration(restore_gbps=1.0, prefill_tokens_per_s=1e6, restore_overhead_ms=1)
    assert rc.threshold_tokens(cal, 1e6) == rc.NEVER
    assert not rc.should_restore(10 ** 9, cal, 1e6)


@pytest.mark.parametrize("gbps,rate,ms", [(20, 10_000, 1e308), (1e300, 1e300, 1e300)])
def test_finite_figures_whose_threshold_overflows_mean_never_not_a_crash(gbps, rate, ms):
    """Finite calibration figures can make the threshold inf (it was int(inf): OverflowError in the
    engine's connector, after start-up had accepted the file)."""
    cal = rc.RestoreCalibration(gbps, rate, ms)
    assert rc.threshold_tokens(cal, LLAMA8B_FP16_TOKEN) == rc.NEVER
    assert rc.resolve_min_restore_tokens("auto", LLAMA8B_FP16_TOKEN, cal) == rc.NEVER


def test_zero_overhead_restores_every_hit_and_unknown_bytes_fall_back():
    cal = rc.RestoreCalibration(20, 10_000, 0)
    assert rc.threshold_tokens(cal, 1000) == 1
    assert rc.threshold_tokens(cal, 0) == rc.FALLBACK_TOKENS == 256


def test_resolve_numbers_and_auto(tmp_path, monkeypatch):
    monkeypatch.delenv(rc.ENV_CALIBRATION, raising=False)
    assert rc.resolve_min_restore_tokens(128, LLAMA8B_FP16_TOKEN) == 128
    assert rc.resolve_min_restore_tokens("auto", LLAMA8B_FP16_TOKEN) == 215
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"restore_gbps": 50, "prefill_tokens_per_s": 40_000, "restore_overhead_ms": 8,
                                "gpu": "X", "model": "m"}))
    monkeypatch.setenv(rc.ENV_CALIBRATION, str(path))
    cal = rc.load_calibration()
    assert cal.source == str(path) and cal.restore_gbps == 50.0
    assert rc.resolve_min_restore_tokens("auto", 65536) == rc.threshold_tokens(cal, 65536)
    assert rc.resolve_min_restore_tokens("auto", 65536) != rc.threshold_tokens(rc.ASSUMED, 65536)


@pytest.mark.parametrize("content,needle", [
    (None, "cannot read"), ("{not json", "not a JSON"), ("[1, 2]", "a JSON object"),
    ('{"restore_gbps": 1, "prefill_tokens_per_s": 1}', "missing field restore_overhead_ms"),
    ('{"restore_gbps": -1, "prefill_tokens_per_s": 1, "restore_overhead_ms": 1}', "restore_gbps: got -1"),
    ('{"restore_gbps": 1, "prefill_tokens_per_s": 0, "restore_overhead_ms": 1}', "prefill_tokens_per_s"),
    ('{"restore_gbps": "fast", "prefill_tokens_per_s": 1, "restore_overhead_ms": 1}', "restore_gbps"),
])
def test_bad_calibration_files_name_the_file_and_field(tmp_path, content, needle):
    path = tmp_path / "cal.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(rc.CalibrationError) as err:
        rc.load_calibration(str(path))
    assert needle in str(err.value) and str(path) in str(err.value)


def test_a_calibration_field_given_twice_is_refused_naming_it(tmp_path):
    """json keeps the last of two values silently; a calibration is refused instead, as a YAML file is."""
    p = tmp_path / "calibration.json"
    p.write_text('{"restore_gbps": 20, "prefill_tokens_per_s": 10000, "restore_overhead_ms": 20, "restore_gbps": 2}')
    with pytest.raises(rc.CalibrationError, match="field 'restore_gbps' is given twice"):
        rc.load_calibration(str(p))
