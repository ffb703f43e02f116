"""A trained reward model (a run of stage rm): scores conversations, for PPO and for `tuneforge predict`."""

from __future__ import annotations

from pathlib import Path

import torch

from tuneforge.data.collate import pad_right
from tuneforge.data.convert import with_system
from tuneforge.errors import ConfigError
from tuneforge.model.runs import load_run_weights
from tuneforge.model.scoring import last_token_rewards
from tuneforge.rundir import open_run


class RewardModel:
    def __init__(self, model, tokenizer, default_system: str | None = None, description: str = ""):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.default_system = default_system
        self.description = description

    @classmethod
    def from_run(cls, run_dir: str | Path) -> "RewardModel":
        run = open_run(run_dir)
        meta = run.meta()
        if meta.get("stage") != "rm":
            raise ConfigError(f"{run.path} is a run of stage {meta.get('stage')!r}, not a reward model (stage rm)")
        model, tokenizer = load_run_weights(run, reward=True)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return cls(model.to(device), tokenizer, meta.get("default_system"), f"reward model {run.path}")

    @torch.inference_mode()
    def score_ids(self, sequences: list[list[int]], batch_size: int = 8) -> list[float]:
        scores: list[float] = []
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        device = next(self.model.parameters()).device
        for start in range(0, len(sequences), batch_size):
            ids, mask = pad_right(sequences[start: start + batch_size], pad)
            scores += last_token_rewards(self.model, ids.to(device), mask.to(device)).tolist()
        return scores

    def score(self, conversations: list[list[dict]], batch_size: int = 8) -> list[float]:
        """Reward of each full conversation (the last message being the answer to judge)."""
        sequences = [self.tokenizer.apply_chat_template(with_system(messages, self.default_system), return_dict=False)
                     for messages in conversations]
        return self.score_ids(sequences, batch_size)
