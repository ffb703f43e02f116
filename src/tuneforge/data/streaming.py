"""data.streaming: data sets read while training, for data larger than memory (LLaMA-Factory's `streaming`).

Rows are read as they are needed (`readers.iter_rows`: line by line for JSON lines, CSV and text; hub data sets
through datasets' streaming mode), shuffled through a buffer of `data.buffer_size` rows (seeded, a new order each
epoch), converted and tokenized in small chunks exactly as the in-memory pipeline does (the same converter, the
same stage tokenizers, so a row becomes the same tokens either way), and handed to the Trainer as an iterable
data set, which needs `train.max_steps`. Nothing is cached; a resumed run reads the stream again to its position.
The report shows the lengths of the first rows read, which `tuneforge check` also uses for its estimate.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch

from tuneforge.config.schema import DataConfig
from tuneforge.data.convert import convert_rows
from tuneforge.data.readers import iter_rows
from tuneforge.data.registry import DatasetSpec
from tuneforge.data.stages import STAGE_TOKENIZERS
from tuneforge.data.template import ChatTemplate
from tuneforge.data.tokenized import TokenizedData
from tuneforge.errors import DataError

CHUNK = 64  # rows converted and tokenized together
SAMPLE = 256  # rows whose lengths the report and the memory estimate use


class StreamedData(torch.utils.data.IterableDataset):
    def __init__(self, specs: list[DatasetSpec], cfg: DataConfig, stage: str, tokenizer, template: ChatTemplate,
                 seed: int, hub: str = "huggingface"):
        self.specs, self.cfg, self.stage = specs, cfg, stage
        self.tokenizer, self.template, self.seed, self.hub = tokenizer, template, seed, hub
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer at each epoch: the shuffle buffer takes another order."""
        self.epoch = int(epoch)

    def _raw(self) -> Iterator[tuple[DatasetSpec, object]]:
        """The data sets one after the other (data.mix_strategy concat), each cut at data.max_samples."""
        for spec in self.specs:
            for n, row in enumerate(iter_rows(spec, self.hub)):
                if self.cfg.max_samples and n >= self.cfg.max_samples:
                    break
                yield spec, row

    def _shuffled(self) -> Iterator[tuple[DatasetSpec, object]]:
        rng, buffer = random.Random(self.seed * 1_000_003 + self.epoch), []
        for item in self._raw():
            buffer.append(item)
            if len(buffer) >= self.cfg.buffer_size:
                i = rng.randrange(len(buffer))
                buffer[i], buffer[-1] = buffer[-1], buffer[i]
                yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer

    def _tokenized(self, items) -> Iterator[dict]:
        chunk: list = []
        for item in items:
            chunk.append(item)
            if len(chunk) == CHUNK:
                yield from self._encode(chunk)
                chunk = []
        if chunk:
            yield from self._encode(chunk)

    def _encode(self, chunk: list) -> Iterator[dict]:
        specs = {id(s): s for s, _ in chunk}  # data sets in the order they come
        for key, spec in specs.items():
            rows = [row for s, row in chunk if id(s) == key]
            conversion = convert_rows(spec, rows, self.cfg.placeholders, self.cfg.default_system)
            if conversion.bad_rows and self.cfg.on_bad_row == "error":
                raise DataError(*conversion.bad_rows[:5], "hint: fix the rows, or set data.on_bad_row: skip to leave "
                                "them out")
            data, _, _ = STAGE_TOKENIZERS[self.stage](conversion.examples, self.tokenizer, self.template, self.cfg)
            for i in range(len(data)):
                yield data[i]

    def __iter__(self) -> Iterator[dict]:
        return self._tokenized(self._shuffled())

    def sample(self, rows: int = SAMPLE) -> TokenizedData:
        """The first rows of the stream, tokenized (unshuffled): for the report and the memory estimate."""
        columns: dict[str, list] = {}
        for n, row in enumerate(self._tokenized(self._raw())):
            if n >= rows:
                break
            for k, v in row.items():
                columns.setdefault(k, []).append(v)
        return TokenizedData(columns)

    def stats(self) -> dict:
        return self.sample().stats()
