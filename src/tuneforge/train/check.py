"""`tuneforge check`: every validation step of `train` without training, a memory estimate, and on request a few
measured training steps (time per epoch, peak memory) in a throw-away run directory."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import torch

from tuneforge.config import TuneForgeConfig, load_config
from tuneforge.model.adapters import ParamCount
from tuneforge.rundir import prepare_run_dir
from tuneforge.train.distributed import processes_per_node
from tuneforge.train.engines import engine_of, per_device, suggestion
from tuneforge.train.estimate import (GIB, Measurement, MemoryEstimate, available_memory, estimate_memory,
                                      peak_memory)
from tuneforge.train.prepare import Prepared, build_model, build_reference, count_trainable, prepare
from tuneforge.train.report import format_data_report


@dataclass
class CheckResult:
    prepared: Prepared
    params: ParamCount
    memory: MemoryEstimate
    report: str
    measured: Measurement | None = None


def check(config, overrides: list[str] = (), measure_steps: int = 0) -> CheckResult:
    """Validate config, model, template, data and adapter as `train` does; estimate peak memory; with
    `measure_steps`, train that many steps (plus one warm-up) on the real data to time an epoch."""
    cfg = load_config(config, overrides)
    prepared = prepare(cfg)
    params = count_trainable(cfg, prepared.source, prepared.tokenizer)
    memory = estimate_memory(cfg, _model_config(cfg, prepared), params, *_data_shape(prepared))
    free, where = available_memory()
    lines = [format_data_report(prepared),
             f"method: stage {cfg.method.stage}, adapter {cfg.method.adapter.type}; {params}",
             f"memory estimate: {memory}; {free / GIB:.1f} GiB {where}"]
    need = memory.total
    engine, on_gpu = engine_of(cfg.train), torch.cuda.is_available()
    local = processes_per_node(cfg.distributed.nproc_per_node)
    processes = local * cfg.distributed.nnodes
    if processes > 1 or engine.name != "DDP":
        device = per_device(memory, engine, processes)
        lines.append(f"with {engine.name}: {device}")
        # GPUs: each process has its own device; CPUs: the processes of this machine share its memory
        need = device.total if on_gpu else (device.total + device.offloaded) * local
        if not on_gpu and local > 1:
            lines.append(f"  the {local} processes on this machine share its memory: "
                         f"~{need / GIB:.2f} GiB together")
    if need > free:
        switch = suggestion(memory, processes, free, shared=not on_gpu) if engine.shards < 3 else None
        fit = fitting_switch(cfg, prepared, free) if processes == 1 else None
        lines.append("warning: the run will probably not fit. hint: " + (
            f"shard it with {switch}" if switch else
            f"it fits with {fit[0]} (~{fit[1].total / GIB:.2f} GiB)" if fit else
            "lower train.batch_size (raise train.gradient_accumulation_steps to keep the effective batch), lower "
            "data.cutoff_len, turn on train.gradient_checkpointing, or use LoRA"))
    measured = None
    if measure_steps and cfg.method.stage != "ppo":
        measured = measure(cfg, prepared, measure_steps)
        error = (memory.total - measured.peak_bytes) / measured.peak_bytes
        lines.append(f"measured: {measured} (the estimate is {error:+.0%} off)")
    elif measure_steps:
        lines.append("measured: not available for stage ppo (rollouts vary in length)")
    lines.append(f"output: {cfg.output.run_dir}")
    return CheckResult(prepared, params, memory, "\n".join(lines), measured)


def estimate_for(cfg: TuneForgeConfig, prepared: Prepared, params: ParamCount | None = None) -> MemoryEstimate:
    """The peak-memory estimate of one training process (`params` counted from the model when not given)."""
    params = params or count_trainable(cfg, prepared.source, prepared.tokenizer)
    return estimate_memory(cfg, _model_config(cfg, prepared), params, *_data_shape(prepared))


FIT_SHARE = 0.95  # a switch is named when its estimate leaves 5% of the free memory (the estimate is within 10%)


def fitting_switch(cfg: TuneForgeConfig, prepared: Prepared, free: int) -> tuple[str, MemoryEstimate] | None:
    """The first change of the config, as `key=value` overrides, under which the estimate fits FIT_SHARE of `free`
    bytes, or None. Tried in the order that changes a run least: gradient checkpointing (the same results for about a third
    more compute), then also halving an even batch while doubling the accumulation (the same effective batch), then
    LoRA instead of training every weight (other results), then halving the cutoff (longer rows are cut)."""
    t, adapter = cfg.train, cfg.method.adapter
    steps: list[list[str]] = []
    base = [] if t.gradient_checkpointing else ["train.gradient_checkpointing=true"]
    adapters = [[]] if adapter.type == "lora" else [[], ["method.adapter.type=lora"]]
    for switch in adapters:
        batch, accumulation = t.batch_size, t.gradient_accumulation_steps
        steps.append(switch + base)
        while batch > 1 and batch % 2 == 0:
            batch, accumulation = batch // 2, accumulation * 2
            steps.append(switch + base + [f"train.batch_size={batch}", f"train.gradient_accumulation_steps="
                                                                      f"{accumulation}"])
    cutoff = cfg.data.cutoff_len
    while cutoff > 256:
        cutoff //= 2
        steps.append(steps[-1] + [f"data.cutoff_len={cutoff}"])
    counted: dict[str, ParamCount] = {}
    for overrides in steps:
        if not overrides:
            continue
        changed = load_config(cfg, overrides)
        key = changed.method.adapter.type
        if key not in counted:
            counted[key] = count_trainable(changed, prepared.source, prepared.tokenizer)
        estimate = estimate_for(changed, prepared, counted[key])
        if estimate.total <= free * FIT_SHARE:
            return " ".join(o for o in overrides if not o.startswith("data.")) + "".join(
                f" {o} (longer rows are cut)" for o in overrides if o.startswith("data.")), estimate
    return None


def _model_config(cfg: TuneForgeConfig, prepared: Prepared):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(prepared.source.path, trust_remote_code=cfg.model.trust_remote_code)
    return getattr(config, "text_config", None) or config


def _data_shape(prepared: Prepared) -> tuple[int, float]:
    """Longest training sequence and the share of supervised tokens."""
    stats = prepared.data.train.stats()
    return stats["max"], stats.get("supervised_tokens", 0) / max(stats["tokens"], 1)


def measure(cfg: TuneForgeConfig, prepared: Prepared, steps: int) -> Measurement:
    """Train `steps` + 1 optimizer steps on the configured data in a temporary run directory; the first step is
    warm-up. Throughput comes from the trainer's own token counts, so batches of any length average out."""
    from tuneforge.train.run import build_trainer

    with tempfile.TemporaryDirectory(prefix="tuneforge-check-") as tmp:
        trial = cfg.model_copy(deep=True)
        trial.output.run_dir, trial.output.overwrite, trial.output.plot_loss = tmp, True, False
        trial.train.max_steps, trial.train.logging_steps, trial.train.save_steps = steps + 1, 1, 10 ** 9
        trial.train.resume_from_checkpoint = None
        run, _ = prepare_run_dir(trial)
        model = build_model(trial, prepared.source, prepared.tokenizer)
        trainer, _ = build_trainer(trial, model, prepared, run, build_reference(trial, prepared.source))
        trainer.args.eval_strategy = "no"
        trainer.train()
        speeds = [log["tokens_per_second"] for log in trainer.state.log_history if "tokens_per_second" in log][1:]
    tokens_per_second = sum(speeds) / max(len(speeds), 1)
    stats = prepared.data.train.stats()
    epoch = stats["tokens"] * (2 if cfg.method.stage in ("rm", "dpo", "kto") else 1) / max(tokens_per_second, 1e-9)
    return Measurement(len(speeds), tokens_per_second, epoch, peak_memory())
