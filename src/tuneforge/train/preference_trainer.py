"""Trainers for the preference stages: reward modelling (rm), DPO and its variants (dpo), KTO (kto).

Each computes its loss with the pure functions in `preference.py`. With LoRA the reference model is the
policy with its adapter switched off (no second copy in memory); otherwise a frozen copy is passed in.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from tuneforge.model.scoring import last_token_rewards, sequence_logprobs
from tuneforge.train.preference import kto_loss, pair_losses, pairwise_reward_loss
from tuneforge.train.trainer import TuneForgeTrainer


def sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of each row's supervised tokens, (N,), and their counts, (N,)."""
    return sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])


class _StatsTrainer(TuneForgeTrainer):
    """Keeps running means of stage statistics (rewards, margins) and adds them to each train/eval log."""

    loss_is_scaled_for_ga = False  # losses are per-batch means; the Trainer divides by accumulation steps

    def __init__(self, *args, method=None, ref_model=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False
        self.method, self.ref_model = method, ref_model
        self._stats = {True: defaultdict(list), False: defaultdict(list)}  # by model.training

    def _record(self, training: bool, **values: torch.Tensor) -> None:
        for key, value in values.items():
            self._stats[training][key].append(float(value.detach().float().mean()))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        training = "loss" in logs
        if training or "eval_loss" in logs:
            prefix = "" if training else "eval_"
            for key, values in self._stats[training].items():
                if values:
                    logs[prefix + key] = round(sum(values) / len(values), 4)
            self._stats[training].clear()
        super().log(logs, start_time)

    @torch.no_grad()
    def reference_logps(self, model, batch: dict) -> torch.Tensor:
        if self.ref_model is not None:
            return sequence_logps(self.ref_model, batch)[0]
        with self.accelerator.unwrap_model(model).disable_adapter():
            return sequence_logps(model, batch)[0]


class DPOTrainer(_StatsTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        m = self.method
        self._count_tokens(model, inputs, (inputs["labels"] != -100).sum())
        logps, counts = sequence_logps(model, inputs)  # rows 0..B-1 chosen, B..2B-1 rejected
        half = logps.shape[0] // 2
        ref = self.reference_logps(model, inputs) if m.pref_loss in ("sigmoid", "hinge", "ipo") else None
        losses, chosen_reward, rejected_reward = pair_losses(
            m, logps[:half], logps[half:], counts[:half], counts[half:],
            *((ref[:half], ref[half:]) if ref is not None else ()))
        self._record(model.training, **{"rewards/chosen": chosen_reward, "rewards/rejected": rejected_reward,
                                        "rewards/margin": chosen_reward - rejected_reward,
                                        "rewards/accuracy": (chosen_reward > rejected_reward).float()})
        loss = losses.mean()
        return (loss, {}) if return_outputs else loss


class KTOTrainer(_StatsTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        m = self.method
        desirable = inputs.pop("desirable")
        self._count_tokens(model, inputs, (inputs["labels"] != -100).sum())
        logps, counts = sequence_logps(model, inputs)
        ref = self.reference_logps(model, inputs)
        half = logps.shape[0] // 2
        # mismatched answers: the KL reference point, averaged over every process's batch (as TRL does)
        kl = self.accelerator.reduce((logps[half:] - ref[half:]).mean().detach(), reduction="mean")
        losses = kto_loss(logps[:half], ref[:half], desirable, kl, m.beta, m.desirable_weight, m.undesirable_weight)
        if m.pref_ftx > 0:
            nll = -(logps[:half] / counts[:half].clamp(min=1))
            losses = losses + m.pref_ftx * nll * desirable.float()
        rewards = m.beta * (logps[:half] - ref[:half])
        stats = {"kl": kl}
        if desirable.any():
            stats["rewards/desirable"] = rewards[desirable]
        if (~desirable).any():
            stats["rewards/undesirable"] = rewards[~desirable]
        self._record(model.training, **stats)
        loss = losses.mean()
        return (loss, {}) if return_outputs else loss


class RewardTrainer(_StatsTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._count_tokens(model, inputs, (inputs["labels"] != -100).sum())
        rewards = last_token_rewards(model, inputs["input_ids"], inputs["attention_mask"])
        half = rewards.shape[0] // 2
        chosen, rejected = rewards[:half], rewards[half:]
        self._record(model.training, **{"rewards/chosen": chosen, "rewards/rejected": rejected,
                                        "rewards/accuracy": (chosen > rejected).float()})
        loss = pairwise_reward_loss(chosen, rejected).mean()
        return (loss, {}) if return_outputs else loss
