"""Length-grouped batches with little padding, also on the small data sets beginners start with.

transformers' LengthGroupedSampler sorts random groups of 50 batches by length, but on data sets under 200
batches it shrinks each group to a quarter of the data (about 7 batches for 240 rows of batch 8), and within a group
it hands the batches out longest first. On 240 Chinese product reviews (Gemma 3's tokenizer, batch 8) that left
18% of every batch's tokens as padding against 4% for batches cut from the sorted rows.

`LengthBuckets` keeps groups of `group` batches whatever the data set's size (the whole data set when it is
smaller), cuts each sorted group into batches, then shuffles the batches of the epoch. A short batch, if any, goes
last (the data loader cuts the index stream into consecutive batches, so a short one in the middle would shift all
the others); otherwise the batch holding the longest row goes first, so that a run that runs out of memory does so
at its first step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class LengthBuckets(Sampler[int]):
    def __init__(self, lengths: Sequence[int], batch_size: int, group: int = 50,
                 generator: torch.Generator | None = None):
        if batch_size < 1 or group < 1:
            raise ValueError(f"batch_size and group must be at least 1, not {batch_size} and {group}")
        self.lengths = [int(n) for n in lengths]
        self.batch_size = batch_size
        self.group = group
        self.generator = generator  # None: torch's global generator, which the Trainer seeds and checkpoints

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[list[int]]:
        """One epoch's batches, in the order they are handed out."""
        n, size = len(self.lengths), self.batch_size
        if n == 0:
            return []
        order = torch.randperm(n, generator=self.generator).tolist()
        span = self.group * size
        batches = []
        for start in range(0, n, span):
            rows = sorted(order[start:start + span], key=self.lengths.__getitem__, reverse=True)
            batches += [rows[i:i + size] for i in range(0, len(rows), size)]
        short = [b for b in batches if len(b) < size]  # at most one: only the last group can be cut short
        full = [b for b in batches if len(b) == size]
        full = [full[i] for i in torch.randperm(len(full), generator=self.generator).tolist()]
        batches = full + short
        first = max(range(len(batches)), key=lambda k: self.lengths[batches[k][0]])
        if len(batches[first]) == size or len(batches) == 1:
            batches.insert(0, batches.pop(first))
        return batches

    def __iter__(self) -> Iterator[int]:
        return iter([i for batch in self.batches() for i in batch])
