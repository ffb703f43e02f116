"""`train(cfg)`: config -> run directory -> data -> model -> loop -> save."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerState, TrainingArguments
from transformers.trainer_utils import TrainOutput

from tuneforge.config import TuneForgeConfig, dump_config, load_config
from tuneforge.config.schema import BadamOptimizer
from tuneforge.data.collate import KTOCollator, PackedCollator, PadCollator, PairCollator
from tuneforge.data.template import stop_token_ids
from tuneforge.errors import TrainingError
from tuneforge.model.adapters import ADAPTED_BASE, count_params, moves_base_weights, quantizes_base, save_adapted_base
from tuneforge.ranks import world_size
from tuneforge.rundir import RunDir, finish_run, newest_complete_checkpoint, plan_run, start_run
from tuneforge.train.distributed import barrier, init_processes, is_main, main_first
from tuneforge.train.callbacks import GracefulStop, MetricsCallback, NonFiniteGuard, stop_if_diverged
from tuneforge.train.optimizers import low_rank_training_args
from tuneforge.train.preference_trainer import DPOTrainer, KTOTrainer, RewardTrainer
from tuneforge.train.prepare import Prepared, build_model, build_reference, prepare
from tuneforge.train.report import format_data_report
from tuneforge.train.trainer import DiskFull, TuneForgeTrainer


@dataclass
class RunResult:
    run_dir: Path
    status: str  # completed | interrupted
    metrics: dict


INIT_ADAPTER = "adapter_init"  # PiSSA / OLoRA: the adapter as initialised, kept for the final conversion


def train(config, overrides: list[str] = ()) -> RunResult:
    """Fine-tune as configured (a YAML path, dict or TuneForgeConfig) and save everything to the run directory.
    Config, data, model and trainer are all validated before the run directory is touched."""
    cfg = load_config(config, overrides)
    init_processes()  # several processes (torchrun): join the group; rank 0 writes, every rank trains its shard
    main = is_main()
    plan = plan_run(cfg)
    with main_first():  # rank 0 tokenizes into the cache, the others read it
        prepared = prepare(cfg)
    if main:
        print(format_data_report(prepared), flush=True)
        for note in plan.notes:
            print(f"tuneforge: {note}", flush=True)
    model = build_model(cfg, prepared.source, prepared.tokenizer)
    params = count_params(model)
    if main:
        print(f"tuneforge: {params}", flush=True)
    if world_size() == 1 and cfg.method.stage != "ppo" and cfg.model.quantization_bit is None:
        fit_memory(cfg, prepared, params)
    reference = build_reference(cfg, prepared.source)
    trainer = stop = None
    if cfg.method.stage != "ppo":
        with _new_folder_removed_on_error(plan.run.path):
            trainer, stop = build_trainer(cfg, model, prepared, plan.run, reference)
    with main_first():  # the others start once rank 0 has made the folder the new run's
        run = start_run(plan, cfg)
    try:
        if main:
            _save_start(cfg, model, prepared, run)
        barrier()
        if trainer is None:
            from tuneforge.train.ppo import run_ppo

            result = run_ppo(cfg, model, prepared, run, reference, checkpoint=plan.checkpoint)
        else:
            result = _train(cfg, trainer, stop, prepared, run, plan.checkpoint)
    except BaseException:  # whatever stopped it, the run is not left looking as if it were still running
        if run.meta().get("status") == "running":
            run.update_meta(status="failed", finished=time.strftime("%Y-%m-%d %H:%M:%S"))
        raise
    if result.status == "completed":
        finish_run(plan)
    barrier()  # every process leaves once rank 0 has written everything
    return result


@contextlib.contextmanager
def _new_folder_removed_on_error(path: Path):
    """Building the trainer creates the run's folders; if it fails, a folder that did not exist before goes again."""
    existed = path.exists()
    try:
        yield
    except BaseException:
        if not existed and path.is_dir():
            shutil.rmtree(path)
        raise


def _save_start(cfg: TuneForgeConfig, model, prepared: Prepared, run: RunDir) -> None:
    if moves_base_weights(cfg.method.adapter) and not (run.path / INIT_ADAPTER).exists():
        with warnings.catch_warnings():  # PEFT warns that the base moved: the final save converts for it
            warnings.simplefilter("ignore", UserWarning)
            model.save_pretrained(str(run.path / INIT_ADAPTER))  # the start, to convert the final adapter against
    if quantizes_base(cfg.method.adapter) and not (run.path / ADAPTED_BASE).exists():
        save_adapted_base(model, run.path / ADAPTED_BASE)  # LoftQ: the adapter applies to these weights
    _keep_stacked_adapters(cfg, run)
    run.update_meta(base_model=prepared.source.path, base_model_name=cfg.model.name_or_path,
                    template=prepared.template.name, stop=list(prepared.template.stop), stage=cfg.method.stage,
                    default_system=cfg.data.default_system, adapter=cfg.method.adapter.type)


STACKED = "stacked_adapters"


def _keep_stacked_adapters(cfg: TuneForgeConfig, run: RunDir) -> None:
    """model.adapters are copied into the run directory and its config.yaml points at the copies, so the run keeps
    working (chat, export, resume) when the adapter folders it was trained on change or go away."""
    from tuneforge.model.stacking import adapter_folders

    if not cfg.model.adapters:
        return
    folder = run.path / STACKED
    copies = []
    for i, source in enumerate(adapter_folders(cfg.model.adapters)):
        target = folder / str(i)
        if source.resolve() != target.resolve():
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(source, target)
        copies.append(str(target.resolve()))
    kept = cfg.model_copy(deep=True)
    kept.model.adapters = copies
    (run.path / "config.yaml").write_text(dump_config(kept), encoding="utf-8")


def fit_memory(cfg: TuneForgeConfig, prepared: Prepared, params=None) -> None:
    """Before training: when `tuneforge check`'s estimate is above the memory available and the config leaves
    train.gradient_checkpointing unset, turn it on when that makes the run fit (the same results for about a third
    more compute); otherwise say what would fit. Single-process runs of unquantized models only (each process would
    have to decide the same; QLoRA prepares checkpointing while loading)."""
    from tuneforge.train.check import estimate_for, fitting_switch
    from tuneforge.train.estimate import GIB, available_memory

    try:
        estimate = estimate_for(cfg, prepared, params)
    except Exception as exc:  # an estimate that cannot be made must not stop a run that may fit
        print(f"tuneforge: no memory estimate ({type(exc).__name__}: {exc})", flush=True)
        return
    free, where = available_memory()
    if estimate.total <= free:
        return
    fit = fitting_switch(cfg, prepared, free)
    message = f"the estimated peak (~{estimate.total / GIB:.1f} GiB) is above the {free / GIB:.1f} GiB {where}"
    if fit and fit[0] == "train.gradient_checkpointing=true" and "gradient_checkpointing" not in \
            cfg.train.model_fields_set:
        cfg.train.gradient_checkpointing = True
        print(f"tuneforge: {message}: gradient checkpointing turned on (~{fit[1].total / GIB:.1f} GiB; the same "
              "results, about a third slower; train.gradient_checkpointing=false keeps it off)", flush=True)
        return
    hint = f"it fits with {fit[0]} (~{fit[1].total / GIB:.1f} GiB)" if fit else "see `tuneforge check CONFIG`"
    print(f"tuneforge: warning: {message}; the run may run out of memory. hint: {hint}", flush=True)


def _train(cfg: TuneForgeConfig, trainer, stop: GracefulStop, prepared: Prepared, run: RunDir,
           checkpoint: str | None) -> RunResult:
    try:
        if checkpoint and _training_was_done(trainer, checkpoint):
            # transformers would run one more optimizer step: after a resume it checks for the end of training
            # only after a step. A checkpoint taken at the last step holds the trained weights already.
            trainer._load_from_checkpoint(checkpoint)
            trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
            output = TrainOutput(trainer.state.global_step, 0.0, {})
        else:
            output = trainer.train(resume_from_checkpoint=checkpoint)
    except DiskFull as full:
        _fail(run, f"the disk filled up while saving {full.what}; that partial save was removed and the "
                   f"earlier checkpoints are intact{_newest(run)}. hint: free some space (or set "
                   "train.save_total_limit lower), then continue with train.resume_from_checkpoint=auto")
    except (torch.OutOfMemoryError, MemoryError) as exc:
        _fail(run, f"ran out of memory at step {trainer.state.global_step + 1} ({type(exc).__name__}). hint: lower "
                   f"train.batch_size (now {cfg.train.batch_size}; raise train.gradient_accumulation_steps to keep the "
                   f"effective batch), lower data.cutoff_len (now {cfg.data.cutoff_len}), set "
                   "train.gradient_checkpointing=true, or use LoRA (QLoRA on a GPU); `tuneforge check CONFIG` "
                   "estimates the peak before training")
    stop_if_diverged(trainer_guard(trainer), run, cfg)
    status = "interrupted" if stop.requested else "completed"
    metrics = dict(output.metrics)
    if getattr(trainer, "shared_prompt_tokens", 0):
        metrics["shared_prompt_tokens"] = trainer.shared_prompt_tokens
    if prepared.data.eval is not None and status == "completed":
        metrics.update(trainer.evaluate())
    try:
        save_weights(trainer, prepared, run, cfg)
        barrier()
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        _fail(run, f"the disk filled up while saving the trained weights to {run.weights}; the checkpoints are "
                   f"intact{_newest(run)}. hint: free some space, then run the same command with "
                   "train.resume_from_checkpoint=auto (it saves the weights without training again)")
    run.update_meta(status=status, finished=time.strftime("%Y-%m-%d %H:%M:%S"), metrics=metrics,
                    global_step=trainer.state.global_step)
    if status == "interrupted" and is_main():
        print(f"tuneforge: interrupted at step {trainer.state.global_step}; continue with "
              f"`tuneforge train {run.path / 'config.yaml'} train.resume_from_checkpoint=auto`", flush=True)
    return RunResult(run.path, status, metrics)


def _training_was_done(trainer, checkpoint: str) -> bool:
    """Whether the checkpoint was taken at the last optimizer step this run is configured for."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    if trainer.args.max_steps > 0:
        total = trainer.args.max_steps
    else:  # as the Trainer counts: optimizer steps per epoch, times the epochs, rounded up
        batches = len(trainer.get_train_dataloader())
        per_epoch = math.ceil(batches / trainer.args.gradient_accumulation_steps)
        total = math.ceil(trainer.args.num_train_epochs * per_epoch)
    return state.get("global_step", 0) >= total


def _newest(run: RunDir) -> str:
    checkpoint, _ = newest_complete_checkpoint(run)
    return f" (newest: {checkpoint})" if checkpoint else ""


def _fail(run: RunDir, reason: str):
    run.update_meta(status="failed", finished=time.strftime("%Y-%m-%d %H:%M:%S"), error=reason)
    raise TrainingError(f"{run.path}: {reason}") from None


def trainer_guard(trainer) -> NonFiniteGuard:
    return next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, NonFiniteGuard))


TRAINERS = {"sft": TuneForgeTrainer, "pt": TuneForgeTrainer, "rm": RewardTrainer, "dpo": DPOTrainer,
            "kto": KTOTrainer}
COLLATORS = {"sft": PadCollator, "pt": PadCollator, "rm": PairCollator, "dpo": PairCollator, "kto": KTOCollator}


def build_trainer(cfg: TuneForgeConfig, model, prepared: Prepared, run: RunDir, ref_model=None):
    t, has_eval, stage = cfg.train, prepared.data.eval is not None, cfg.method.stage
    on_gpu = torch.cuda.is_available()
    optimizer = getattr(cfg.method.adapter, "optimizer", None)  # GaLore / APOLLO / BAdam (full training)
    optim = {"optim": t.optim, **low_rank_training_args(optimizer, model)}
    args = TrainingArguments(
        output_dir=str(run.checkpoints),
        num_train_epochs=t.num_epochs,
        max_steps=t.max_steps or -1,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        **optim,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=(t.eval_steps or t.save_steps) if has_eval else None,
        report_to=[r for r in t.report_to if r != "none"] or "none",
        dataloader_num_workers=t.dataloader_num_workers,
        train_sampling_strategy="group_by_length" if t.group_by_length and stage in ("sft", "pt") else "random",
        activation_checkpointing=t.gradient_checkpointing,
        neftune_noise_alpha=t.neftune_alpha,
        torch_compile=t.torch_compile,
        use_liger_kernel=t.liger_kernel,
        bf16=on_gpu and cfg.model.dtype in ("auto", "bfloat16") and torch.cuda.is_bf16_supported(),
        fp16=on_gpu and (cfg.model.dtype == "float16" or (cfg.model.dtype == "auto" and not torch.cuda.is_bf16_supported())),
        use_cpu=not on_gpu,
        # a stream is read by every process, each keeping its share of every batch (accelerate's
        # IterableDatasetShard); dispatching from rank 0 cannot send padded batches of different lengths
        accelerator_config={"dispatch_batches": False} if cfg.data.streaming else None,
        deepspeed=t.deepspeed,
        fsdp=t.fsdp or None,
        fsdp_config=t.fsdp_config,
        remove_unused_columns=False,
        prediction_loss_only=True,
        run_name=run.path.name,
    )
    stop = GracefulStop()
    pad_id = prepared.tokenizer.pad_token_id if prepared.tokenizer.pad_token_id is not None else 0
    if stage == "sft" and cfg.data.packing:
        collator = PackedCollator()
    elif stage in ("sft", "pt"):
        collator = PadCollator(pad_id, pad_to_multiple_of=8 if on_gpu else None)
    else:
        collator = COLLATORS[stage](pad_id)
    extra = {} if stage in ("sft", "pt") else {"method": cfg.method, "ref_model": ref_model}
    trainer = TRAINERS[stage](
        model=model,
        args=args,
        train_dataset=prepared.data.train,
        eval_dataset=prepared.data.eval,
        data_collator=collator,
        processing_class=prepared.tokenizer,
        callbacks=[MetricsCallback(run.path, plot=cfg.output.plot_loss), stop, NonFiniteGuard(t.non_finite_patience)],
        **extra,
    )
    trainer.loraplus_lr_ratio = getattr(cfg.method.adapter, "loraplus_lr_ratio", None)
    trainer.block_optimizer = optimizer if isinstance(optimizer, BadamOptimizer) else None
    if ref_model is not None:
        ref_model.to(trainer.args.device)
    return trainer, stop


def save_weights(trainer: TuneForgeTrainer, prepared: Prepared, run: RunDir, cfg: TuneForgeConfig) -> Path:
    """adapter/ (LoRA) or model/ (freeze, full), in safetensors, with the tokenizer and its chat template."""
    target = run.path / ("adapter" if cfg.method.adapter.type == "lora" else "model")
    if not is_main():  # trainer.save_model gathers the weights with every process; rank 0 writes them
        trainer.save_model(str(target)) if not moves_base_weights(cfg.method.adapter) else None
        return target
    if moves_base_weights(cfg.method.adapter):  # convert to an adapter on the original base weights
        model = trainer.accelerator.unwrap_model(trainer.model)
        model.save_pretrained(str(target), path_initial_model_for_weight_conversion=str(run.path / INIT_ADAPTER))
        prepared.tokenizer.save_pretrained(str(target))
    else:
        trainer.save_model(str(target))  # safetensors; saves the tokenizer (processing_class) too
    if quantizes_base(cfg.method.adapter):  # loading must not quantize again: the run keeps the weights it used
        settings = json.loads((target / "adapter_config.json").read_text())
        settings.update(init_lora_weights=True, loftq_config={})
        (target / "adapter_config.json").write_text(json.dumps(settings, indent=2))
    stop_ids = stop_token_ids(prepared.tokenizer, prepared.template.stop)
    gen = trainer.model.generation_config if hasattr(trainer.model, "generation_config") else None
    if gen is not None and stop_ids and cfg.method.adapter.type != "lora" and cfg.method.stage != "rm":
        gen.eos_token_id = stop_ids
        gen.save_pretrained(target)
    return target
