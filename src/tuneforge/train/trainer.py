"""transformers.Trainer with TuneForge's loss (logits only where labels are supervised) and throughput logs."""

from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import Trainer

try:  # a function since transformers 5.2x, a Trainer method before
    from transformers.trainer_utils import rotate_checkpoints
except ImportError:  # pragma: no cover - older transformers
    rotate_checkpoints = None

from tuneforge.data.sampler import LengthBuckets
from tuneforge.data.tokenized import TokenizedData
from tuneforge.model.scoring import causal_lm_loss_sum, shared_prefix_length, supervised_logits, supervised_loss_sum
from tuneforge.rundir import mark_checkpoint_complete


class DiskFull(Exception):
    """The disk filled up while saving `what`."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


class TuneForgeTrainer(Trainer):
    # compute_loss divides by the token count of the whole accumulated batch (num_items_in_batch).
    loss_is_scaled_for_ga = True
    loraplus_lr_ratio: float | None = None  # LoRA+: B matrices at this multiple of the learning rate
    block_optimizer = None  # BAdam settings: the AdamW is wrapped so that one decoder block trains at a time

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = True  # makes the Trainer count supervised tokens per optimizer step
        self._tokens = 0
        self._supervised = 0
        self.shared_prompt_tokens = 0  # token positions not computed because a batch's rows shared them
        self._clock = time.perf_counter()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        if return_outputs:
            logits, targets = supervised_logits(model, labels, **inputs)  # (N, V), (N,)
            loss_sum, count = causal_lm_loss_sum(logits, targets), targets.numel()
        else:  # no logits kept where the output layer does not train; a prompt all rows share runs once
            shared = shared_prefix_length(model, labels, inputs)
            loss_sum, count = supervised_loss_sum(model, labels, shared=shared, **inputs)
            self.shared_prompt_tokens += shared * (labels.shape[0] - 1)
        n = num_items_in_batch if num_items_in_batch is not None else count
        loss = loss_sum / (n.to(loss_sum.device).clamp(min=1) if torch.is_tensor(n) else max(n, 1))
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1 and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; the count is global
        self._count_tokens(model, inputs, count)
        return (loss, {"logits": logits}) if return_outputs else loss

    def _get_train_sampler(self, train_dataset=None):
        """Length-grouped batches from TuneForge's own sampler (less padding on small data sets, batches in random
        order; tuneforge.data.sampler), transformers' choice otherwise."""
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.args.train_sampling_strategy != "group_by_length" or not isinstance(dataset, TokenizedData):
            return super()._get_train_sampler(train_dataset)
        return LengthBuckets([len(x) for x in dataset.input_ids], self.args.per_device_train_batch_size)

    def _load_optimizer_and_scheduler(self, checkpoint):
        """Resumed optimizer states take their weight's memory layout: torch's fused AdamW on the CPU silently
        computes wrong updates when a state's strides differ from its weight's (a checkpoint written before LoRA B
        matrices were column-major, tuneforge.model.adapters.column_major_lora_up)."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self.optimizer is not None:
            conform_optimizer_state(self.optimizer)

    def _count_tokens(self, model, inputs: dict, supervised: int) -> None:
        """Tokens and supervised tokens of a training batch, for the throughput logs."""
        if model.training:
            mask = inputs.get("attention_mask")  # packed batches have none: every token is real
            self._tokens += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
            self._supervised += int(supervised)

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.block_optimizer is not None:
            from tuneforge.train.optimizers import build_block_optimizer

            base = super().create_optimizer(model)
            self.optimizer = build_block_optimizer(self.model if model is None else model, base, self.block_optimizer)
            return self.optimizer
        if self.optimizer is not None or not self.loraplus_lr_ratio:
            return super().create_optimizer(model)
        from tuneforge.model.adapters import loraplus_param_groups

        model = self.model if model is None else model
        optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        groups = loraplus_param_groups(model, self.args.learning_rate, self.loraplus_lr_ratio, self.args.weight_decay)
        self.optimizer = optimizer_cls(groups, **kwargs)
        return self.optimizer

    def _save_checkpoint(self, model, trial) -> None:
        """Write checkpoint-<step> under a temporary name, mark it complete, then rename it into place: a kill in
        the middle of a save leaves the previous checkpoints as they were and no half-written newest one."""
        final = Path(self.args.output_dir)
        staging = final / ".partial"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.args.output_dir = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)  # a cut save frees its space; older checkpoints stay intact
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(f"checkpoint-{self.state.global_step} in {final}") from exc
            raise
        finally:
            self.args.output_dir = str(final)
        self.accelerator.wait_for_everyone()  # every process has written its part (e.g. its random state)
        if not self.args.should_save:
            return
        written = staging / f"checkpoint-{self.state.global_step}"
        mark_checkpoint_complete(written, self.state.global_step)
        target = final / written.name
        if target.exists():
            shutil.rmtree(target)
        os.replace(written, target)
        shutil.rmtree(staging, ignore_errors=True)
        if rotate_checkpoints is None:
            self._rotate_checkpoints(use_mtime=False, output_dir=str(final))
        else:
            rotate_checkpoints(output_dir=str(final), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add throughput since the previous one
            now = time.perf_counter()
            elapsed = max(now - self._clock, 1e-9)
            logs["tokens_per_second"] = round(self._tokens / elapsed, 1)
            logs["supervised_tokens_per_second"] = round(self._supervised / elapsed, 1)
            self._tokens = self._supervised = 0
            self._clock = now
        super().log(logs, start_time)


def conform_optimizer_state(optimizer) -> int:
    """Give every per-weight optimizer state tensor its weight's strides (the same values). Returns how many moved."""
    moved = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)
                    moved += 1
    return moved

