"""KV geometry: bytes per block, cross-checked against LMDeploy's own cache plan."""
import json

import pytest

from lmdeploy_hostcache.planner.geometry import (GIB, PRESETS, BlockSizing, CacheFormat, KVGeometry,
                                                 geometry_from_hf_config, resolve_model)


def test_presets_known_bytes_per_token():
    # Llama-3-8B bf16: 2 (K,V) * 32 layers * 8 heads * 128 dims * 2 bytes = 128 KiB per token
    assert PRESETS["Llama-3-8B"].block_bytes(64) == 64 * 128 * 1024
    assert PRESETS["Qwen2.5-7B"].block_bytes(64) == 64 * 2 * 28 * 4 * 128 * 2
    assert PRESETS["Llama-3-70B"].block_bytes(64) == 64 * 2 * 80 * 8 * 128 * 2
    g = PRESETS["Llama-3-8B"]
    # int8: half the K/V bytes plus scale+zero (2 bf16) per token per head, for K and V
    assert g.block_bytes(64, 8) == 32 * (2 * 64 * 8 * 128 + 2 * 64 * 8 * 2 * 2)
    assert g.block_bytes(64, 4) == 32 * (2 * 64 * 8 * 64 + 2 * 64 * 8 * 2 * 2)
    assert g.block_bytes(64, 0, tp=2) * 2 == g.block_bytes(64)


def test_alignment_rounds_each_spec_to_256_bytes():
    g = KVGeometry("tiny", num_layers=2, num_kv_heads=1, head_dim=72, dtype="float16")
    # K: 4*1*72*2 = 576 -> 768; V the same
    assert g.block_bytes(4) == 2 * (768 + 768)
    # int4: K 4*36 = 144 -> 256, scales 4*1*2*2 = 16 -> 256, for K and V
    assert g.block_bytes(4, 4) == 2 * 4 * 256


@pytest.mark.parametrize("bad, match", [
    (dict(block_size=0), "block_size"), (dict(quant_policy=16), "quant_policy"), (dict(tp=3), "tp=3"),
])
def test_block_bytes_errors(bad, match):
    kw = dict(block_size=64, quant_policy=0, tp=1) | bad
    with pytest.raises(ValueError, match=match):
        PRESETS["Llama-3-8B"].block_bytes(**kw)


def test_cache_format_validation():
    with pytest.raises(ValueError, match="host_kv_format=int4 applies to fp16/bf16 caches only"):
        CacheFormat(quant_policy=8, host_kv_format="int4")
    with pytest.raises(ValueError, match="host_kv_format must be one of"):
        CacheFormat(host_kv_format="fp8")
    assert CacheFormat(4, "same").host_quant_policy == 4
    assert CacheFormat(0, "int4").host_quant_policy == 4


def test_sizing_converts_gib_to_blocks():
    g = PRESETS["Llama-3-8B"]
    s = BlockSizing.build(g, CacheFormat(0, "int4", tp=2), 512)
    assert s.gpu_block_bytes == g.block_bytes(512, 0, 2) == 32 * 1024 * 1024
    assert s.gpu_blocks(20) == 20 * GIB // s.gpu_block_bytes == 640
    # host slots are per rank and every rank holds its shard: a node's RAM divides by tp
    assert s.host_blocks(100) == 100 * GIB // (s.host_block_bytes * 2)
    assert s.host_gb_for(s.host_blocks(100)) <= 100
    with pytest.raises(ValueError, match="host_gb"):
        s.host_blocks(-1)


def test_hf_config(tmp_path):
    cfg = {"num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "hidden_size": 3584,
           "torch_dtype": "bfloat16", "_name_or_path": "Qwen/Qwen2.5-7B"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    g = geometry_from_hf_config(tmp_path)
    assert (g.num_layers, g.num_kv_heads, g.head_dim, g.dtype) == (28, 4, 128, "bfloat16")
    assert g.block_bytes(64) == PRESETS["Qwen2.5-7B"].block_bytes(64)
    assert resolve_model(str(tmp_path / "config.json")).head_dim == 128
    assert resolve_model("llama-3-8b") is PRESETS["Llama-3-8B"]
    del cfg["num_hidden_layers"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'num_hidden_layers'"):
        geometry_from_hf_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 4, "kv_lora_rank": 512}))
    with pytest.raises(ValueError, match="MLA"):
        geometry_from_hf_config(tmp_path)
    with pytest.raises(ValueError, match="neither a preset"):
        resolve_model("no-such-model")


@pytest.mark.parametrize("fields, dtype", [
    ({"torch_dtype": "float32"}, "float16"),            # LMDeploy's --dtype auto runs fp32 checkpoints in fp16
    ({"torch_dtype": "bfloat16"}, "bfloat16"),
    ({"dtype": "bfloat16", "torch_dtype": "float16"}, "bfloat16"),   # `dtype` first, as LMDeploy reads it
    ({"text_config": {"dtype": "bfloat16"}}, "bfloat16"),
    ({}, "float16"),                                    # none named: float16
    ({"torch_dtype": "bfloat16", "quantization_config": {"quant_method": "awq"}}, "float16"),
])
def test_hf_config_dtype_is_what_lmdeploy_runs(tmp_path, monkeypatch, fields, dtype):
    from types import SimpleNamespace

    import torch
    from lmdeploy.pytorch import config as lmdeploy_config

    cfg = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 256, **fields}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    g = geometry_from_hf_config(tmp_path)
    assert g.dtype == dtype and g.dtype_bytes == 2
    # the same answer as LMDeploy's own rule (on a GPU with bf16, e.g. an H200), on the same fields
    monkeypatch.setattr(lmdeploy_config, "is_bf16_supported", lambda device_type="cuda": True)
    hf = SimpleNamespace(**{k: (SimpleNamespace(**v) if k == "text_config" else v) for k, v in cfg.items()})
    mc = SimpleNamespace(hf_config=hf, dtype=None)
    lmdeploy_config._update_torch_dtype(mc, "auto", device_type="cuda")
    assert {torch.float16: "float16", torch.bfloat16: "bfloat16"}[mc.dtype] == dtype


CROSS_CHECK = [  # (layers, kv_heads, head_dim, dtype, block_size, kernel_block_size, quant_policy, tp)
    (32, 8, 128, "bfloat16", 64, 64, 0, 1),
    (32, 8, 128, "bfloat16", 512, 512, 8, 2),
    (28, 4, 128, "bfloat16", 64, 64, 4, 1),
    (2, 1, 72, "float16", 4, 4, 0, 1),
    (2, 1, 72, "float16", 4, 4, 4, 1),
    (3, 2, 80, "float16", 64, 16, 8, 1),
    (28, 4, 128, "bfloat16", 64, 64, 0, 8),   # tp a multiple of kv_heads: LMDeploy replicates the heads
    (2, 1, 72, "float16", 4, 4, 4, 2),
]


def lmdeploy_cache_plan(layers, kv_heads, head_dim, dtype, block_size, kernel_block_size, quant_policy, tp):
    """LMDeploy's own ``BlockCachePlan`` for a model of that geometry (skips without torch or the plan)."""
    torch = pytest.importorskip("torch")
    try:
        from lmdeploy.messages import QuantPolicy
        from lmdeploy.pytorch.config import CacheConfig, ModelConfig
        from lmdeploy.pytorch.engine.cache_engine.plan import build_block_cache_plan
    except ImportError as exc:  # pragma: no cover - the venv ships lmdeploy
        pytest.skip(f"lmdeploy cache plan not importable: {exc}")
    import types

    from lmdeploy.pytorch.configurations.builder import AutoModelConfigBuilder

    # what the engine does before it plans: KV heads replicated when tp is a multiple of them
    engine_kv_heads = AutoModelConfigBuilder.update_num_kv_heads(types.SimpleNamespace(), tp, kv_heads)
    mc = ModelConfig(hidden_size=kv_heads * head_dim * 4, num_layers=layers, num_attention_heads=kv_heads * 4,
                     num_key_value_heads=engine_kv_heads, bos_token_id=1, eos_token_id=[2], head_dim=head_dim,
                     dtype=getattr(torch, dtype))
    cc = CacheConfig(max_batches=1, block_size=block_size, num_cpu_blocks=0, num_gpu_blocks=0,
                     kernel_block_size=kernel_block_size, quant_policy=QuantPolicy(quant_policy))
    return build_block_cache_plan(mc, cc, world_size=tp)


@pytest.mark.parametrize("case", CROSS_CHECK)
def test_matches_lmdeploy_cache_plan(case):
    layers, kv_heads, head_dim, dtype, bs, kbs, qp, tp = case
    expected = lmdeploy_cache_plan(*case).logical_block_nbytes
    g = KVGeometry("x", layers, kv_heads, head_dim, dtype)
    assert g.block_bytes(bs, qp, tp, kernel_block_size=kbs) == expected
