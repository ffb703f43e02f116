"""GGUF export round trip: write with the gguf package, read back with transformers' GGUF loader (llama.cpp reads
them in test_gguf_llamacpp.py). The tokenizer trained in the tests splits text as GPT-2 does: llama.cpp's gpt-2."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import build_family_model
from tuneforge.errors import ConfigError
from tuneforge.export.gguf_writer import write_gguf


def tiny(kind: str, vocab: int):
    return build_family_model(kind, vocab)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "gemma3_text"])
@pytest.mark.parametrize("qtype, tolerance", [("f32", 1e-4), ("f16", 2e-2), ("q8_0", 1e-1)])
def test_exported_gguf_loads_back_with_close_logits(tmp_path, tokenizer, kind, qtype, tolerance):
    model = tiny(kind, len(tokenizer))
    write_gguf(model, tokenizer, tmp_path / "m.gguf", qtype=qtype, pre_tokenizer="gpt-2")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    assert loaded.config.model_type == model.config.model_type
    ids = torch.tensor([tokenizer("Hello world, this is a test of the export.")["input_ids"]])
    with torch.no_grad():
        expected, got = model(ids).logits, loaded(ids).logits
    assert (expected - got).abs().max().item() < tolerance


def test_tokenizer_survives_the_round_trip(tmp_path, tokenizer):
    write_gguf(tiny("llama", len(tokenizer)), tokenizer, tmp_path / "m.gguf", qtype="f32", pre_tokenizer="gpt-2")
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
