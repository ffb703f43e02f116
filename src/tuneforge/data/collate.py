"""Batches: right-pad token ids with the pad token and labels with -100; preference rows in one batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PadCollator:
    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        batch = len(features)
        input_ids = torch.full((batch, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, longest), -100, dtype=torch.long)
        attention_mask = torch.zeros((batch, longest), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[i, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            labels[i, :n] = torch.as_tensor(f["labels"], dtype=torch.long)
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _stack(ids: list, labels: list, pad_token_id: int) -> dict[str, torch.Tensor]:
    return PadCollator(pad_token_id)([{"input_ids": i, "labels": y} for i, y in zip(ids, labels)])


@dataclass
class PairCollator:
    """Rows 0..B-1 are the chosen answers, rows B..2B-1 the rejected ones, padded to one width."""

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        ids = [f["chosen_ids"] for f in features] + [f["rejected_ids"] for f in features]
        labels = [f["chosen_labels"] for f in features] + [f["rejected_labels"] for f in features]
        return _stack(ids, labels, self.pad_token_id)


@dataclass
class KTOCollator:
    """Rows 0..B-1 are the answers, rows B..2B-1 the mismatched ones for the KL estimate."""

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        ids = [f["ids"] for f in features] + [f["kl_ids"] for f in features]
        labels = [f["labels"] for f in features] + [f["kl_labels"] for f in features]
        batch = _stack(ids, labels, self.pad_token_id)
        batch["desirable"] = torch.tensor([bool(f["desirable"][0]) for f in features])
        return batch
