"""Write a Hugging Face causal LM and its tokenizer to a GGUF file with the `gguf` package (no llama.cpp build).

Supported architectures: llama (and mistral, which llama.cpp runs as llama), qwen2, qwen3, gemma3.
Layout conventions follow llama.cpp: llama's q/k rows are interleaved per rotary pair, Gemma's norm weights
are stored with the +1 that Hugging Face applies at run time, tied output weights are left out. The token
list has one entry per embedding row (rows no token uses become unused [PAD<i>] tokens); byte-level BPE
tokenizers carry llama.cpp's name for their pre-tokenizer, found as its converter finds it (the hash of a probe
text's token ids, `gguf_pre_tokenizers.json`); RoPE scaling (linear, YaRN, Llama 3's per-frequency factors) is
written as llama.cpp reads it. Files are checked by llama.cpp itself in the tests.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from tuneforge.errors import ConfigError

# Hugging Face model_type -> GGUF architecture
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3"}
TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q5_1": "Q5_1", "q5_0": "Q5_0",
         "q4_1": "Q4_1", "q4_0": "Q4_0"}
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
              "q5_1": "MOSTLY_Q5_1", "q5_0": "MOSTLY_Q5_0", "q4_1": "MOSTLY_Q4_1", "q4_0": "MOSTLY_Q4_0"}
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 3, 4, 5, 6


def write_gguf(model, tokenizer, path: str | Path, qtype: str = "f16", name: str = "model",
               pre_tokenizer: str | None = None) -> Path:
    import gguf

    cfg = model.config
    if cfg.model_type not in ARCHITECTURES:
        raise ConfigError(f"GGUF export supports {', '.join(ARCHITECTURES)}; this model is {cfg.model_type!r}. "
                          "hint: export --format hf, then convert with llama.cpp's convert_hf_to_gguf.py")
    if qtype not in TYPES:
        raise ConfigError(f"--gguf-type {qtype!r}: expected one of {', '.join(TYPES)}")
    arch_name = ARCHITECTURES[cfg.model_type]
    if arch_name == "gemma3" and cfg.query_pre_attn_scalar != cfg.head_dim:
        raise ConfigError("GGUF has no field for Gemma 3's query_pre_attn_scalar and readers use head_dim "
                          f"({cfg.head_dim}) in its place; this model uses {cfg.query_pre_attn_scalar}")
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), arch_name)
    _write_config(writer, cfg, arch_name, name, gguf.LlamaFileType[FILE_TYPES[qtype]])
    _write_tokenizer(writer, tokenizer, pre_tokenizer, rows=model.get_input_embeddings().weight.shape[0])
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    rope_freqs = _llama3_rope_factors(cfg)
    if rope_freqs is not None:  # llama.cpp divides its frequencies by these factors
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", rope_freqs)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConfigError(f"GGUF export: no GGUF name for tensor {hf_name!r} of {cfg.model_type}")
        data = _to_gguf_layout(tensor.detach().float(), gguf_name, arch_name, cfg).numpy()
        _add_tensor(writer, gguf_name, data, _tensor_type(gguf_name, data.shape, qtype, cfg.tie_word_embeddings))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()
    return path


def _write_config(writer, cfg, arch: str, name: str, file_type) -> None:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_freq_base(_rope_theta(cfg))
    _write_rope_scaling(writer, _rope_parameters(cfg))
    writer.add_file_type(file_type)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    if arch in ("gemma3", "qwen3"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == "gemma3" and getattr(cfg, "sliding_window", None):
        writer.add_sliding_window(cfg.sliding_window)


def _rope_parameters(cfg) -> dict:
    params = getattr(cfg, "rope_parameters", None) or {}
    if "full_attention" in params:  # per-layer-type parameters (Gemma 3): the global layers'
        params = params["full_attention"]
    return params


def _rope_theta(cfg) -> float:
    return float(_rope_parameters(cfg).get("rope_theta") or getattr(cfg, "rope_theta", 10000.0))


def _write_rope_scaling(writer, params: dict) -> None:
    import gguf

    kind, factor = params.get("rope_type", "default"), params.get("factor")
    if kind in ("default", "llama3"):  # llama3: per-frequency factors in the rope_freqs tensor
        return
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(factor)
        writer.add_rope_scaling_orig_ctx_len(params["original_max_position_embeddings"])
        for key, add in (("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
                         ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):
            if params.get(key) is not None:
                add(params[key])
    else:
        raise ConfigError(f"GGUF export: RoPE scaling {kind!r} is not written by TuneForge; hint: export --format hf, "
                          "then convert with llama.cpp's convert_hf_to_gguf.py")


def _llama3_rope_factors(cfg) -> np.ndarray | None:
    """Llama 3.x RoPE: llama.cpp divides each base frequency by a factor from a `rope_freqs` tensor. The factors
    are the ratio of the unscaled to the scaled inverse frequencies that transformers itself computes."""
    if _rope_parameters(cfg).get("rope_type") != "llama3":
        return None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    plain = 1.0 / (_rope_theta(cfg) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    return (plain / scaled.double()).float().numpy()


def _to_gguf_layout(w: torch.Tensor, gguf_name: str, arch: str, cfg) -> torch.Tensor:
    if arch == "llama" and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
        heads = cfg.num_attention_heads if ".attn_q." in gguf_name else cfg.num_key_value_heads
        # Hugging Face keeps each head's rotary halves apart ([x0..x{d/2}), [x{d/2}..xd)); llama.cpp's llama
        # rotates adjacent pairs, so rows become (x0, x{d/2}, x1, x{d/2+1}, ...) within every head.
        half = w.shape[0] // heads // 2
        return w.reshape(heads, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
    if arch == "gemma3" and gguf_name.endswith("norm.weight"):
        return w + 1  # Gemma's RMSNorm multiplies by (1 + weight); llama.cpp stores the factor itself
    return w


def _tensor_type(gguf_name: str, shape: tuple[int, ...], qtype: str, tied: bool):
    """The GGML type a tensor is stored in for a file of type `qtype`."""
    import gguf

    if len(shape) == 1 or qtype == "f32":
        return gguf.GGMLQuantizationType.F32
    projects_logits = gguf_name == "output.weight" or (gguf_name == "token_embd.weight" and tied)
    if projects_logits and qtype in ("q5_1", "q5_0", "q4_1", "q4_0"):  # kept higher, as llama.cpp's quantizer does
        qtype = "q8_0"
    kind = gguf.GGMLQuantizationType[TYPES[qtype]]
    if shape[-1] % gguf.GGML_QUANT_SIZES[kind][0]:  # rows that do not split into blocks stay in f16 (as llama.cpp)
        return gguf.GGMLQuantizationType.F16
    return kind


def _encode(data: np.ndarray, kind) -> np.ndarray:
    import gguf

    if kind == gguf.GGMLQuantizationType.F32:
        return data.astype(np.float32)
    if kind == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data.astype(np.float32), kind)


def _add_tensor(writer, name: str, data: np.ndarray, kind) -> None:
    import gguf

    encoded = _encode(data, kind)
    if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        writer.add_tensor(name, encoded)
    else:
        writer.add_tensor(name, encoded, raw_shape=encoded.shape, raw_dtype=kind)


@torch.no_grad()
def readers_view(model, qtype: str):
    """A copy of `model` whose weights are what a GGUF reader dequantizes from a file of type `qtype`, for
    measuring how far a reader's arithmetic moves the logits beyond the storage format itself."""
    import copy

    import gguf

    view = copy.deepcopy(model)
    names = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items()
                                          if n == ARCHITECTURES[model.config.model_type]), model.config.num_hidden_layers)
    for hf_name, tensor in view.state_dict().items():
        if hf_name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # the same tensor as the embeddings
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        kind = _tensor_type(gguf_name or "", tuple(tensor.shape), qtype, model.config.tie_word_embeddings)
        data = tensor.float().numpy()
        stored = _encode(data, kind)
        back = gguf.quants.dequantize(stored, kind) if kind not in (gguf.GGMLQuantizationType.F32,
                                                                    gguf.GGMLQuantizationType.F16) else stored
        tensor.copy_(torch.from_numpy(np.asarray(back, dtype=np.float32).reshape(data.shape)))
    return view


def _write_tokenizer(writer, tokenizer, pre: str | None, rows: int) -> None:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model["type"] != "BPE":
        raise ConfigError(f"GGUF export handles BPE tokenizers; this one is {model['type']}")
    vocab = dict(model["vocab"])
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    size = max(max(vocab.values()) + 1, rows)  # one token per embedding row: readers check the two agree
    tokens = [f"[PAD{i}]" for i in range(size)]
    for token, i in vocab.items():
        tokens[i] = token
    used = set(vocab.values())
    special = {a["content"] for a in spec.get("added_tokens", []) if a.get("special")}
    added = {a["content"] for a in spec.get("added_tokens", []) if not a.get("special")}
    byte_fallback = bool(model.get("byte_fallback"))
    types = [TOKEN_UNUSED if i not in used else TOKEN_CONTROL if t in special else TOKEN_USER_DEFINED if t in added
             else TOKEN_BYTE if byte_fallback and t.startswith("<0x") and t.endswith(">") and len(t) == 6
             else TOKEN_NORMAL for i, t in enumerate(tokens)]
    if byte_fallback:  # sentencepiece-style vocabulary (Gemma): llama.cpp's "llama" tokenizer
        writer.add_tokenizer_model("llama")
        writer.add_token_scores([-float(i) for i in range(size)])  # merge priority follows token order
        writer.add_add_space_prefix(False)
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre or detect_pre_tokenizer(tokenizer))
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    for key, token in (("bos", tokenizer.bos_token), ("eos", tokenizer.eos_token), ("unk", tokenizer.unk_token),
                       ("pad", tokenizer.pad_token)):
        if token is not None and token in vocab:
            getattr(writer, f"add_{key}_token_id")(vocab[token])
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


@lru_cache(maxsize=1)
def _pre_tokenizer_table() -> dict:
    return json.loads(resources.files("tuneforge.export").joinpath("gguf_pre_tokenizers.json").read_text("utf-8"))


def detect_pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer (how text is split before merging: digits,
    contractions, CJK), identified as llama.cpp's converter identifies it. Unknown ones are refused: a reader
    would split text differently from how the model was trained."""
    table = _pre_tokenizer_table()
    digest = hashlib.sha256(str(tokenizer.encode(table["probe"])).encode()).hexdigest()
    if digest not in table["hashes"]:
        raise ConfigError(f"GGUF export: llama.cpp knows no pre-tokenizer that splits text like this tokenizer "
                          f"(probe hash {digest[:16]}...), so llama.cpp and Ollama would tokenize differently from "
                          "training. hint: export --format hf and convert with a llama.cpp release whose "
                          "convert_hf_to_gguf.py knows the model")
    return table["hashes"][digest][0]
