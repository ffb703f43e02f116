"""GGUF export round trip: write with the gguf package, read back with transformers' GGUF loader."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneforge.errors import ConfigError
from tuneforge.export.gguf_writer import write_gguf


def tiny(kind: str, vocab: int):
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3Config

    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=True)
    config = {"llama": lambda: LlamaConfig(**common),
              "qwen2": lambda: Qwen2Config(**common),
              "qwen3": lambda: Qwen3Config(**common, head_dim=128),  # the GGUF loader assumes Qwen3's 128
              # GGUF readers take the attention scale from head_dim (llama.cpp) or assume 256 (transformers)
              "gemma3_text": lambda: Gemma3TextConfig(**common, head_dim=256, sliding_window=64,
                                                      query_pre_attn_scalar=256)}[kind]()
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random norms, so that a wrong norm convention shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "gemma3_text"])
@pytest.mark.parametrize("qtype, tolerance", [("f32", 1e-4), ("f16", 2e-2), ("q8_0", 1e-1)])
def test_exported_gguf_loads_back_with_close_logits(tmp_path, tokenizer, kind, qtype, tolerance):
    model = tiny(kind, len(tokenizer))
    write_gguf(model, tokenizer, tmp_path / "m.gguf", qtype=qtype)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    assert loaded.config.model_type == model.config.model_type
    ids = torch.tensor([tokenizer("Hello world, this is a test of the export.")["input_ids"]])
    with torch.no_grad():
        expected, got = model(ids).logits, loaded(ids).logits
    assert (expected - got).abs().max().item() < tolerance


def test_tokenizer_survives_the_round_trip(tmp_path, tokenizer):
    write_gguf(tiny("llama", len(tokenizer)), tokenizer, tmp_path / "m.gguf", qtype="f32")
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    text = "Hello world <|im_start|>user\n你好, tokens!<|im_end|>"
    assert back(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert back.eos_token == "<|im_end|>" and back.chat_template == tokenizer.chat_template


def test_unsupported_architecture_and_type_are_explained(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ConfigError, match="GGUF export supports llama, mistral, qwen2, qwen3, gemma3_text"):
        write_gguf(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2)), tokenizer, tmp_path / "x.gguf")
    with pytest.raises(ConfigError, match="--gguf-type 'q3_k'"):
        write_gguf(tiny("llama", len(tokenizer)), tokenizer, tmp_path / "x.gguf", qtype="q3_k")
