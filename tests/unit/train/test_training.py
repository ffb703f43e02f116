"""The real Trainer on a tiny random Llama: what changes, accumulation, resume, interruption, run directory."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from tuneforge.config import load_config
from tuneforge.errors import ConfigError, TrainingError, UserError
from tuneforge.train.prepare import build_model, prepare
from tuneforge.train.check import check
from tuneforge.train.run import build_trainer, train
from tuneforge.rundir import prepare_run_dir


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_losses(run_dir):
    return {m["step"]: m["loss"] for m in metrics(run_dir) if "loss" in m}


def test_a_run_writes_everything_a_run_directory_promises(tiny_config, tmp_path):
    result = train(tiny_config)
    run = result.run_dir
    assert result.status == "completed"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "adapter" / "tokenizer.json").is_file() and (run / "loss.png").stat().st_size > 1000
    assert load_config(run / "config.yaml").model.name_or_path == tiny_config["model"]["name_or_path"]
    meta = json.loads((run / "run.json").read_text())
    assert meta["status"] == "completed" and meta["global_step"] == 3 and meta["stop"] == ["<|im_end|>"]
    logged = [m for m in metrics(run) if "loss" in m]
    assert [m["step"] for m in logged] == [1, 2, 3]
    assert all(m["tokens_per_second"] > 0 and m["supervised_tokens_per_second"] > 0 for m in logged)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-3"]


@pytest.mark.parametrize("adapter", [{"type": "lora", "rank": 4, "alpha": 8},
                                     {"type": "freeze", "trainable_layers": 1}, {"type": "full"}])
def test_one_step_changes_every_trainable_parameter_and_no_frozen_one(tiny_config, adapter):
    tiny_config["method"]["adapter"] = adapter
    tiny_config["train"].update(max_steps=1, learning_rate=1e-2)
    cfg = load_config(tiny_config)
    prepared = prepare(cfg)
    run, _ = prepare_run_dir(cfg)
    model = build_model(cfg, prepared.source)
    if adapter["type"] == "lora":  # B starts at zero: give it a value so that A gets a gradient in step one
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer, _ = build_trainer(cfg, model, prepared, run)
    trainer.train()
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        assert changed == p.requires_grad, name


def _grads_after_one_step(tiny_config, batch, accumulation):
    tiny_config["method"]["adapter"] = {"type": "full"}
    tiny_config["train"].update(max_steps=1, batch_size=batch, gradient_accumulation_steps=accumulation,
                                optim="sgd", learning_rate=1.0, max_grad_norm=0, lr_scheduler="constant")
    tiny_config["output"]["run_dir"] += f"-{batch}x{accumulation}"
    cfg = load_config(tiny_config)
    prepared = prepare(cfg)
    run, _ = prepare_run_dir(cfg)
    model = build_model(cfg, prepared.source)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer, _ = build_trainer(cfg, model, prepared, run)
    out = trainer.train()
    # plain SGD with lr 1: the update is exactly minus the gradient
    return {n: before[n] - p.detach() for n, p in model.named_parameters()}, out.training_loss


def test_batch_4_equals_batch_1_with_4_accumulation_steps(tiny_config):
    grads_a, loss_a = _grads_after_one_step(tiny_config, 4, 1)
    grads_b, loss_b = _grads_after_one_step(tiny_config, 1, 4)
    assert abs(loss_a - loss_b) < 1e-5
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6)


def test_new_weights_start_from_the_seed(tiny_config):
    prepared = prepare(load_config(tiny_config))
    cfg = load_config(tiny_config, ["method.stage=rm"])  # a LoRA adapter and a new score head: both drawn at random
    torch.manual_seed(1)
    first = {k: v.clone() for k, v in build_model(cfg, prepared.source).state_dict().items()}
    torch.manual_seed(2)  # whatever ran before must not matter
    again = build_model(cfg, prepared.source).state_dict()
    fresh = [k for k in first if "lora_" in k or "score" in k]
    assert fresh and all(torch.equal(first[k], again[k]) for k in first)
    other = build_model(load_config(tiny_config, ["method.stage=rm", "train.seed=7"]), prepared.source).state_dict()
    assert any(not torch.equal(first[k], other[k]) for k in fresh)


@pytest.mark.parametrize("grouped", [False, True])
def test_resume_reproduces_the_next_step_losses(tiny_config, grouped):
    tiny_config["train"].update(max_steps=4, save_steps=2, group_by_length=grouped)
    full = train(tiny_config).run_dir
    tiny_config["output"]["run_dir"] += "-resumed"
    first = train(tiny_config, ["train.max_steps=4", "train.save_steps=2"])  # same run, then resume from step 2
    resumed = train(tiny_config, [f"train.resume_from_checkpoint={first.run_dir}/checkpoints/checkpoint-2"])
    assert resumed.status == "completed"
    reference, again = step_losses(full), step_losses(resumed.run_dir)
    assert again[3] == pytest.approx(reference[3], abs=1e-6) and again[4] == pytest.approx(reference[4], abs=1e-6)
    records = [json.loads(line) for line in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]  # steps 3, 4 logged once, after the resume


def test_length_grouped_batches_come_from_tuneforges_sampler(tiny_config):
    from tuneforge.data.sampler import LengthBuckets

    cfg = load_config(tiny_config, ["train.group_by_length=true"])
    prepared = prepare(cfg)
    run, _ = prepare_run_dir(cfg)
    trainer, _ = build_trainer(cfg, build_model(cfg, prepared.source), prepared, run)
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, LengthBuckets) and sampler.batch_size == 4
    assert sampler.lengths == [len(x) for x in prepared.data.train.input_ids]
    cfg = load_config(tiny_config)  # group_by_length off: transformers' random sampler
    trainer, _ = build_trainer(cfg, build_model(cfg, prepared.source), prepared, run)
    assert not isinstance(trainer._get_train_sampler(), LengthBuckets)


def test_warmup_ratio_is_a_share_of_the_steps(tiny_config):
    """transformers 5 reads a warmup_steps value below 1 as a ratio of the steps (TrainingArguments.get_warmup_steps);
    pinned here, so that a change of that meaning upstream shows."""
    tiny_config["train"].update(max_steps=4, warmup_ratio=0.5, lr_scheduler="constant_with_warmup",
                                learning_rate=1e-3, logging_steps=1)
    records = [json.loads(line) for line in (train(tiny_config).run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["learning_rate"] for r in records if "learning_rate" in r]
    assert rates == pytest.approx([0.0, 5e-4, 1e-3, 1e-3])  # two warmup steps of four (rate used in each step)


class _InterruptAfter(TrainerCallback):
    def __init__(self, stop, step):
        self.stop, self.step = stop, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.stop.requested = True  # what the first Ctrl-C does


def test_an_interrupted_run_keeps_a_checkpoint_and_resumes(tiny_config, monkeypatch):
    import tuneforge.train.run as run_module

    tiny_config["train"].update(max_steps=5, save_steps=100)
    real_build = run_module.build_trainer

    def build_interrupting(*args, **kwargs):
        trainer, stop = real_build(*args, **kwargs)
        trainer.callback_handler.callbacks.insert(0, _InterruptAfter(stop, 2))
        return trainer, stop

    monkeypatch.setattr(run_module, "build_trainer", build_interrupting)
    stopped = train(tiny_config)
    assert stopped.status == "interrupted"
    assert (stopped.run_dir / "checkpoints" / "checkpoint-2").is_dir()
    assert json.loads((stopped.run_dir / "run.json").read_text())["status"] == "interrupted"
    monkeypatch.setattr(run_module, "build_trainer", real_build)
    resumed = train(tiny_config, ["train.resume_from_checkpoint=auto"])
    assert resumed.status == "completed" and json.loads((resumed.run_dir / "run.json").read_text())["global_step"] == 5


def test_an_existing_run_is_not_overwritten_by_accident(tiny_config):
    train(tiny_config)
    with pytest.raises(ConfigError, match=r"already holds a run \(status: completed\). hint: start again with "
                                          r"output.overwrite=true \(the old run is kept as .prev"):
        train(tiny_config)
    assert train(tiny_config, ["output.overwrite=true"]).status == "completed"
    assert not Path(tiny_config["output"]["run_dir"] + ".prev").exists()  # gone once the new run completed


def test_a_foreign_folder_is_never_cleared(tiny_config, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not a TuneForge run directory"):
        train(tiny_config, ["output.overwrite=true"])
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_overwrite_never_deletes_files_tuneforge_did_not_write(tiny_config, tmp_path):
    run = train(tiny_config).run_dir
    (run / "my_notes.md").write_text("mine")
    (run / "reviews.jsonl").write_text("{}")
    with pytest.raises(ConfigError, match=r"also holds files TuneForge did not write \(my_notes.md, reviews.jsonl\)"):
        train(tiny_config, ["output.overwrite=true"])
    assert (run / "my_notes.md").read_text() == "mine" and (run / "adapter").is_dir()


@pytest.mark.parametrize("broken", ["train.optim=adamw_bogus", "train.learning_rate=inf", "model.name_or_path=nope/x"])
def test_a_bad_overwrite_leaves_the_previous_run_untouched(tiny_config, broken):
    run = train(tiny_config).run_dir
    before = {p.relative_to(run): p.stat().st_mtime_ns for p in run.rglob("*")}
    with pytest.raises(UserError):
        train(tiny_config, ["output.overwrite=true", broken])
    assert {p.relative_to(run): p.stat().st_mtime_ns for p in run.rglob("*")} == before


def test_a_failed_overwrite_keeps_the_previous_run_as_prev(tiny_config, monkeypatch):
    import tuneforge.train.trainer as trainer_module

    tiny_config["train"].update(max_steps=4, save_steps=2)
    run = train(tiny_config).run_dir
    original = trainer_module.TuneForgeTrainer.compute_loss

    def crash_at_step_3(self, *args, **kwargs):
        if self.state.global_step == 2:
            raise RuntimeError("the machine ran out of something")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(trainer_module.TuneForgeTrainer, "compute_loss", crash_at_step_3)
    with pytest.raises(RuntimeError):
        train(tiny_config, ["output.overwrite=true"])
    previous = Path(str(run) + ".prev")
    assert (previous / "adapter" / "adapter_model.safetensors").is_file()  # the finished run is still there
    assert json.loads((run / "run.json").read_text())["status"] == "failed"
    with pytest.raises(ConfigError, match=r"\.prev holds the run an earlier overwrite replaced"):
        train(tiny_config, ["output.overwrite=true"])
    monkeypatch.setattr(trainer_module.TuneForgeTrainer, "compute_loss", original)
    assert train(tiny_config, ["train.resume_from_checkpoint=auto"]).status == "completed"
    assert not previous.exists()  # the replacing run completed: the old one goes


def test_a_dead_run_shows_as_crashed_and_the_message_offers_the_real_choices(tiny_config):
    from tuneforge.rundir import open_run

    tiny_config["train"].update(max_steps=4, save_steps=2)
    run = train(tiny_config).run_dir
    open_run(run).update_meta(status="running", pid=2 ** 22 + 12345)  # a process that does not exist
    assert open_run(run).status() == "crashed"
    with pytest.raises(ConfigError, match=r"status: crashed at step 4\). hint: continue it from checkpoint-4 with "
                                          r"train.resume_from_checkpoint=auto, start again with output.overwrite=true"):
        train(tiny_config)
    import os

    open_run(run).update_meta(status="running", pid=os.getpid())  # alive: someone is training here
    with pytest.raises(ConfigError, match="in use by a training process that is still running"):
        train(tiny_config, ["output.overwrite=true"])


def test_resume_skips_incomplete_checkpoints_and_refuses_a_missing_optimizer(tiny_config, capsys):
    import shutil

    tiny_config["train"].update(max_steps=4, save_steps=2, save_total_limit=5)
    run = train(tiny_config).run_dir
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert all((p / "tuneforge_checkpoint.json").is_file() for p in checkpoints.iterdir())
    # a save killed half-way (no completion marker) and one missing its weights
    cut = shutil.copytree(checkpoints / "checkpoint-4", checkpoints / "checkpoint-6")
    (cut / "tuneforge_checkpoint.json").unlink()
    empty = shutil.copytree(checkpoints / "checkpoint-4", checkpoints / "checkpoint-8")
    (empty / "adapter_model.safetensors").unlink()
    from tuneforge.rundir import newest_complete_checkpoint, open_run

    chosen, skipped = newest_complete_checkpoint(open_run(run))
    assert chosen.name == "checkpoint-4"
    assert skipped == ["checkpoint-8 (no the weights (adapter_model.safetensors or model.safetensors))",
                       "checkpoint-6 (no completion marker (its save was cut short))"]
    result = train(tiny_config, ["train.resume_from_checkpoint=auto"])
    assert result.status == "completed" and "skipped incomplete checkpoints: checkpoint-8" in capsys.readouterr().out
    (checkpoints / "checkpoint-4" / "optimizer.pt").unlink()
    with pytest.raises(ConfigError, match=r"checkpoint-4 cannot be resumed from exactly \(no optimizer.pt\). "
                                          r"hint: set train.resume_without_optimizer_state=true"):
        train(tiny_config, [f"train.resume_from_checkpoint={checkpoints / 'checkpoint-4'}"])
    assert json.loads((run / "run.json").read_text())["status"] == "completed"  # the refusal changed nothing
    allowed = train(tiny_config, [f"train.resume_from_checkpoint={checkpoints / 'checkpoint-4'}",
                                  "train.resume_without_optimizer_state=true"])
    assert allowed.status == "completed"


def test_resume_auto_without_any_checkpoint_says_so_instead_of_looping(tiny_config):
    import shutil

    run = train(tiny_config).run_dir
    shutil.rmtree(run / "checkpoints")  # killed before its first save
    with pytest.raises(ConfigError, match=r"has no complete checkpoint. hint: start again with output.overwrite=true"):
        train(tiny_config, ["train.resume_from_checkpoint=auto"])


def test_a_run_whose_loss_becomes_nan_stops_as_failed_and_keeps_its_last_good_checkpoint(tiny_config, monkeypatch):
    from safetensors.torch import load_file

    import tuneforge.train.trainer as trainer_module

    tiny_config["train"].update(max_steps=8, save_steps=2, save_total_limit=10, logging_steps=1)
    original = trainer_module.TuneForgeTrainer.compute_loss

    def poisoned(self, model, inputs, *args, **kwargs):  # from step 4 on, the loss is NaN
        loss = original(self, model, inputs, *args, **kwargs)
        return loss * float("nan") if self.state.global_step >= 3 else loss

    monkeypatch.setattr(trainer_module.TuneForgeTrainer, "compute_loss", poisoned)
    with pytest.raises(TrainingError, match=r"NaN or infinite for 4 optimizer steps in a row \(up to step 7; "
                                            r"train.non_finite_patience=3\).* the last good checkpoint is .*checkpoint-6"
                                            r".*hint: lower train.learning_rate"):
        train(tiny_config)
    run = Path(tiny_config["output"]["run_dir"])
    meta = json.loads((run / "run.json").read_text())
    assert meta["status"] == "failed" and "NaN" in meta["error"]
    assert not (run / "adapter").exists()  # no result was saved
    for checkpoint in (run / "checkpoints").iterdir():  # every kept checkpoint holds finite weights
        assert all(t.isfinite().all() for t in load_file(str(checkpoint / "adapter_model.safetensors")).values())
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


def test_eval_split_is_evaluated(tiny_config):
    tiny_config["data"]["val_size"] = 4
    result = train(tiny_config, ["train.eval_steps=2"])
    assert "eval_loss" in result.metrics
    assert any("eval_loss" in m for m in metrics(result.run_dir))


def test_freeze_and_full_runs_save_a_loadable_model(tiny_config):
    from transformers import AutoModelForCausalLM

    tiny_config["method"]["adapter"] = {"type": "full"}
    full = train(tiny_config)
    assert not (full.run_dir / "adapter").exists()
    assert len(load_file(full.run_dir / "model" / "model.safetensors")) >= 20
    tiny_config["method"]["adapter"] = {"type": "freeze", "trainable_layers": 1}
    tiny_config["output"]["run_dir"] += "-freeze"
    frozen = train(tiny_config)
    weights = load_file(frozen.run_dir / "model" / "model.safetensors")
    assert "model.layers.1.mlp.up_proj.weight" in weights
    assert AutoModelForCausalLM.from_pretrained(frozen.run_dir / "model").config.num_hidden_layers == 2


def test_check_reports_without_training(tiny_config):
    result = check(tiny_config)
    assert "identity: 16 rows read, 16 used" in result.report
    assert "method: stage sft, adapter lora; trainable params" in result.report
    assert not Path(tiny_config["output"]["run_dir"]).exists()


def test_a_tracker_that_is_not_installed_is_reported_before_loading(tiny_config, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="train.report_to: wandb is not installed. hint: pip install wandb"):
        check(tiny_config, ["train.report_to=[wandb]"])


def test_resuming_from_the_last_checkpoint_trains_no_extra_step(tiny_config):
    """A run killed after its final checkpoint resumes to its saved weights, not to one step more."""
    import shutil

    from safetensors.torch import load_file

    tiny_config["train"].update(max_steps=6, save_steps=2)  # 4 steps an epoch: the last checkpoint is mid-epoch
    run = train(tiny_config).run_dir
    final = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    shutil.rmtree(run / "adapter")  # as if killed between the last checkpoint and the final save
    resumed = train(tiny_config, ["train.resume_from_checkpoint=auto"])
    assert resumed.status == "completed"
    assert json.loads((run / "run.json").read_text())["global_step"] == 6
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    again = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(again[k], final[k]) for k in final)


def test_a_system_prompt_shared_by_every_row_runs_once_and_trains_the_same(tiny_config, tmp_path, monkeypatch):
    """Every row starts with the same system prompt: each batch runs it once (run.json counts the token positions
    saved), and the trained adapter equals a run that computes it in every row."""
    import tuneforge.train.trainer as trainer_module

    tiny_config["data"]["default_system"] = "You are a careful assistant. Answer in one short sentence, politely."
    shared = train(tiny_config)
    saved = json.loads((shared.run_dir / "run.json").read_text())["metrics"]["shared_prompt_tokens"]
    assert saved >= 3 * 3 * 10  # 3 steps, 3 of 4 rows, the prompt's tokens
    monkeypatch.setattr(trainer_module, "shared_prefix_length", lambda *args: 0)
    tiny_config["output"]["run_dir"] = str(tmp_path / "every-row")
    every_row = train(tiny_config)
    assert "shared_prompt_tokens" not in json.loads((every_row.run_dir / "run.json").read_text())["metrics"]
    a = load_file(shared.run_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(every_row.run_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)
    assert all(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)  # trained away from its zero start
