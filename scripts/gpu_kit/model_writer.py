"""Write the kit's random-weight Llama fast: weights drawn on the GPU, saved with safetensors.

usage: python model_writer.py OUT_DIR CONFIG_JSON [--device cuda|cpu] [--seed 0]

``lmdeploy_hostcache.testing.models.write_tiny_model`` builds the model with transformers on the CPU
(random init of every parameter in float32), which for ~1.1B parameters costs about a minute of CPU
time; device time is scarce, so the kit only takes the *shapes* from transformers (the model is built
on the ``meta`` device: no memory, no init), draws each tensor with ``torch.normal(0, 0.02)`` on
``--device`` in the checkpoint dtype (RMSNorm weights are ones, as transformers initialises them),
and writes ``model.safetensors`` + ``config.json`` the way ``save_pretrained`` names them, then the
project's byte-level tokenizer (``testing.models.write_tokenizer``). Same config keys, bos/eos ids and
tokenizer as ``write_tiny_model``; deterministic for a seed on a given device.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def write_random_llama(out_dir, cfg: dict, device: str = "cuda", seed: int = 0) -> dict:
    import torch
    import transformers
    from safetensors.torch import save_file

    from lmdeploy_hostcache.testing.models import BOS_ID, EOS_ID, write_tokenizer

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype_name = cfg.get("dtype", "bfloat16")
    dtype = getattr(torch, dtype_name)
    heads = cfg["num_attention_heads"]
    config = transformers.LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_layers"], num_attention_heads=heads, num_key_value_heads=cfg["num_key_value_heads"],
        head_dim=cfg["hidden_size"] // heads, max_position_embeddings=cfg["max_position_embeddings"],
        rms_norm_eps=1e-6, bos_token_id=BOS_ID, eos_token_id=EOS_ID, tie_word_embeddings=False,
        initializer_range=0.02, rope_theta=10000.0)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    gen = torch.Generator(device=device).manual_seed(seed)
    tensors, params = {}, 0
    for name, p in model.state_dict().items():
        if name.endswith("norm.weight"):
            t = torch.ones(p.shape, dtype=dtype, device=device)
        else:
            t = torch.empty(p.shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=gen)
        tensors[name] = t.cpu()
        params += t.numel()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(out))
    data = json.loads((out / "config.json").read_text())
    data["torch_dtype"] = dtype_name
    data["dtype"] = dtype_name
    data["architectures"] = ["LlamaForCausalLM"]  # LMDeploy picks its model class from this
    (out / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    write_tokenizer(out, cfg["vocab_size"])
    return {"dir": str(out), "params": params, "seconds": time.perf_counter() - t0, "device": device}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="write the GPU kit's random-weight Llama")
    p.add_argument("out_dir")
    p.add_argument("config_json", help="driver.MODEL_SIZES entry as JSON")
    p.add_argument("--device", default=None, help="where to draw the weights (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    info = write_random_llama(args.out_dir, json.loads(args.config_json), device, args.seed)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
