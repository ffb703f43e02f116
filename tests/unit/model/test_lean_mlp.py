"""Gated MLPs keep gate and up only, norms recompute their outputs: bitwise the same loss, the same gradients (bit for
bit for the MLPs; the fused norms sum in another order), less kept."""

import importlib

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from tests.conftest import saved_tensor_bytes
from tuneforge.model.lean_mlp import lean_mlps, lean_norms


def _model(kind: str, lora: bool, lean: bool, norms: bool = True, **extra):
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
    if lean and norms:
        assert lean_norms(model) == 2
    return model.train(), changed


def _loss_and_grads(model, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3_text"])  # SiLU, SiLU, tanh-approximated GELU
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("norms", [False, True], ids=["mlps", "mlps+norms"])
def test_the_same_loss_and_gradients(kind, lora, norms):
    """Bit for bit with lean MLPs only; with the fused norms too the loss is still bit for bit (the forward runs
    the models' own steps) and the gradients agree to float32 rounding."""
    ids = torch.randint(0, 120, (2, 24), generator=torch.Generator().manual_seed(1))
    plain, _ = _model(kind, lora, lean=False)
    lean, changed = _model(kind, lora, lean=True, norms=norms)
    assert changed == 2  # one MLP per block
    loss, grads = _loss_and_grads(plain, ids)
    lean_loss, lean_grads = _loss_and_grads(lean, ids)
    assert torch.equal(loss, lean_loss)
    assert grads.keys() == lean_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        if norms:
            torch.testing.assert_close(lean_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
        else:
            assert torch.equal(grad, lean_grads[name]), name


def _norm_classes():
    from tuneforge.model.lean_mlp import SCALED_NORMS

    for name in sorted(SCALED_NORMS):
        family = name[: -len("RMSNorm")].lower()
        try:
            module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        except ImportError:
            continue
        if hasattr(module, name):
            yield getattr(module, name)


@pytest.mark.parametrize("norm_class", list(_norm_classes()), ids=lambda c: c.__name__)
@pytest.mark.parametrize("trains_weight", [False, True], ids=["frozen", "trained"])
def test_the_fused_norm_computes_each_class_own_forward(norm_class, trains_weight):
    """ScaledNorm against the class's own forward: the same output bits, gradients to rounding. Fails when a
    transformers release changes one of these norms' arithmetic."""
    from tuneforge.model.lean_mlp import ScaledNorm, _norm_scale

    torch.manual_seed(3)
    norm = norm_class(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(0.5, 0.3)
    norm.weight.requires_grad_(trains_weight)
    x = torch.randn(3, 7, 64) * 4
    grad = torch.randn(3, 7, 64)
    results = []
    for fused in (False, True):
        inputs = x.clone().requires_grad_()
        norm.weight.grad = None
        if fused:
            scale, eps = _norm_scale(norm)
            out = ScaledNorm.apply(inputs, scale, eps)
        else:
            out = norm(inputs)
        out.backward(grad)
        results.append((out.detach(), inputs.grad, norm.weight.grad))
    (out, grad_x, grad_w), (fused_out, fused_grad_x, fused_grad_w) = results
    assert torch.equal(out, fused_out)
    torch.testing.assert_close(fused_grad_x, grad_x, rtol=1e-5, atol=1e-6)
    if trains_weight:
        torch.testing.assert_close(fused_grad_w, grad_w, rtol=1e-5, atol=1e-5)
    else:
        assert fused_grad_w is None


def test_two_intermediate_tensors_less_are_kept():
    def saved_bytes(model):
        return saved_tensor_bytes(model, torch.zeros(1, 24, dtype=torch.long))

    plain, _ = _model("llama", True, lean=False)
    lean, _ = _model("llama", True, lean=True, norms=False)
    # act(gate) and the product: two blocks x 24 tokens x width x 2, float32
    assert saved_bytes(plain) - saved_bytes(lean) == 2 * 24 * 160 * 4 * 2


def test_the_norms_outputs_are_not_kept():
    def saved_bytes(model):
        return saved_tensor_bytes(model, torch.zeros(1, 24, dtype=torch.long))

    mlps, _ = _model("llama", True, lean=True, norms=False)
    both, _ = _model("llama", True, lean=True)
    assert saved_bytes(mlps) - saved_bytes(both) == 2 * 2 * 24 * 64 * 4  # two norms x two blocks x 24 tokens x width


def test_other_activations_are_left_alone():
    model, changed = _model("llama", True, lean=True, hidden_act="relu")
    assert changed == 0


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    """Non-reentrant checkpointing packs saved tensors with hooks of its own (the product is left to them);
    reentrant checkpointing recomputes each block with the lean MLP's hooks in force."""
    ids = torch.randint(0, 120, (2, 24), generator=torch.Generator().manual_seed(2))
    results = []
    for lean in (False, True):
        model, _ = _model("llama", False, lean=lean)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.enable_input_require_grads()
        results.append(_loss_and_grads(model, ids))
    (loss, grads), (lean_loss, lean_grads) = results
    assert torch.equal(loss, lean_loss) and grads.keys() == lean_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(lean_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_inference_keeps_nothing():
    model, _ = _model("llama", True, lean=True)
    with torch.no_grad():
        out = model(input_ids=torch.zeros(1, 8, dtype=torch.long)).logits
    assert out.grad_fn is None


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_the_product_is_freed_after_the_forward_pass(lora):
    """Nothing (autograd's saved tensors, the hooks autograd keeps with them) holds down_proj's input."""
    import weakref

    model, _ = _model("llama", lora, lean=True)
    inputs = []
    for module in model.modules():
        if type(module).__name__ == "LlamaMLP":
            module.down_proj.register_forward_pre_hook(lambda _, args: inputs.append(weakref.ref(args[0])))
    loss = model(input_ids=torch.zeros(1, 24, dtype=torch.long), labels=torch.zeros(1, 24, dtype=torch.long)).loss
    assert len(inputs) == 2 and all(ref() is None for ref in inputs)
    loss.backward()


def test_training_builds_lean_norms_unless_weights_are_sharded(tiny_config):
    """Norms recompute with their whole weight: not under DeepSpeed or FSDP, whose weights may be sharded then."""
    from tests.conftest import REPO
    from tuneforge.config import load_config
    from tuneforge.train.prepare import build_model, prepare

    def lean_layers(overrides):
        cfg = load_config(tiny_config, overrides)
        model = build_model(cfg, prepare(cfg).source)
        return sum(hasattr(module, "_lean_inner_forward") for module in model.modules())

    assert lean_layers([]) == 2
    assert lean_layers([f"train.deepspeed={REPO / 'examples/deepspeed/ds_z3.json'}"]) == 0
