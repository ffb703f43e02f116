"""Exported GGUF files read by llama.cpp itself (llama-cpp-python, installed with the dev extras): it must load
each file, tokenize a mixed English / Chinese / digits text to the Hugging Face tokenizer's ids, and compute
logits close to the source model's, for every architecture TuneForge writes and every GGUF type.

Two references per file: the source model (the storage format's own error included, so the bounds grow as the
bits shrink) and `readers_view`, the source with exactly the weights a reader dequantizes from that file (what
is left is llama.cpp's arithmetic, e.g. 8-bit activations in its quantized matrix products). Tiny models are
random (2 layers, hidden 64) on an embedded model's tokenizer, with 8 more embedding rows than tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import FAMILIES, build_family_model, build_tokenizer
from tests.llamacpp import llamacpp_read
from tuneforge.config import ModelConfig
from tuneforge.errors import ConfigError
from tuneforge.export.gguf_writer import TYPES, detect_pre_tokenizer, readers_view, write_gguf
from tuneforge.model.embedded import installed
from tuneforge.model.loader import load_model, load_tokenizer, resolve_model

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (installed("smollm2-135m-instruct") and installed("gemma3-270m")),
    reason="the tiny models borrow the embedded models' tokenizers: make install")]

TEXT = "Hello world, 你好世界! Numbers 12345 and 3.14159; it's done. Café naïve — don't stop 2024年11月。"
# Largest |logit difference| of llama.cpp against the source model, per type, for the tiny models (measured
# 0.0002 .. 0.31, see the closing note's table) and for the embedded models (measured, same table).
TINY_VS_SOURCE = {"f32": 2e-3, "f16": 5e-3, "bf16": 3e-2, "q8_0": 6e-2, "q5_1": 0.3, "q5_0": 0.3, "q4_1": 0.6,
                  "q4_0": 0.6}
TINY_VS_READERS_VIEW = 0.05  # measured <= 0.02
EMBEDDED_VS_SOURCE = {"f32": 0.1, "f16": 0.3, "bf16": 2.0, "q8_0": 5.0}  # 4/5 bits: the format's own error dominates
EMBEDDED_VS_READERS_VIEW = {"smollm2-135m-instruct": 3.0, "gemma3-270m": 12.0}


def logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def read_back(model, tokenizer, qtype: str, path, pre=None, text: str = TEXT):
    """(same ids?, max |d| vs source, max |d| vs readers_view, llama.cpp logits, source logits)."""
    write_gguf(model, tokenizer, path, qtype, pre_tokenizer=pre)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    tokens, got = llamacpp_read(path, text, ids)
    source = logits(model, ids)
    view = logits(readers_view(model, qtype), ids)
    return tokens == ids, float(np.abs(got - source).max()), float(np.abs(got - view).max()), got, source


@pytest.fixture(scope="module")
def tokenizers():
    return {name: load_tokenizer(resolve_model(ModelConfig(name_or_path=name)))
            for name in ("smollm2-135m-instruct", "gemma3-270m")}


@pytest.fixture(scope="module")
def tiny_models(tokenizers):
    smol, gemma = tokenizers["smollm2-135m-instruct"], tokenizers["gemma3-270m"]
    return {kind: (build_family_model(kind, len(gemma if kind == "gemma3_text" else smol) + 8),
                   gemma if kind == "gemma3_text" else smol) for kind in FAMILIES}


@pytest.mark.parametrize("qtype", list(TYPES))
@pytest.mark.parametrize("kind", FAMILIES)
def test_tiny_models_of_every_architecture_read_by_llama_cpp(tiny_models, tmp_path, kind, qtype):
    model, tokenizer = tiny_models[kind]
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) + 8  # the token list must be padded
    same_ids, vs_source, vs_view, _, _ = read_back(model, tokenizer, qtype, tmp_path / "m.gguf")
    assert same_ids
    assert vs_source < TINY_VS_SOURCE[qtype] and vs_view < TINY_VS_READERS_VIEW


@pytest.mark.parametrize("qtype", list(TYPES))
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma3-270m"])
def test_the_embedded_models_read_by_llama_cpp(tokenizers, tmp_path, name, qtype):
    model = load_model(resolve_model(ModelConfig(name_or_path=name)))
    same_ids, vs_source, vs_view, got, source = read_back(model, tokenizers[name], qtype, tmp_path / "m.gguf")
    assert same_ids
    assert vs_view < EMBEDDED_VS_READERS_VIEW[name]
    if qtype in EMBEDDED_VS_SOURCE:
        assert vs_source < EMBEDDED_VS_SOURCE[qtype]
        assert (got.argmax(-1) == source.argmax(-1)).mean() > (0.85 if qtype == "q8_0" else 0.95)


GEMMA_GLOBAL_LINEAR = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                       "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
ROPE_SCALINGS = {
    "llama3": ("llama", {"rope_theta": 10000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "linear": ("llama", {"rope_theta": 10000.0, "rope_type": "linear", "factor": 4.0}),
    "yarn": ("qwen2", {"rope_theta": 10000.0, "rope_type": "yarn", "factor": 4.0,
                       "original_max_position_embeddings": 32}),
    "gemma3-global-linear": ("gemma3_text", GEMMA_GLOBAL_LINEAR),  # 6 layers: the last one is global
}


@pytest.mark.parametrize("name", list(ROPE_SCALINGS))
def test_rope_scaling_is_written_as_llama_cpp_reads_it(tokenizers, tmp_path, name):
    kind, parameters = ROPE_SCALINGS[name]
    tokenizer = tokenizers["smollm2-135m-instruct"]
    # larger weights than usual, so that positions move the logits of a random model
    shape = dict(max_position_embeddings=512, initializer_range=0.2, num_hidden_layers=6 if kind == "gemma3_text" else 2)
    model = build_family_model(kind, len(tokenizer), rope_parameters=parameters, **shape)
    plain = {k: {**v, "rope_type": "default"} for k, v in parameters.items()} if kind == "gemma3_text" \
        else {"rope_theta": parameters["rope_theta"], "rope_type": "default"}
    unscaled = build_family_model(kind, len(tokenizer), rope_parameters=plain, **shape)
    text = " ".join([TEXT] * 3)  # about 165 tokens: past the original context of the scaled models
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert np.abs(logits(model, ids) - logits(unscaled, ids)).max() > 1.0  # the scaling shows in the logits
    same_ids, vs_source, _, _, _ = read_back(model, tokenizer, "f32", tmp_path / "m.gguf", text=text)
    assert same_ids and vs_source < 0.1  # measured 0.015 .. 0.025 at logits of about 8


def test_pre_tokenizers_are_named_as_llama_cpp_names_them_or_refused(tokenizers):
    assert detect_pre_tokenizer(tokenizers["smollm2-135m-instruct"]) == "smollm"
    with pytest.raises(ConfigError, match="llama.cpp knows no pre-tokenizer that splits text like this tokenizer"):
        detect_pre_tokenizer(build_tokenizer())  # a tokenizer trained in the tests: no published model has it
