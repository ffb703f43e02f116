"""Batches: right-pad token ids with the pad token and labels with -100; preference rows in one batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def pad_right(seqs: list, pad_value: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of token ids -> (B, W) long tensor padded on the right with `pad_value`, and its (B, W) attention mask."""
    width = max([len(s) for s in seqs] + [width or 0])
    ids = torch.full((len(seqs), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def pad_left(seqs: list, pad_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of token ids -> (B, W) padded on the left (every row ends at the last column, as generation wants),
    and its attention mask."""
    width = max(len(s) for s in seqs)
    ids, mask = pad_right([list(s)[::-1] for s in seqs], pad_value, width)
    return ids.flip(1), mask.flip(1)


@dataclass
class PadCollator:
    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            width = (width + m - 1) // m * m
        input_ids, attention_mask = pad_right([f["input_ids"] for f in features], self.pad_token_id, width)
        labels, _ = pad_right([f["labels"] for f in features], -100, width)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass
class PackedCollator:
    """All rows of a batch end to end in one sequence, with no padding: position ids restart at 0 for every
    row, and with no attention mask the model's mask builder derives from them a block-diagonal causal mask,
    so rows never attend to each other. The first token of each row is never a target (it would be predicted
    from the previous row)."""

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        ids, labels, positions = [], [], []
        for f in features:
            n = len(f["input_ids"])
            ids.extend(f["input_ids"])
            row_labels = list(f["labels"])
            row_labels[0] = -100
            labels.extend(row_labels)
            positions.extend(range(n))
        as_row = lambda values: torch.tensor([values], dtype=torch.long)  # noqa: E731
        return {"input_ids": as_row(ids), "labels": as_row(labels), "position_ids": as_row(positions)}


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
