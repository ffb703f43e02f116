"""Shared fixtures: a tokenizer trained in-process and a tiny random Llama saved as a local model folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# LLaMA-Factory's data/ folder (registry and demo sets), copied unchanged from ../shared/data/llamafactory so that
# the tests run on any clean clone; see tests/assets/llamafactory/SOURCE_COMMIT and LICENSE (Apache-2.0).
LLAMAFACTORY_DATA = REPO / "tests" / "assets" / "llamafactory"

# A ChatML template in the style models ship in tokenizer_config.json (no default system prompt).
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>", "<s>"]


def _corpus() -> list[str]:
    rows = json.loads((REPO / "data" / "alpaca_en_demo.json").read_text(encoding="utf-8"))[:300]
    zh = json.loads((REPO / "data" / "alpaca_zh_demo.json").read_text(encoding="utf-8"))[:100]
    return [r["instruction"] + " " + r["output"] for r in rows + zh] + ["system user assistant tool\n"] * 20


def build_tokenizer(vocab_size: int = 600):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>")
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


def saved_tensor_bytes(model, input_ids) -> int:
    """Bytes autograd keeps for backward in one forward pass (parameters left out, a shared storage counted once);
    the loss is taken at the last two positions."""
    import torch

    from tuneforge.model.lean_mlp import observing

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    @observing
    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=input_ids).logits[:, -2:].sum()
    return sum(storages.values())


def build_tiny_model(vocab_size: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=3, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config)


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")


def build_family_model(kind: str, vocab_size: int, seed: int = 0, **overrides):
    """A tiny random causal LM of one of the architectures TuneForge supports end to end (2 layers, hidden 64),
    with randomised norm weights so that a wrong norm convention shows in the logits."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
                  tie_word_embeddings=True)
    common.update(overrides)
    config = {"llama": lambda: LlamaConfig(**common),
              "mistral": lambda: MistralConfig(**common),
              "qwen2": lambda: Qwen2Config(**common),
              "qwen3": lambda: Qwen3Config(**{"head_dim": 128, **common}),  # the GGUF loader assumes Qwen3's 128
              # GGUF readers take the attention scale from head_dim (llama.cpp) or assume 256 (transformers)
              "gemma3_text": lambda: Gemma3TextConfig(**{"head_dim": 256, "sliding_window": 64,
                                                         "query_pre_attn_scalar": 256, **common})}[kind]()
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A local Hugging Face folder: tiny random Llama (2 layers, hidden 32) + the in-process tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tiny_config(tiny_model_dir, tmp_path):
    """A minimal valid config dict training the tiny model on the identity data set for a few steps."""
    return {
        "model": {"name_or_path": str(tiny_model_dir), "cache_dir": str(tmp_path / "cache")},
        "data": {"dataset": "identity", "dataset_dir": str(REPO / "data"), "cutoff_len": 128,
                 "placeholders": {"name": "Tiny", "author": "Tests"}, "max_samples": 16},
        "method": {"stage": "sft", "adapter": {"type": "lora", "rank": 4, "alpha": 8}},
        "train": {"max_steps": 3, "batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1, "save_steps": 2,
                  "group_by_length": False},
        "output": {"run_dir": str(tmp_path / "run")},
    }


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished two-step LoRA run of the tiny model (with a default system prompt), shared by inference tests."""
    from tuneforge.train.run import train

    root = tmp_path_factory.mktemp("tiny-run")
    config = {
        "model": {"name_or_path": str(tiny_model_dir), "cache_dir": str(root / "cache")},
        "data": {"dataset": "identity", "dataset_dir": str(REPO / "data"), "max_samples": 8,
                 "placeholders": {"name": "Tiny", "author": "Tests"}, "default_system": "Be brief."},
        "train": {"max_steps": 2, "batch_size": 4, "save_steps": 10},
        "output": {"run_dir": str(root / "run")},
    }
    return train(config).run_dir


def write_label_data(folder: Path, n: int = 12) -> Path:
    """A tiny labelled data set ({"text", "label"} rows, like the reviews) with its registry entry."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"text": f"{'great' if i % 2 else 'awful'} product number {i}", "label": i % 2} for i in range(n)]
    (folder / "labels.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (folder / "dataset_info.json").write_text(json.dumps({
        "labels": {"file_name": "labels.jsonl", "columns": {"prompt": "text", "response": "label"}},
        "identity": {"file_name": str(REPO / "data" / "identity.json")}}))
    return folder


def write_preference_data(folder: Path, prompts: list[str], chosen: str, rejected: str,
                          kto_prompts: list[str] | None = None) -> Path:
    """A separable preference set (`pairs`: chosen always beats rejected) and KTO rows (`kto`: alternately the
    rejected answer marked undesirable and the chosen one marked desirable), with their registry entries."""
    folder.mkdir(parents=True, exist_ok=True)
    pairs = [{"instruction": p, "chosen": chosen, "rejected": rejected} for p in prompts]
    kto = [{"instruction": p, "output": chosen if i % 2 else rejected, "label": bool(i % 2)}
           for i, p in enumerate(kto_prompts or prompts)]
    (folder / "pairs.json").write_text(json.dumps(pairs))
    (folder / "kto.json").write_text(json.dumps(kto))
    (folder / "dataset_info.json").write_text(json.dumps({
        "pairs": {"file_name": "pairs.json", "ranking": True,
                  "columns": {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"}},
        "kto": {"file_name": "kto.json", "columns": {"kto_tag": "label"}}}))
    return folder
