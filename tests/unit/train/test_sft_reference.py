"""TuneForge's SFT steps against a plain loop: transformers' model and loss, PEFT's LoRA, torch's AdamW.

TuneForge trains through its own paths (fused LoRA forward, a prompt shared by a batch's rows computed once, the
LM head only where a loss is taken, length-grouped batches, the fused optimizer); the reference runs the same
batches, in the order TuneForge drew them, through nothing of TuneForge's.
"""

import copy

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, get_scheduler

import tuneforge.train.trainer as trainer_module
from tuneforge.config import load_config
from tuneforge.rundir import prepare_run_dir
from tuneforge.train.prepare import build_model, prepare
from tuneforge.train.run import build_trainer


def reference_steps(model_dir, peft_config, start: dict, batches: list[dict], args, steps: int):
    """The plain loop: per-step loss and gradient norm, and the trained weights after the last step."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = base if peft_config is None else get_peft_model(base, copy.deepcopy(peft_config))
    trainable = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    assert trainable.keys() == start.keys()
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(start[name])
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=args.learning_rate, betas=(args.adam_beta1,
                                  args.adam_beta2), eps=args.adam_epsilon, weight_decay=0.0, foreach=False)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.get_warmup_steps(steps),
                              num_training_steps=steps)
    model.train()
    losses, norms = [], []
    for batch in batches:
        loss = model(**batch).loss  # transformers' shifted cross-entropy, mean over the supervised tokens
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(list(trainable.values()), args.max_grad_norm)))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, norms, {n: p.detach().clone() for n, p in trainable.items()}


@pytest.mark.parametrize("adapter,shared_system", [("lora", False), ("lora", True), ("full", True)])
def test_sft_steps_equal_a_plain_transformers_and_peft_loop(tiny_config, monkeypatch, adapter, shared_system):
    if adapter == "full":
        tiny_config["method"]["adapter"] = {"type": "full"}
    if shared_system:  # every row starts with it: TuneForge runs it once per batch
        tiny_config["data"]["default_system"] = "You are a careful assistant. Answer in one short sentence, politely."
    tiny_config["train"].update(max_steps=3, learning_rate=5e-3, group_by_length=True, weight_decay=0.0)
    cfg = load_config(tiny_config)
    prepared = prepare(cfg)
    run, _ = prepare_run_dir(cfg)
    model = build_model(cfg, prepared.source)
    with torch.no_grad():  # LoRA's B starts at zero: a value makes every LoRA weight move in step one
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(len(name)))
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    batches, original = [], trainer_module.TuneForgeTrainer.compute_loss

    def recording(self, model, inputs, *args, **kwargs):
        if model.training:
            batches.append({k: v.clone() for k, v in inputs.items()})
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(trainer_module.TuneForgeTrainer, "compute_loss", recording)
    trainer, _ = build_trainer(cfg, model, prepared, run)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h and "grad_norm" in h]
    assert len(batches) == len(logged) == 3
    if shared_system:
        assert trainer.shared_prompt_tokens > 0  # the shared-prompt path ran
    assert batches[0].keys() >= {"input_ids", "attention_mask", "labels"}

    peft_config = model.peft_config["default"] if adapter == "lora" else None
    losses, norms, weights = reference_steps(tiny_config["model"]["name_or_path"], peft_config,
                                             start, batches, trainer.args, steps=3)
    for ours, ref_loss, ref_norm in zip(logged, losses, norms):
        assert float(ours["loss"]) == pytest.approx(ref_loss, rel=1e-3)
        assert float(ours["grad_norm"]) == pytest.approx(ref_norm, rel=1e-3)
    trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert any(not torch.equal(trained[n], start[n]) for n in start)
    for name in start:  # Adam divides by the gradient's size: where that is near zero, float noise moves a weight
        # by a small share of the learning rate (here at most 3.4e-6 of 5e-3 per step, in 1 of 2,048 elements)
        torch.testing.assert_close(trained[name], weights[name], rtol=1e-4, atol=1e-5, msg=name)
