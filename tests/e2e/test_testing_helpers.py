"""The testing helpers themselves: shim isolation, tiny checkpoints, token comparison (fast)."""
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from lmdeploy_hostcache.testing.compare import compare_token_outputs
from lmdeploy_hostcache.testing.models import BOS_ID, EOS_ID, text_ids, write_tiny_model

PY = sys.executable

_PROBE = textwrap.dedent("""
    import json, os, sys, threading
    import lmdeploy_hostcache
    import lmdeploy
    from lmdeploy import PytorchEngineConfig
    import lmdeploy.pytorch.engine  # the engine package, kernels included
    import torch
    from lmdeploy_hostcache.testing import cpu_shim
    state = lambda: dict(installed=cpu_shim.is_installed(), device_count=torch.cuda.device_count(),
                         stream_module=torch.cuda.Stream.__module__,
                         thread_run_module=threading.Thread.run.__module__,
                         check_env=os.environ.get("LMDEPLOY_ENABLE_CHECK_ENV"),
                         hook_active="host_cache_gb" in PytorchEngineConfig.__init__.__code__.co_varnames
                         or hasattr(PytorchEngineConfig.__init__, "__wrapped__"))
    before = state()
    out = dict(before=before)
    if sys.argv[1] == "install":
        cpu_shim.install(); cpu_shim.install()  # idempotent
        out["after"] = state()
    print(json.dumps(out))
""")


def _probe(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LMDEPLOY_ENABLE_CHECK_ENV"}
    env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([PY, "-c", _PROBE, mode], capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_importing_package_and_lmdeploy_does_not_install_the_shim():
    out = _probe("install")
    before, after = out["before"], out["after"]
    assert before["hook_active"], "the post-import hook should have activated the extension"
    assert before == dict(installed=False, device_count=0, stream_module="torch.cuda.streams",
                          thread_run_module="threading", check_env=None, hook_active=True)
    # the same probe sees the shim once it is installed explicitly (the check can fail)
    assert after["installed"] and after["device_count"] == 1
    assert after["stream_module"] == "lmdeploy_hostcache.testing.cpu_shim"
    assert after["thread_run_module"] == "lmdeploy_hostcache.testing.cpu_shim"
    assert after["check_env"] == "0"


def test_production_code_never_imports_testing():
    """Nothing LMDeploy loads imports the testing helpers; the sanctioned references are the CLI's
    entries of the harness tools, the `soak` command, `bench capture` and `bench step` (their modules
    import the harness only when the command runs)."""
    root = os.path.join(os.path.dirname(__file__), "..", "..", "lmdeploy_hostcache")
    allowed = {"cli.py": ('"soak": ("lmdeploy_hostcache.testing.soak",',
                          '"capture": ("lmdeploy_hostcache.testing.capture_bench",',
                          '"step": ("lmdeploy_hostcache.testing.step_bench",')}
    offenders = []
    for dirpath, _, files in os.walk(root):
        if os.path.basename(dirpath) == "testing":
            continue
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                with open(path) as fh:
                    lines = fh.read().splitlines()
                for line in lines:
                    if "lmdeploy_hostcache.testing" in line or "from ..testing" in line or "from .testing" in line:
                        if os.path.dirname(os.path.abspath(path)) == os.path.abspath(root) \
                                and any(a in line for a in allowed.get(name, ())):
                            continue
                        offenders.append(f"{path}: {line.strip()}")
    assert not offenders


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_model_and_tokenizer_round_trip(tmp_path, arch):
    from transformers import AutoConfig, AutoTokenizer

    path = write_tiny_model(tmp_path / arch, arch, seed=3)
    cfg = AutoConfig.from_pretrained(path)
    assert cfg.model_type == arch and cfg.num_hidden_layers == 2 and cfg.hidden_size == 64
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    text = "the cat sat on 42 mats, didn't it?\nyes"
    ids = tok.encode(text)
    assert ids == text_ids(text) and tok.decode(ids) == text
    assert (tok.bos_token_id, tok.eos_token_id) == (BOS_ID, EOS_ID)
    assert len(tok) == cfg.vocab_size
    # every id the model can emit decodes to something
    assert all(tok.decode([i]) for i in range(32, cfg.vocab_size) if i != 127)
    # chat: each turn's rendering is a token prefix of the next one's
    msgs = [{"role": "user", "content": "hello there"}]
    first = tok.encode(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    msgs += [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "again"}]
    second = tok.encode(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    assert second[:len(first)] == first and len(second) > len(first)


def test_tiny_model_is_deterministic_and_seeded(tmp_path):
    a = write_tiny_model(tmp_path / "a", tokenizer=False, seed=1)
    b = write_tiny_model(tmp_path / "b", tokenizer=False, seed=1)
    c = write_tiny_model(tmp_path / "c", tokenizer=False, seed=2)
    read = lambda p: (p / "model.safetensors").read_bytes()  # noqa: E731
    assert read(a) == read(b) != read(c)


def test_tiny_model_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="arch"):
        write_tiny_model(tmp_path, "gpt2")
    with pytest.raises(ValueError, match="num_key_value_heads"):
        write_tiny_model(tmp_path, num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="vocab_size"):
        write_tiny_model(tmp_path, vocab_size=100)


def test_compare_identical_and_different():
    ref = {"a": [1, 2, 3], "b": [4, 5]}
    same = compare_token_outputs(ref, {"a": [1, 2, 3], "b": [4, 5]})
    assert same.identical and same.agreement == 1.0 and same.total_tokens == 5 and not same.first_difference
    diff = compare_token_outputs(ref, {"a": [1, 9, 3], "b": [4, 5, 6]})
    assert not diff.identical
    assert diff.mismatching_requests == ("a", "b")
    assert diff.first_difference == {"a": 1, "b": 2}
    assert diff.total_tokens == 6 and diff.matching_tokens == 4 and diff.prefix_matching_tokens == 3
    assert diff.agreement == pytest.approx(4 / 6) and diff.prefix_agreement == pytest.approx(3 / 6)
    d = diff.to_dict()
    assert json.loads(json.dumps(d)) == d and d["identical"] is False


def test_compare_missing_extra_and_bad_input():
    cmp = compare_token_outputs({"a": [1], "b": [2, 3]}, {"a": [1], "c": [7]})
    assert cmp.missing_requests == ("b",) and cmp.extra_requests == ("c",)
    assert cmp.first_difference == {"b": 0} and not cmp.identical
    assert not compare_token_outputs({"a": [1]}, {"a": [1], "z": []}).identical
    assert compare_token_outputs({}, {}).agreement == 1.0
    with pytest.raises(TypeError, match=r"candidate\['a'\]\[0\]"):
        compare_token_outputs({"a": [1]}, {"a": ["x"]})
    with pytest.raises(TypeError, match="sequence of token ids"):
        compare_token_outputs({"a": "abc"}, {"a": [1]})


def test_engine_runner_refuses_bad_specs_naming_the_field(tmp_path):
    from lmdeploy_hostcache.testing.engine_runner import SpecError, multi_turn_script, validate_spec

    good = dict(model="m", runs=[dict(name="a")], script=multi_turn_script(conversations=1, turns=1))
    assert validate_spec(good)["model"] == "m"
    bad = [
        (dict(good, model=""), "spec.model"),
        (dict(good, runs=[]), "spec.runs"),
        (dict(good, runs=[dict(name="a"), dict(name="a")]), r"spec.runs\[1\].name"),
        (dict(good, runs=[dict(name="a", inject="boom")]), r"spec.runs\[0\].inject"),
        (dict(good, runs=[dict(name="a", enigne={})]), "unknown keys"),
        (dict(good, script=[dict(conv="A", new=[])]), r"spec.script\[0\].new"),
        (dict(good, script=[dict(conv="A", new=[1], max_new_tokens=0)]), r"spec.script\[0\].max_new_tokens"),
        (dict(good, script=[dict(conv="A", new=[1], wave="0")]), r"spec.script\[0\].wave"),
        (dict(good, script=[dict(conv="A", new=[1], wave=0), dict(conv="A", new=[2], wave=0)]),
         "wave 0 has more than one turn of one conversation"),
        (dict(good, batch_invariant=1), "spec.batch_invariant must be true or false"),
        (dict(good, batch_invariant=True, cpu_shim=False), "spec.batch_invariant needs the CPU shim"),
    ]
    for spec, field in bad:
        with pytest.raises(SpecError, match=field):
            validate_spec(spec)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(dict(good, runs=[])))
    proc = subprocess.run([PY, "-m", "lmdeploy_hostcache.testing.engine_runner", str(path), str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {path}: spec.runs must be a non-empty list"]


@pytest.mark.e2e
def test_engine_runner_fails_a_request_the_engine_refused(tmp_path):
    """A prompt longer than the GPU cache holds is refused by LMDeploy (INPUT_LENGTH_ERROR) with no tokens: the
    runner fails, naming the request, instead of handing back an empty output that compares as a mismatch (or
    as agreement with another engine refused the same way)."""
    from lmdeploy_hostcache.testing.engine_runner import multi_turn_script, run_in_subprocess

    model = str(write_tiny_model(tmp_path / "tinylm", "llama", seed=0))
    script = multi_turn_script(conversations=1, turns=1, first_tokens=40, max_new_tokens=1, seed=0)
    spec = dict(model=model, fake_sms=2, threads=1, script=script, disable_extension=True,
                runs=[dict(name="tiny", engine=dict(num_gpu_blocks=3))])
    with pytest.raises(RuntimeError, match=r"run 'tiny': request A0 \(4\d prompt tokens\) ended with INPUT_LENGTH_ERROR"):
        run_in_subprocess(spec, timeout=300)


def test_engine_runner_groups_consecutive_turns_of_a_wave():
    from lmdeploy_hostcache.testing.engine_runner import _waves, validate_spec

    script = [dict(conv=c, new=[1], wave=w) for c, w in (("A", 0), ("B", 0), ("A", 1), ("B", None), ("C", None),
                                                         ("A", 0), ("B", 0))]
    assert [[t["conv"] for t in g] for g in _waves(script)] == [["A", "B"], ["A"], ["B"], ["C"], ["A", "B"]]
    # the same wave number again later is a new group: a conversation may then have a turn in each
    assert validate_spec(dict(model="m", runs=[dict(name="a")], script=script))["script"] == script


def test_multi_turn_script_is_deterministic_round_robin():
    from lmdeploy_hostcache.testing.engine_runner import multi_turn_script

    s = multi_turn_script(conversations=3, turns=2, first_tokens=5, later_tokens=2, max_new_tokens=2, seed=4)
    assert [t["conv"] for t in s] == ["A", "B", "C", "A", "B", "C"]
    assert [len(t["new"]) for t in s] == [5, 5, 5, 2, 2, 2]
    assert s == multi_turn_script(conversations=3, turns=2, first_tokens=5, later_tokens=2, max_new_tokens=2, seed=4)
    assert all(32 <= x < 127 for t in s for x in t["new"])


def test_server_helpers_free_port_and_process_group():
    from lmdeploy_hostcache.testing.server import free_port, group_processes

    port = free_port()
    assert 0 < port < 65536
    proc = subprocess.Popen([PY, "-c", "import time; time.sleep(30)"], start_new_session=True)
    try:
        assert group_processes(proc.pid) == [proc.pid]
    finally:
        proc.kill()
        proc.wait()
    assert group_processes(proc.pid) == []


def test_children_die_with_a_killed_parent():
    """A runner killed before its finally (timeout's SIGKILL) must not leave a server behind."""
    code = textwrap.dedent("""
        import subprocess, sys, time
        from lmdeploy_hostcache.testing.server import die_with_parent
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             start_new_session=True, preexec_fn=die_with_parent)
        print(p.pid, flush=True)
        time.sleep(60)
    """)
    parent = subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert os.path.exists(f"/proc/{child}")
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.1)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
