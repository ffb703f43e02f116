"""Gated MLPs keep gate and up only: bitwise the same loss and gradients, one intermediate tensor less kept."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from tests.conftest import saved_tensor_bytes
from tuneforge.model.lean_mlp import lean_mlps


def _model(kind: str, lora: bool, lean: bool, **extra):
    config = AutoConfig.for_model(kind, hidden_size=64, intermediate_size=160, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, num_hidden_layers=2, vocab_size=120, **extra)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = ["full_attention"] * 2
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                                                 init_lora_weights=False))
    changed = lean_mlps(model) if lean else 0
    return model.train(), changed


def _loss_and_grads(model, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3_text"])  # SiLU, SiLU, tanh-approximated GELU
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_the_same_loss_and_gradients_bit_for_bit(kind, lora):
    ids = torch.randint(0, 120, (2, 24), generator=torch.Generator().manual_seed(1))
    plain, _ = _model(kind, lora, lean=False)
    lean, changed = _model(kind, lora, lean=True)
    assert changed == 2  # one MLP per block
    loss, grads = _loss_and_grads(plain, ids)
    lean_loss, lean_grads = _loss_and_grads(lean, ids)
    assert torch.equal(loss, lean_loss)
    assert grads.keys() == lean_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert torch.equal(grad, lean_grads[name]), name


def test_one_intermediate_tensor_less_is_kept():
    def saved_bytes(model):
        return saved_tensor_bytes(model, torch.zeros(1, 24, dtype=torch.long))

    plain, _ = _model("llama", True, lean=False)
    lean, _ = _model("llama", True, lean=True)
    assert saved_bytes(plain) - saved_bytes(lean) == 2 * 24 * 160 * 4  # two blocks x 24 tokens x width, float32


def test_other_activations_are_left_alone():
    model, changed = _model("llama", True, lean=True, hidden_act="relu")
    assert changed == 0
