"""LoRA variants and training switches on a tiny model: DoRA, rsLoRA, LoRA+, NEFTune.

For each: the right parameters train, one step changes them, and the saved run reloads (and merges) to the
model that was trained.
"""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.conftest import build_tiny_model
from tuneforge.config import LoraAdapter, load_config
from tuneforge.errors import ConfigError, ModelError
from tuneforge.export.export import export_run
from tuneforge.infer.engine import Engine
from tuneforge.model.adapters import apply_adapter, load_adapted_base, loraplus_param_groups
from tuneforge.rundir import prepare_run_dir
from tuneforge.train.prepare import build_model, prepare
from tuneforge.train.run import build_trainer, train


def test_dora_adds_a_trained_magnitude_per_adapted_layer():
    model = apply_adapter(build_tiny_model(100), LoraAdapter(rank=2, alpha=4, dora=True))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    magnitudes = [n for n in names if "lora_magnitude_vector" in n]
    assert len(magnitudes) == 7 * 2  # one per adapted linear layer (7 per layer, 2 layers)
    assert all(".lora_A." in n or ".lora_B." in n or "lora_magnitude_vector" in n for n in names)


@pytest.mark.parametrize("rslora, expected", [(False, 8 / 4), (True, 8 / math.sqrt(4))])
def test_rslora_scales_by_the_square_root_of_the_rank(rslora, expected):
    model = apply_adapter(build_tiny_model(100), LoraAdapter(rank=4, alpha=8, rslora=rslora))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(expected)


def test_loraplus_groups_give_b_matrices_the_higher_rate():
    model = apply_adapter(build_tiny_model(100), LoraAdapter(rank=2, alpha=4))
    groups = loraplus_param_groups(model, lr=1e-4, ratio=16, weight_decay=0.1)
    by_id = {id(p): g["lr"] for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert by_id[id(p)] == pytest.approx(1.6e-3 if "lora_B" in name else 1e-4), name
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())


def test_loraplus_is_only_for_lora(tiny_config):
    tiny_config["method"]["adapter"] = {"type": "full", "loraplus_lr_ratio": 16}
    with pytest.raises(ConfigError, match="loraplus_lr_ratio"):
        load_config(tiny_config)


def test_one_loraplus_step_moves_b_faster(tiny_config):
    tiny_config["method"]["adapter"].update(loraplus_lr_ratio=16)
    tiny_config["train"].update(max_steps=1, learning_rate=1e-3, lr_scheduler="constant", optim="sgd",
                                max_grad_norm=0)
    cfg = load_config(tiny_config)
    prepared = prepare(cfg)
    run, _ = prepare_run_dir(cfg)
    model = build_model(cfg, prepared.source)
    for name, p in model.named_parameters():  # B starts at zero: give it a value so that A gets a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    trainer, _ = build_trainer(cfg, model, prepared, run)
    trainer.train()
    rates = sorted({g["lr"] for g in trainer.optimizer.param_groups})
    assert rates == pytest.approx([1e-3, 1.6e-2])
    assert all(p.grad is None or p.requires_grad for p in model.parameters())


def test_a_dora_rslora_run_saves_reloads_and_merges_to_what_was_trained(tiny_config, tmp_path):
    tiny_config["method"]["adapter"].update(dora=True, rslora=True)
    tiny_config["train"].update(max_steps=2, learning_rate=1e-2)
    run = train(tiny_config).run_dir
    settings = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert settings["use_dora"] is True and settings["use_rslora"] is True
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    assert any("lora_magnitude_vector" in k for k in saved)

    engine = Engine.load(str(run))
    ids = torch.tensor([engine.prompt_ids([{"role": "user", "content": "Who are you?"}])])
    merged = AutoModelForCausalLM.from_pretrained(export_run(run, tmp_path / "hf")).eval()
    with torch.no_grad():
        adapted = engine.model(input_ids=ids).logits
        with engine.model.disable_adapter():
            base = engine.model(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)
    assert (adapted - base).abs().max() > 1e-4


def test_neftune_adds_noise_to_embeddings_only_while_training(tiny_config):
    tiny_config["train"].update(neftune_alpha=5.0, max_steps=1)
    cfg = load_config(tiny_config)
    prepared = prepare(cfg)
    run, _ = prepare_run_dir(cfg)
    model = build_model(cfg, prepared.source)
    trainer, _ = build_trainer(cfg, model, prepared, run)
    seen = []
    embeddings = model.get_input_embeddings()
    ids = torch.tensor([[1, 2, 3, 4]])
    clean = embeddings(ids).detach()

    original_loss = trainer.compute_loss

    def spy(model_, inputs, *args, **kwargs):  # called inside the training step, the model in train mode
        seen.append((embeddings(ids).detach() - clean).abs().max().item())
        return original_loss(model_, inputs, *args, **kwargs)

    trainer.compute_loss = spy
    trainer.train()
    assert seen and seen[0] > 0  # noisy inside training
    embeddings.train()
    assert torch.equal(embeddings(ids).detach(), clean)  # clean afterwards, even in train mode: the hook is gone


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_runs_save_an_adapter_for_the_original_base(tiny_config, init):
    from tuneforge.train.run import save_weights

    tiny_config["method"]["adapter"].update(init=init)
    tiny_config["train"].update(max_steps=2, learning_rate=1e-2)
    cfg = load_config(tiny_config)
    prepared = prepare(cfg)
    run, _ = prepare_run_dir(cfg)
    model = build_model(cfg, prepared.source)
    base = AutoModelForCausalLM.from_pretrained(prepared.source.path).eval()
    residual = model.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight
    assert not torch.allclose(residual, base.model.layers[0].mlp.up_proj.weight)  # the base was moved
    model.save_pretrained(str(run.path / "adapter_init"))
    trainer, _ = build_trainer(cfg, model, prepared, run)
    trainer.train()
    save_weights(trainer, prepared, run, cfg)

    settings = json.loads((run.path / "adapter" / "adapter_config.json").read_text())
    assert settings["r"] == 2 * 4 and settings["init_lora_weights"] is True  # converted: plain LoRA, twice the rank
    engine = Engine.load(str(run.path))  # the original base + the converted adapter
    ids = torch.tensor([engine.prompt_ids([{"role": "user", "content": "Who are you?"}])])
    with torch.no_grad():
        torch.testing.assert_close(engine.model(input_ids=ids).logits, model.eval()(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)
        assert (engine.model(input_ids=ids).logits - base(input_ids=ids).logits).abs().max() > 1e-4


def test_pissa_is_refused_where_the_base_is_a_reference(tiny_config):
    tiny_config["method"] = {"stage": "dpo", "adapter": {"type": "lora", "init": "pissa"}}
    with pytest.raises(ConfigError, match="init: pissa works with plain LoRA"):
        load_config(tiny_config)


def test_a_pissa_run_through_train_keeps_its_start_and_saves_the_converted_adapter(tiny_config):
    tiny_config["method"]["adapter"].update(init="pissa")
    run = train(tiny_config).run_dir
    assert (run / "adapter_init" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 8


def _coarse_loftq(weight, num_bits, reduced_rank, num_iter=1):
    """A CPU stand-in for PEFT's bitsandbytes LoftQ step: round each row to 2^(bits-1)-1 levels, then the best
    rank-r fit of the rounding error (B = L, A = R)."""
    step = weight.abs().amax(dim=1, keepdim=True) / (2 ** (num_bits - 1) - 1)
    quantized = torch.round(weight / step) * step
    u, s, vh = torch.linalg.svd(weight - quantized, full_matrices=False)
    root = s[:reduced_rank].sqrt()
    return quantized, root[:, None] * vh[:reduced_rank], u[:, :reduced_rank] * root


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a CUDA GPU")
def test_loftq_without_a_gpu_says_what_it_needs(tiny_config):
    tiny_config["method"]["adapter"].update(init="loftq")
    with pytest.raises(ConfigError, match="loftq quantizes the base weights with bitsandbytes on a CUDA GPU"):
        train(tiny_config)
    assert not Path(tiny_config["output"]["run_dir"]).exists()  # refused before anything was written


def test_a_loftq_run_keeps_the_quantized_base_it_trained_on_and_reloads_to_it(tiny_config, monkeypatch, tmp_path):
    import peft.tuners.lora.layer
    from peft import PeftModel

    monkeypatch.setattr(peft.tuners.lora.layer, "loftq_init", _coarse_loftq)
    monkeypatch.setattr("tuneforge.train.prepare.check_loftq", lambda: None)
    tiny_config["method"]["adapter"].update(init="loftq", loftq_bits=4)
    tiny_config["train"].update(max_steps=2, learning_rate=1e-2)
    run = train(tiny_config).run_dir

    base = AutoModelForCausalLM.from_pretrained(load_config(tiny_config).model.name_or_path).eval()
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["init_lora_weights"] is True
    saved = load_file(run / "adapted_base.safetensors")
    assert len(saved) == 7 * 2  # every adapted linear layer of the 2 blocks
    original = base.state_dict()
    for name, weight in saved.items():
        torch.testing.assert_close(weight, _coarse_loftq(original[name], 4, 4)[0])
    engine = Engine.load(str(run))
    ids = torch.tensor([engine.prompt_ids([{"role": "user", "content": "Who are you?"}])])
    source = load_config(tiny_config).model.name_or_path
    quantized = AutoModelForCausalLM.from_pretrained(source).eval()
    assert not quantized.load_state_dict(saved, strict=False).unexpected_keys
    with torch.no_grad():
        trained = engine.model(input_ids=ids).logits
        on_quantized = PeftModel.from_pretrained(quantized, str(run / "adapter")).eval()(input_ids=ids).logits
        on_original = PeftModel.from_pretrained(base, str(run / "adapter")).eval()(input_ids=ids).logits
    torch.testing.assert_close(trained, on_quantized, rtol=1e-5, atol=1e-5)
    assert (trained - on_original).abs().max() > 1e-4  # the kept weights matter
    merged = AutoModelForCausalLM.from_pretrained(export_run(run, tmp_path / "hf")).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, trained, rtol=1e-4, atol=1e-4)


def test_kept_base_weights_from_another_model_are_refused_by_name(tiny_config, tmp_path):
    from safetensors.torch import save_file

    model = AutoModelForCausalLM.from_pretrained(load_config(tiny_config).model.name_or_path)
    path = tmp_path / "adapted_base.safetensors"
    save_file({"model.layers.99.mlp.up_proj.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ModelError, match="model.layers.99.mlp.up_proj.weight.*trained on another"):
        load_adapted_base(model, path)


def test_lora_b_is_column_major_with_the_same_values_gradients_and_saved_adapter(tiny_config, tmp_path):
    from tuneforge.model.adapters import column_major_lora_up

    cfg = load_config(tiny_config)
    prepared = prepare(cfg)
    model = build_model(cfg, prepared.source)
    ups = {n: m.weight for n, m in model.named_modules() if n.endswith("lora_B.default")}
    assert ups and all(not w.is_contiguous() and w.t().is_contiguous() for w in ups.values())
    assert column_major_lora_up(model) == 0  # already done once: nothing left to change
    other = build_model(load_config(tiny_config, ["train.optim=adafactor"]), prepared.source)
    assert all(p.is_contiguous() for p in other.parameters())  # left alone for optimizers outside torch's AdamW
    with torch.no_grad():
        for w in ups.values():
            w.normal_(std=0.02)  # B not zero, so that it shows in every gradient; in place: the layout stays
    plain = build_model(cfg, prepared.source)
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if name.removesuffix(".weight") in ups:
                p.data = ups[name.removesuffix(".weight")].detach().contiguous()  # the same values, row-major
    ids = torch.randint(3, 100, (2, 24))
    losses = []
    for m in (model, plain):
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        losses.append(out.loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    theirs = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-5, atol=1e-7)
            if name.endswith("lora_B.default.weight"):
                assert p.grad.stride() == p.stride()  # computed in B's own (column-major) layout
                assert theirs[name].is_contiguous()
    model.save_pretrained(tmp_path / "adapter")
    saved = {k: v for k, v in load_file(tmp_path / "adapter" / "adapter_model.safetensors").items() if "lora_B" in k}
    assert len(saved) == len(ups)
    for key, tensor in saved.items():
        (name,) = [n for n in ups if n.endswith(key.removeprefix("base_model.model.").removesuffix(".weight")
                                                .replace("lora_B", "lora_B.default"))]
        assert torch.equal(tensor, ups[name].detach())


def test_resumed_optimizer_states_take_their_weights_layout():
    from tuneforge.train.trainer import conform_optimizer_state

    torch.manual_seed(0)
    start = torch.randn(6, 3)
    col = torch.nn.Parameter(start.t().contiguous().t())  # a column-major B
    row = torch.nn.Parameter(start.clone())  # the same weight as a checkpoint from before wrote it
    ours, theirs = (torch.optim.AdamW([p], lr=0.1, fused=True) for p in (col, row))
    grads = [torch.randn(6, 3) for _ in range(3)]
    row.grad = grads[0].clone()
    theirs.step()
    col.grad = grads[0].t().contiguous().t()  # autograd hands a weight its gradient in the weight's layout
    ours.step()
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))  # row-major states onto a column-major weight
    assert conform_optimizer_state(ours) == 2  # exp_avg and exp_avg_sq
    assert conform_optimizer_state(ours) == 0
    for g in grads[1:]:
        row.grad, col.grad = g.clone(), g.t().contiguous().t()
        theirs.step()
        ours.step()
    assert torch.equal(col, row)
