"""Start-up refusals (integration/compat.py), directly and through LMDeploy's own code paths."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from lmdeploy_hostcache.integration.compat import (
    CONNECTOR_NAME,
    UnsupportedConfiguration,
    check_model_supported,
    check_supported,
)

pytest.importorskip("lmdeploy")
from lmdeploy.messages import KVTransferConfig  # noqa: E402
from lmdeploy.pytorch.config import CacheConfig, DistConfig  # noqa: E402
from lmdeploy.pytorch.disagg.config import EngineRole  # noqa: E402


def _cache_config(**overrides) -> CacheConfig:
    tc = overrides.pop("kv_transfer_config", None) or KVTransferConfig(
        kv_connector=CONNECTOR_NAME, kv_role="kv_both",
        kv_connector_extra_config={"hostcache_config": {"host_cache_gb": 1}})
    kwargs = dict(max_batches=4, block_size=64, num_cpu_blocks=0, num_gpu_blocks=0,
                  enable_prefix_caching=True, kv_transfer_config=tc)
    kwargs.update(overrides)
    return CacheConfig(**kwargs)


def _reasons(exc_info) -> str:
    return "\n".join(exc_info.value.reasons)


def test_supported_configuration_passes():
    check_supported(_cache_config(), dist_config=DistConfig(), distributed_executor_backend="uni")
    check_model_supported(_cache_config(), model_config=SimpleNamespace(states_shapes=[], sliding_window=-1),
                          misc_config=SimpleNamespace(memdecode_config=None))


@pytest.mark.parametrize("overrides, needle", [
    ({"enable_prefix_caching": False}, "prefix caching is off"),
    ({"num_cpu_blocks": 16}, "num_cpu_blocks=16"),
    ({"role": EngineRole.Prefill}, "role Prefill"),
    ({"role": EngineRole.Decode}, "role Decode"),
    ({"states_shapes": [((4, 8), "float16")]}, "SSM"),
    ({"device_type": "ascend"}, "device_type 'ascend': the host tier runs on CUDA only"),
])
def test_each_cache_setting_is_refused_with_its_name(overrides, needle):
    with pytest.raises(UnsupportedConfiguration) as exc_info:
        check_supported(_cache_config(**overrides), dist_config=DistConfig())
    assert needle in _reasons(exc_info)
    assert len(exc_info.value.reasons) == 1


def test_window_attention_is_refused():
    cfg = _cache_config()
    cfg.window_size = 4096  # what ExecutorBase sets from model_config.sliding_window
    with pytest.raises(UnsupportedConfiguration, match="window attention"):
        check_supported(cfg)


def test_mp_executor_with_tp_is_refused_but_ray_and_single_gpu_pass():
    dist = SimpleNamespace(world_size=2)
    with pytest.raises(UnsupportedConfiguration, match="distributed_executor_backend='mp'"):
        check_supported(_cache_config(), dist_config=dist, distributed_executor_backend="mp")
    check_supported(_cache_config(), dist_config=dist, distributed_executor_backend="ray")
    check_supported(_cache_config(), dist_config=SimpleNamespace(world_size=1), distributed_executor_backend="mp")


def test_role_other_than_kv_both_is_refused():
    tc = KVTransferConfig(kv_connector=CONNECTOR_NAME, kv_role="kv_consumer")
    with pytest.raises(UnsupportedConfiguration, match="kv_role is 'kv_consumer'"):
        check_supported(_cache_config(kv_transfer_config=tc))


def test_another_connectors_settings_are_refused():
    tc = KVTransferConfig(kv_connector=CONNECTOR_NAME, kv_role="kv_both",
                          kv_connector_extra_config={"mooncake_config_path": "/etc/mc.json", "host_cache_gb": 2})
    with pytest.raises(UnsupportedConfiguration, match="mooncake_config_path"):
        check_supported(_cache_config(kv_transfer_config=tc))


def test_every_problem_is_listed_at_once():
    with pytest.raises(UnsupportedConfiguration) as exc_info:
        check_supported(_cache_config(enable_prefix_caching=False, num_cpu_blocks=2, role=EngineRole.Prefill),
                        dist_config=SimpleNamespace(world_size=4), distributed_executor_backend="mp")
    assert len(exc_info.value.reasons) == 4
    assert isinstance(exc_info.value, ValueError)


@pytest.mark.parametrize("model, misc, needle", [
    (SimpleNamespace(states_shapes=[((1,), "f")], sliding_window=-1,
                     hf_config=SimpleNamespace(model_type="qwen3_next")), None, "qwen3_next"),
    (SimpleNamespace(states_shapes=[], sliding_window=4096), None, "sliding_window=4096"),
    (SimpleNamespace(states_shapes=[], sliding_window=-1), SimpleNamespace(memdecode_config=object()), "MemDecode"),
    (SimpleNamespace(states_shapes=[], sliding_window=-1, model_paradigm="dllm"), None, "model_paradigm 'dllm'"),
])
def test_model_dependent_refusals(model, misc, needle):
    with pytest.raises(UnsupportedConfiguration, match=needle):
        check_model_supported(_cache_config(), model_config=model, misc_config=misc)


@pytest.mark.parametrize("paradigm", ["ar", "ar_spec"])
def test_autoregressive_and_speculative_models_are_accepted(paradigm):
    check_model_supported(_cache_config(), model_config=SimpleNamespace(states_shapes=[], sliding_window=-1,
                                                                        model_paradigm=paradigm))


def test_prefix_caching_switched_off_by_lmdeploy_is_refused():
    cfg = _cache_config()
    cfg.enable_prefix_caching = False  # e.g. ExecutorBase._maybe_disable_unsupported_prefix_caching
    with pytest.raises(UnsupportedConfiguration, match="switched prefix caching off"):
        check_model_supported(cfg, model_config=SimpleNamespace(states_shapes=[], sliding_window=-1))


# -- through LMDeploy's own start-up code (the wrappers bound by activate.py) ---------------

@pytest.fixture
def active():
    from lmdeploy_hostcache.integration import activate as act

    st = act.activate()
    if st["status"] != "active":
        pytest.skip(f"activation is {st['status']}: {st['reason']}")
    return act


def test_prepare_kv_connector_config_refuses_before_modifying(active):
    from lmdeploy.pytorch.kv_connector import factory

    cfg = _cache_config(enable_prefix_caching=False,
                        kv_transfer_config=KVTransferConfig(kv_connector=CONNECTOR_NAME, kv_role="kv_both",
                                                            kv_connector_extra_config={"host_cache_gb": 2}))
    before = copy.deepcopy(cfg.kv_transfer_config.kv_connector_extra_config)
    with pytest.raises(UnsupportedConfiguration, match="prefix caching is off"):
        factory.prepare_kv_connector_config(cfg, model_path="/models/x", dist_config=DistConfig(),
                                            distributed_executor_backend="uni")
    assert cfg.kv_transfer_config.kv_connector_extra_config == before


def test_prepare_kv_connector_config_normalises_and_names_the_model(active, tmp_path):
    from lmdeploy.pytorch.kv_connector import factory

    tc = KVTransferConfig(kv_connector=CONNECTOR_NAME, kv_role="kv_both",
                          kv_connector_extra_config={"host_cache_gb": 2, "min_restore_tokens": 64})
    cfg = _cache_config(kv_transfer_config=tc)
    factory.prepare_kv_connector_config(cfg, model_path=str(tmp_path), dist_config=DistConfig(),
                                        distributed_executor_backend="uni")
    extra = cfg.kv_transfer_config.kv_connector_extra_config
    assert set(extra) == {"hostcache_config", "model_identity"}
    assert extra["hostcache_config"]["host_cache_gb"] == 2.0
    assert extra["hostcache_config"]["min_restore_tokens"] == 64
    assert extra["model_identity"] == str(tmp_path.resolve())


def test_prepare_kv_connector_config_names_a_hub_snapshot_by_its_content(active, tmp_path):
    """A Hugging Face cache snapshot (links to blobs/<content hash>) is named by those hashes
    (``model_content_name``), which the digest namespace then uses whatever the path."""
    import hashlib

    from lmdeploy.pytorch.kv_connector import factory

    repo = tmp_path / "models--org--m"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "rev"
    snap.mkdir(parents=True)
    for name, data in (("config.json", b"{}"), ("model.safetensors", b"weights")):
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / name).symlink_to(blob)
    tc = KVTransferConfig(kv_connector=CONNECTOR_NAME, kv_role="kv_both",
                          kv_connector_extra_config={"host_cache_gb": 2, "model_content_name": "stale"})
    cfg = _cache_config(kv_transfer_config=tc)
    factory.prepare_kv_connector_config(cfg, model_path=str(snap), dist_config=DistConfig(),
                                        distributed_executor_backend="uni")
    extra = cfg.kv_transfer_config.kv_connector_extra_config
    assert extra["model_identity"] == str(snap.resolve()) and len(extra["model_content_name"]) == 32
    (snap / "model.safetensors").unlink()
    (snap / "model.safetensors").write_bytes(b"weights")        # a plain copy: no exact name, none left over
    tc.kv_connector_extra_config.pop("model_identity")
    factory.prepare_kv_connector_config(cfg, model_path=str(snap), dist_config=DistConfig(),
                                        distributed_executor_backend="uni")
    assert "model_content_name" not in cfg.kv_transfer_config.kv_connector_extra_config


def test_prepare_kv_connector_config_leaves_other_connectors_to_lmdeploy(active):
    from lmdeploy.pytorch.kv_connector import factory

    cfg = _cache_config(enable_prefix_caching=False, kv_transfer_config=KVTransferConfig())
    factory.prepare_kv_connector_config(cfg)  # stock: no connector, nothing to check
    mooncake = _cache_config(num_cpu_blocks=4, kv_transfer_config=KVTransferConfig(
        kv_connector="MooncakeStoreConnector", kv_role="kv_both"))
    with pytest.raises(ValueError, match="Mooncake Store does not support CPU KV paging"):
        factory.prepare_kv_connector_config(mooncake)


def _executor(cache_config, model_config, misc=None):
    from lmdeploy.pytorch.engine.executor.base import ExecutorBase

    return ExecutorBase("/models/x", model_config, cache_config, backend_config=SimpleNamespace(),
                        dist_config=DistConfig(), misc_config=misc or SimpleNamespace(memdecode_config=None))


def test_executor_init_refuses_sliding_window_model(active):
    model = SimpleNamespace(sliding_window=4096, states_shapes=[])
    with pytest.raises(UnsupportedConfiguration, match="window attention"):
        _executor(_cache_config(), model)


def test_executor_init_refuses_ssm_model(active):
    model = SimpleNamespace(sliding_window=-1, states_shapes=[((2, 4), "float16")])
    with pytest.raises(UnsupportedConfiguration, match="SSM"):
        _executor(_cache_config(), model)


def test_executor_init_ignores_engines_without_the_host_tier(active):
    model = SimpleNamespace(sliding_window=4096, states_shapes=[])
    ex = _executor(_cache_config(kv_transfer_config=KVTransferConfig()), model)
    assert ex.cache_config.enable_prefix_caching is False  # LMDeploy's own stock behaviour


def test_executor_sizes_host_slots_from_gb(active):
    from lmdeploy.pytorch.engine.executor.base import _WorkerCachePlanSizes

    model = SimpleNamespace(sliding_window=-1, states_shapes=[], dtype=torch.bfloat16)
    cfg = _cache_config()  # hostcache_config.host_cache_gb = 1
    ex = _executor(cfg, model)
    mib = 1 << 20
    ex._update_num_gpu_blocks([8 << 30, 8 << 30],
                              [_WorkerCachePlanSizes(target=mib, spec=mib // 4),
                               _WorkerCachePlanSizes(target=mib, spec=mib // 4)], None)
    extra = cfg.kv_transfer_config.kv_connector_extra_config
    assert cfg.num_gpu_blocks > 2  # stock behaviour still ran
    assert extra["host_slot_bytes"] == mib + mib // 4
    assert extra["host_cache_blocks"] == (1 << 30) // (2 * (mib + mib // 4))
    assert extra["kv_dtype"] == "bfloat16"      # keys every namespace: fp16 and bf16 blocks share a size


def test_each_data_parallel_engine_takes_its_share_of_the_node(active):
    """LMDeploy starts one engine per DP rank with the same settings: each takes 1/dp of host_cache_gb,
    or the node's memory would be promised dp times over."""
    from lmdeploy.pytorch.engine.executor.base import ExecutorBase, _WorkerCachePlanSizes

    model = SimpleNamespace(sliding_window=-1, states_shapes=[], dtype=torch.bfloat16)
    mib = 1 << 20
    blocks = {}
    for dp in (1, 2):
        cfg = _cache_config()  # host_cache_gb 1
        ex = ExecutorBase("/models/x", model, cfg, backend_config=SimpleNamespace(), dist_config=DistConfig(dp=dp, tp=dp),
                          misc_config=SimpleNamespace(memdecode_config=None))
        ex._update_num_gpu_blocks([8 << 30] * dp, [_WorkerCachePlanSizes(target=mib, spec=0)] * dp, None)
        blocks[dp] = cfg.kv_transfer_config.kv_connector_extra_config["host_cache_blocks"]
    assert blocks[1] == (1 << 30) // mib and blocks[2] == (1 << 29) // (2 * mib)


def test_each_data_parallel_engine_captures_to_its_own_file(active, tmp_path):
    """Every DP engine gets the same capture setting: each writes its own file (one shared file mixed two
    keys, which plan refuses, and two writers rotated and truncated each other's lines)."""
    from lmdeploy.pytorch.engine.executor.base import ExecutorBase, _WorkerCachePlanSizes

    from lmdeploy_hostcache.integration.connector import HostTierScheduler

    model = SimpleNamespace(sliding_window=-1, states_shapes=[], dtype=torch.bfloat16)
    paths = []
    for dp, rank in ((1, 0), (2, 0), (2, 1)):
        cfg = _cache_config()
        extra = cfg.kv_transfer_config.kv_connector_extra_config
        extra["model_identity"] = "test-model"
        extra["hostcache_config"] = {**extra["hostcache_config"], "capture": str(tmp_path / "cap.jsonl"),
                                     "capture_offload": False}
        ex = ExecutorBase("/models/x", model, cfg, backend_config=SimpleNamespace(),
                          dist_config=DistConfig(dp=dp, tp=dp, dp_rank=rank),
                          misc_config=SimpleNamespace(memdecode_config=None))
        ex._update_num_gpu_blocks([8 << 30] * dp, [_WorkerCachePlanSizes(target=1 << 20, spec=0)] * dp, None)
        sched = HostTierScheduler(cfg, tp_size=1)
        paths.append(sched.capture.writer.path.name)
        sched.capture.close()
    assert paths == ["cap.jsonl", "cap.dp0.jsonl", "cap.dp1.jsonl"]


def test_executor_logs_the_tier_active_line(active, monkeypatch):
    """README "Is the tier on?": the line the executor logs once the host tier is sized, at WARNING, so that
    ``lmdeploy serve api_server``'s default --log-level shows it."""
    import lmdeploy.utils
    from lmdeploy.pytorch.engine.executor.base import _WorkerCachePlanSizes

    lines, infos = [], []
    monkeypatch.setattr(lmdeploy.utils, "get_logger",
                        lambda name: SimpleNamespace(info=infos.append, warning=lines.append))
    ex = _executor(_cache_config(), SimpleNamespace(sliding_window=-1, states_shapes=[], dtype=torch.float16))
    ex._update_num_gpu_blocks([8 << 30], [_WorkerCachePlanSizes(target=1 << 20, spec=0)], None)
    active_lines = [ln for ln in lines if ln.startswith("lmdeploy-hostcache: host tier active: ")]
    assert len(active_lines) == 1, lines
    assert not [ln for ln in infos if "host tier active" in ln]
    assert "host cache 1.0 GiB: host_cache_gb is set to 1" in active_lines[0]
    assert "1024 host slots per rank x 1 rank x 1.0 MiB per block" in active_lines[0]


# -- host slots in the configured host_kv_format (executor hook) ------------------------------------

LLAMA_LIKE = dict(hidden_size=4096, num_layers=2, num_attention_heads=32, num_key_value_heads=8,
                  bos_token_id=1, eos_token_id=[2], head_dim=128, vocab_size=100)


def _lossy_executor(host_kv_format, *, quant_policy=0, dtype="float16", with_agent=True):
    """A real ExecutorBase over a Llama-like 2-layer model; ``with_agent``: a local model agent
    holding the plan (UniExecutor), else the hook rebuilds it (Ray/mp)."""
    import torch
    from lmdeploy.pytorch.config import ModelConfig
    from lmdeploy.pytorch.engine.cache_engine.plan import build_block_cache_plan

    tc = KVTransferConfig(kv_connector=CONNECTOR_NAME, kv_role="kv_both", kv_connector_extra_config={
        "hostcache_config": {"host_cache_gb": 1, "host_kv_format": host_kv_format}})
    cfg = _cache_config(kv_transfer_config=tc, block_size=64, kernel_block_size=64, quant_policy=quant_policy)
    model = ModelConfig(dtype=getattr(torch, dtype), **LLAMA_LIKE)
    ex = _executor(cfg, model)
    plan = build_block_cache_plan(model, cfg, 1)
    if with_agent:
        ex.model_agent = SimpleNamespace(block_cache_plan=plan)
    return ex, cfg, plan


def _size(ex, plan, spec=0):
    from lmdeploy.pytorch.engine.executor.base import _WorkerCachePlanSizes

    ex._update_num_gpu_blocks([8 << 30], [_WorkerCachePlanSizes(target=plan.logical_block_nbytes, spec=spec)], None)
    return ex.cache_config.kv_transfer_config.kv_connector_extra_config


@pytest.mark.parametrize("with_agent", [True, False])
@pytest.mark.parametrize("fmt,ratio", [("int8", 0.516), ("int4", 0.266)])
def test_executor_sizes_lossy_host_slots_smaller_than_gpu_blocks(active, fmt, ratio, with_agent):
    """docs/formats.md sizes: a Llama-like fp16 block is 2x/4x smaller on host; the tier holds
    that many more slots for the same host_cache_gb, and the slot is the one HostPool allocates."""
    from lmdeploy_hostcache.integration.engine_config import connector_rows_of_plan
    from lmdeploy_hostcache.transfer import KVRowLayout

    ex, cfg, plan = _lossy_executor(fmt, with_agent=with_agent)
    gpu = plan.logical_block_nbytes
    extra = _size(ex, plan)
    layout = KVRowLayout.from_connector_caches(connector_rows_of_plan(plan), 1, tensor_specs=plan.tensor_specs)
    assert extra["host_slot_bytes"] == layout.slot_bytes(fmt) < gpu
    assert extra["host_slot_bytes"] / gpu == pytest.approx(ratio, abs=1e-3)
    assert extra["host_cache_blocks"] == (1 << 30) // extra["host_slot_bytes"]
    assert [s["name"] for s in extra["host_tensor_specs"]] == ["k_cache", "v_cache"]
    assert extra["host_tensor_specs"][0] == {"name": "k_cache", "shape": [64, 8, 128], "dtype": "float16",
                                             "alignment": 256}


def test_executor_lossy_slots_keep_the_spec_model_bytes_raw(active):
    """MTP draft rows (``mtp.cache_pool.*``) are copied raw: only the target K/V shrink."""
    without_spec = _size(*_lossy_executor("int8")[0::2])["host_slot_bytes"]
    ex, cfg, plan = _lossy_executor("int8")
    assert _size(ex, plan, spec=12345)["host_slot_bytes"] == without_spec + 12345


def test_executor_same_format_keeps_gpu_bytes_and_needs_no_plan(active):
    ex, cfg, plan = _lossy_executor("same", with_agent=False)
    ex.model_config = SimpleNamespace(sliding_window=-1, states_shapes=[], dtype=torch.float16)  # no plan
    extra = _size(ex, plan)
    assert extra["host_slot_bytes"] == plan.logical_block_nbytes and "host_tensor_specs" not in extra


def test_executor_refuses_a_lossy_format_on_a_quantized_cache_before_anything_is_set(active):
    ex, cfg, plan = _lossy_executor("int4", quant_policy=8)
    extra = cfg.kv_transfer_config.kv_connector_extra_config
    before = copy.deepcopy(extra)
    with pytest.raises(UnsupportedConfiguration, match="host_kv_format='int4'.*same"):
        _size(ex, plan)
    assert extra == before


def _l3_cache_config(**l3):
    return _cache_config(kv_transfer_config=KVTransferConfig(
        kv_connector=CONNECTOR_NAME, kv_role="kv_both",
        kv_connector_extra_config={"hostcache_config": {"host_cache_gb": 1,
                                                        "l3": {"master_address": "127.0.0.1:1", **l3}}}))


def _sized_extra(cfg, model_path, misc=None, adapters=None, quant_config=None, draft=None):
    """The extra config after the executor hook, for a model at ``model_path`` (the prepare hook's
    ``model_identity``, its resolved path)."""
    from lmdeploy.pytorch.engine.executor.base import ExecutorBase, _WorkerCachePlanSizes

    cfg.kv_transfer_config.kv_connector_extra_config["model_identity"] = str(model_path)

    model = SimpleNamespace(sliding_window=-1, states_shapes=[], dtype=torch.bfloat16, quant_config=quant_config)
    ex = ExecutorBase(str(model_path), model, cfg, backend_config=SimpleNamespace(), dist_config=DistConfig(),
                      misc_config=misc or SimpleNamespace(memdecode_config=None, hf_overrides=None),
                      adapters=adapters, specdecode_config=SimpleNamespace(model=draft) if draft else None)
    ex._update_num_gpu_blocks([8 << 30], [_WorkerCachePlanSizes(target=1 << 20, spec=0)], None)
    return cfg.kv_transfer_config.kv_connector_extra_config


def test_executor_names_the_weights_in_the_store_keys(active, tmp_path):
    """The store outlives the process and other nodes read it: its keys name the checkpoint's weights
    (two fine-tunes at one path never share objects) and the hf_overrides that change what they compute."""
    from lmdeploy_hostcache.integration.l3_tier import weights_name
    from lmdeploy_hostcache.l3.config import parse_l3_section

    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    first = _sized_extra(_l3_cache_config(), tmp_path)["weights_fingerprint"]
    assert len(first) == 32 and "hf_overrides_digest" not in _sized_extra(_l3_cache_config(), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(bytes(range(255, -1, -1)) * 64)   # another fine-tune, same path
    assert _sized_extra(_l3_cache_config(), tmp_path)["weights_fingerprint"] != first
    # a name the operator gives replaces the fingerprint
    named = _sized_extra(_l3_cache_config(weights_id="run-42"), tmp_path)
    assert "weights_fingerprint" not in named
    assert weights_name(parse_l3_section({"master_address": "h:1", "weights_id": "run-42"}), named) == \
        "id:run-42/cf:" + named["model_config_fingerprint"]   # with the model's configuration (another model)
    # overrides that change what the weights compute (rope scaling) key the store too
    misc = SimpleNamespace(memdecode_config=None, hf_overrides={"rope_scaling": {"factor": 4.0}})
    over = _sized_extra(_l3_cache_config(), tmp_path, misc)
    assert weights_name(None, over).endswith("/hf:" + over["hf_overrides_digest"])
    # without l3 nothing is read or added
    plain = _sized_extra(_cache_config(), tmp_path, misc)
    assert "weights_fingerprint" not in plain and "hf_overrides_digest" not in plain


def test_store_keys_name_the_adapters_weights_and_the_weight_quantization(active, tmp_path):
    """An adapter's blocks are keyed by its name, which two nodes (or two runs) may give to other weights,
    and LMDeploy may quantize the same files at load (model_format='fp8'): both name the store keys."""
    from lmdeploy.pytorch.config import QuantizationConfig

    from lmdeploy_hostcache.integration.l3_tier import weights_name

    base, adapter = tmp_path / "base", tmp_path / "sql"
    for folder in (base, adapter):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (base / "config.json").write_text('{"model_type": "llama"}')
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    plain = _sized_extra(_l3_cache_config(), base)
    with_adapter = _sized_extra(_l3_cache_config(), base, adapters={"sql": str(adapter)})
    assert weights_name(None, plain) == "fp:" + plain["weights_fingerprint"]
    # the base model's name is the same whatever adapters a node loads; the adapter keys its own namespace
    assert weights_name(None, with_adapter) == weights_name(None, plain)
    sql = with_adapter["adapter_weights_fingerprints"]["sql"]
    (adapter / "model.safetensors").write_bytes(bytes(range(255, -1, -1)) * 64)   # retrained under the same name
    retrained = _sized_extra(_l3_cache_config(), base, adapters={"sql": str(adapter)})
    assert retrained["adapter_weights_fingerprints"]["sql"] != sql
    (adapter / "adapter_config.json").write_text('{"r": 16}')                       # another rank
    assert _sized_extra(_l3_cache_config(), base, adapters={"sql": str(adapter)})["adapter_weights_fingerprints"]["sql"] \
        not in (sql, retrained["adapter_weights_fingerprints"]["sql"])
    # a speculative draft model of its own is named too; an MTP draft inside the target's checkpoint is not again
    draft = tmp_path / "draft"
    draft.mkdir()
    (draft / "model.safetensors").write_bytes(bytes(range(128)) * 64)
    assert weights_name(None, _sized_extra(_l3_cache_config(), base, draft=str(draft))) != weights_name(None, plain)
    assert weights_name(None, _sized_extra(_l3_cache_config(), base, draft=str(base))) == weights_name(None, plain)
    fp8 = _sized_extra(_l3_cache_config(), base, quant_config=QuantizationConfig(quant_method="fp8"))
    assert weights_name(None, fp8) != weights_name(None, plain) and "/wf:" in weights_name(None, fp8)
    assert "weight_format_digest" not in _sized_extra(_l3_cache_config(), base, quant_config=QuantizationConfig())


def test_executor_refuses_l3_when_the_weights_cannot_be_read(active, tmp_path):
    (tmp_path / "model.safetensors").symlink_to(tmp_path / "gone")   # cannot be opened, even by root
    with pytest.raises(UnsupportedConfiguration, match="cannot fingerprint the weights.*model.safetensors"):
        _sized_extra(_l3_cache_config(), tmp_path)


def test_auto_leaves_room_for_the_store_segment_and_buffer():
    """host_cache_gb auto is measured before the store's segment and buffer exist: it leaves them room."""
    from lmdeploy_hostcache.hostmem import HostMemoryFacts
    from lmdeploy_hostcache.integration.engine_config import size_host_cache

    facts = HostMemoryFacts(total_bytes=256 << 30, available_bytes=200 << 30)
    mib = 1 << 20
    plain = size_host_cache({"hostcache_config": {"host_cache_gb": "auto"}}, [mib], facts)[0]
    with_l3 = size_host_cache({"hostcache_config": {"host_cache_gb": "auto", "l3": {
        "master_address": "127.0.0.1:1", "global_segment_gb": 16, "local_buffer_gb": 1}}}, [mib], facts)
    assert plain == 128 * 1024 and with_l3[0] == (128 - 17) * 1024 and "l3 store" in with_l3[2]
    two_ranks = size_host_cache({"hostcache_config": {"host_cache_gb": "auto", "l3": {
        "master_address": "127.0.0.1:1", "global_segment_gb": 16, "local_buffer_gb": 1}}}, [mib, mib], facts)[0]
    assert two_ranks == (128 - 16 - 2) * 1024 // 2          # one buffer per rank's client
    explicit = size_host_cache({"hostcache_config": {"host_cache_gb": 64, "l3": {
        "master_address": "127.0.0.1:1", "global_segment_gb": 16}}}, [mib], facts)[0]
    assert explicit == 64 * 1024                   # an explicit size is the operator's figure
    # with data parallelism the node's budget holds the store once (its DP engines' workers share
    # the segment and buffer) and the rest is split between the engines
    per_engine = size_host_cache({"hostcache_config": {"host_cache_gb": "auto", "l3": {
        "master_address": "127.0.0.1:1", "global_segment_gb": 16, "local_buffer_gb": 1}}}, [mib], facts,
        data_parallel=4)[0]
    assert per_engine == (128 - 16 - 4) * 1024 // 4          # the segment once, a buffer per engine's rank


def test_each_worker_gives_the_store_its_share_of_the_node_s_segment(monkeypatch):
    """global_segment_gb is the node's: a worker of a TP-2 engine of a node running two DP engines
    contributes a quarter of it; local_buffer_gb is each client's own staging buffer."""
    from types import SimpleNamespace

    from lmdeploy_hostcache.config import ConfigError
    from lmdeploy_hostcache.integration import l3_tier
    from lmdeploy_hostcache.l3.config import parse_l3_section

    seen = []
    monkeypatch.setattr(l3_tier, "connect", lambda cfg, **kw: seen.append(cfg))
    cfg = parse_l3_section({"master_address": "127.0.0.1:1", "global_segment_gb": 16, "local_buffer_gb": 2})
    worker = SimpleNamespace(hostcache=SimpleNamespace(l3=cfg), tp_size=2, tp_rank=1, extra={"data_parallel": 2})
    assert l3_tier.WorkerL3.build(worker) is None          # the stub connect returns no client
    assert (seen[0].global_segment_gb, seen[0].local_buffer_gb) == (4.0, 2.0)
    # TP 8 x DP 2 of 0.2 GiB: 12.8 MiB per client, under Mooncake's floor: refused before any client opens
    small = parse_l3_section({"master_address": "127.0.0.1:1", "global_segment_gb": 0.2, "local_buffer_gb": 2})
    worker = SimpleNamespace(hostcache=SimpleNamespace(l3=small), tp_size=8, tp_rank=0, extra={"data_parallel": 2})
    with pytest.raises(ConfigError, match=r"l3\.global_segment_gb.*16 store clients"):
        l3_tier.WorkerL3.build(worker)
    assert len(seen) == 1
