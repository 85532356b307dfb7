"""Tiny random-weight checkpoints (Llama, Qwen2) and a byte-level tokenizer, written locally.

No download: the config and random weights come from ``transformers`` (saved as
safetensors), the tokenizer is built in memory with the ``tokenizers`` library.

Tokenizer contract (what tests rely on):
- byte-level BPE with no merges: token id ``b`` (0..255) is the byte ``b``, so the ids of
  a UTF-8 text are its bytes (``text_ids``) and any ASCII text round-trips exactly;
  then ``<s>``=256 (bos), ``</s>``=257 (eos), ``<|system|>``=258, ``<|user|>``=259,
  ``<|assistant|>``=260, and ``<|x261|>``... up to ``vocab_size - 1`` so every id the
  model can emit decodes to something;
- the same vocabulary, merges and pre-tokenizer as transformers' ``Qwen2Tokenizer``
  rebuilds (transformers 5 always loads a ``qwen2`` checkpoint's tokenizer through that
  class), so a Llama and a Qwen2 checkpoint tokenize identically; no bos is added;
- only ``<s>`` and ``</s>`` are special; the role markers are plain added tokens;
- a chat template renders ``<|role|>content`` per message, ``</s>`` after each assistant
  turn, and ``<|assistant|>`` as the generation prompt, so each turn's rendering is a
  token prefix of the next turn's (multi-turn prefix reuse works through chat).

Invariants: deterministic for a given ``seed`` and arguments (same bytes on every run);
``out_dir`` is created if missing; only the checkpoint and tokenizer files are written.
"""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["ARCHS", "BOS_ID", "CHAT_TEMPLATE", "EOS_ID", "MIN_VOCAB", "text_ids", "write_tiny_model",
           "write_tokenizer"]

ARCHS = ("llama", "qwen2")
BOS_ID, EOS_ID = 256, 257
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
MIN_VOCAB = 256 + 2 + len(ROLE_TOKENS)
# Same splitting as transformers' Qwen2Tokenizer (irrelevant without merges, kept identical).
_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                      r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def text_ids(text: str) -> list[int]:
    """Token ids of ``text`` under this tokenizer (its UTF-8 bytes; no special tokens)."""
    return list(text.encode("utf-8"))


def _byte_chars() -> list[str]:
    """The printable stand-in of each byte used by byte-level BPE (index = byte value)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"write_tiny_model: {name} must be an integer >= {minimum}, got {value!r}")
    return value


def write_tokenizer(out_dir: str | Path, vocab_size: int = MIN_VOCAB) -> Path:
    """Write the byte-level tokenizer (see module docstring) with ``vocab_size`` ids to ``out_dir``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    _check_int("vocab_size", vocab_size, MIN_VOCAB)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = {c: b for b, c in enumerate(_byte_chars())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], dropout=None, unk_token=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ROLE_TOKENS])
    tok.add_tokens([AddedToken(f"<|x{i}|>", special=False, normalized=False) for i in range(MIN_VOCAB, vocab_size)])
    assert tok.get_vocab_size() == vocab_size and tok.token_to_id("<s>") == BOS_ID
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>",
                                   unk_token=None, clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    cfg_path = out / "tokenizer_config.json"
    data = json.loads(cfg_path.read_text())
    data["tokenizer_class"] = "PreTrainedTokenizerFast"
    data["add_bos_token"] = False
    cfg_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return out


def write_tiny_model(out_dir: str | Path, arch: str = "llama", *, num_layers: int = 2, hidden_size: int = 64,
                     intermediate_size: int | None = None, num_attention_heads: int = 4,
                     num_key_value_heads: int = 2, head_dim: int | None = None, vocab_size: int = 320,
                     max_position_embeddings: int = 2048, dtype: str = "float16",
                     initializer_range: float = 0.2, tie_word_embeddings: bool = False, seed: int = 0,
                     tokenizer: bool = True) -> Path:
    """Write a random-weight ``arch`` checkpoint (config.json + model.safetensors) to ``out_dir``.

    Defaults make a ~0.1M-parameter model (2 layers, hidden 64, 4 heads, 2 KV heads,
    head_dim 16) whose forward is cheap under Triton's interpreter; the keyword
    arguments scale it up (e.g. ``num_layers=16, hidden_size=2048, intermediate_size=5632,
    num_attention_heads=16, num_key_value_heads=8, vocab_size=32000`` is ~1.1B). ``dtype``
    is what the weights are stored in and what ``config.json`` declares (LMDeploy runs
    float32 checkpoints as float16 anyway). ``initializer_range`` defaults to 0.2, ten times
    transformers' default, so that a 2-layer random model's next token depends on the whole
    context and not mostly on the last token (with 0.02, 20 contexts sharing their last four
    tokens gave 3 distinct greedy tokens; with 0.2, 20): equality tests then notice wrong KV.
    Use 0.02 for deep models (activations grow with depth). With ``tokenizer=True`` the word-level
    tokenizer is written next to the weights. Returns ``Path(out_dir)``.
    """
    import torch
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"write_tiny_model: arch must be one of {ARCHS}, got {arch!r}")
    _check_int("num_layers", num_layers, 1)
    _check_int("hidden_size", hidden_size, 8)
    _check_int("num_attention_heads", num_attention_heads, 1)
    _check_int("num_key_value_heads", num_key_value_heads, 1)
    _check_int("vocab_size", vocab_size, MIN_VOCAB)
    _check_int("max_position_embeddings", max_position_embeddings, 16)
    if num_attention_heads % num_key_value_heads:
        raise ValueError("write_tiny_model: num_attention_heads must be a multiple of num_key_value_heads, "
                         f"got {num_attention_heads} and {num_key_value_heads}")
    if head_dim is None:
        if hidden_size % num_attention_heads:
            raise ValueError("write_tiny_model: hidden_size must be a multiple of num_attention_heads "
                             "(or give head_dim)")
        head_dim = hidden_size // num_attention_heads
    _check_int("head_dim", head_dim, 4)
    intermediate_size = _check_int("intermediate_size", intermediate_size or 2 * hidden_size, 1)
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype) or dtype not in ("float16", "bfloat16", "float32"):
        raise ValueError(f"write_tiny_model: dtype must be float16, bfloat16 or float32, got {dtype!r}")

    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                  num_hidden_layers=num_layers, num_attention_heads=num_attention_heads,
                  num_key_value_heads=num_key_value_heads, max_position_embeddings=max_position_embeddings,
                  rms_norm_eps=1e-6, bos_token_id=BOS_ID, eos_token_id=EOS_ID, tie_word_embeddings=tie_word_embeddings,
                  initializer_range=initializer_range, rope_theta=10000.0)
    if arch == "llama":
        cfg = transformers.LlamaConfig(head_dim=head_dim, **common)
        model_cls = transformers.LlamaForCausalLM
    else:
        if head_dim != hidden_size // num_attention_heads:
            raise ValueError("write_tiny_model: qwen2 needs head_dim == hidden_size // num_attention_heads")
        cfg = transformers.Qwen2Config(use_sliding_window=False, **common)
        model_cls = transformers.Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = model_cls(cfg).to(torch_dtype).eval()
    if arch == "qwen2":
        # transformers initialises the q/k/v biases to zero; make them random so the
        # Qwen2-specific bias path actually matters in the forward.
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, initializer_range)
    model.save_pretrained(str(out), safe_serialization=True)
    # Pin the declared dtype (transformers writes it under "dtype"; LMDeploy also reads "torch_dtype").
    cfg_path = out / "config.json"
    data = json.loads(cfg_path.read_text())
    data["torch_dtype"] = dtype
    data["dtype"] = dtype
    cfg_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    if tokenizer:
        write_tokenizer(out, vocab_size)
    return out


if __name__ == "__main__":  # pragma: no cover - convenience for humans
    import sys

    if len(sys.argv) not in (2, 3):
        print("usage: python -m lmdeploy_hostcache.testing.models OUT_DIR [llama|qwen2]", file=sys.stderr)
        raise SystemExit(2)
    try:
        path = write_tiny_model(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else "llama")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(path)
