"""A trained reward model (a run of stage rm): scores conversations, for PPO and for `tuneforge predict`."""

from __future__ import annotations

from pathlib import Path

import torch

from tuneforge.errors import ConfigError
from tuneforge.infer.engine import load_run_weights
from tuneforge.model.heads import last_token_rewards
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
            chunk = sequences[start: start + batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.tensor([list(s) + [pad] * (width - len(s)) for s in chunk], device=device)
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk], device=device)
            scores += last_token_rewards(self.model, ids, mask).tolist()
        return scores

    def score(self, conversations: list[list[dict]], batch_size: int = 8) -> list[float]:
        """Reward of each full conversation (the last message being the answer to judge)."""
        sequences = []
        for messages in conversations:
            if self.default_system and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": self.default_system}] + messages
            sequences.append(self.tokenizer.apply_chat_template(messages, return_dict=False))
        return self.score_ids(sequences, batch_size)
