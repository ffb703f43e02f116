"""Tokenized data: named columns of per-row integer arrays (a map-style dataset), saved as one .npz file.

Columns by stage: sft/pt `input_ids`, `labels`; rm/dpo `chosen_ids`, `chosen_labels`, `rejected_ids`,
`rejected_labels`; kto `ids`, `labels`, `kl_ids`, `kl_labels`, `desirable`; ppo `prompt_ids`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class TokenizedData:
    columns: dict[str, list[np.ndarray]]

    @classmethod
    def of(cls, **columns: list) -> "TokenizedData":
        return cls({k: [np.asarray(x, dtype=np.int32) for x in v] for k, v in columns.items()})

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.columns.items()}

    @property
    def input_ids(self) -> list[np.ndarray]:
        return self.columns[self._main()[0]]

    @property
    def labels(self) -> list[np.ndarray]:
        return self.columns[self._main()[1]]

    def _main(self) -> tuple[str, str]:
        for ids, labels in (("input_ids", "labels"), ("chosen_ids", "chosen_labels"), ("ids", "labels"),
                            ("prompt_ids", "prompt_ids")):
            if ids in self.columns:
                return ids, labels
        raise KeyError("no token column")

    def subset(self, indices) -> "TokenizedData":
        return TokenizedData({k: [v[i] for i in indices] for k, v in self.columns.items()})

    def __add__(self, other: "TokenizedData") -> "TokenizedData":
        if not self.columns:
            return other
        return TokenizedData({k: v + other.columns[k] for k, v in self.columns.items()})

    def stats(self) -> dict:
        """Length statistics of the main token column (for pairs: the chosen side)."""
        if len(self) == 0:
            return {"sequences": 0}
        lengths = np.array([len(x) for x in self.input_ids])
        supervised = int(sum(int((y != -100).sum()) for y in self.labels)) if self._main()[1] != "prompt_ids" else 0
        return {"sequences": len(lengths), "tokens": int(lengths.sum()), "supervised_tokens": supervised,
                "min": int(lengths.min()), "median": int(np.median(lengths)),
                "p90": int(np.percentile(lengths, 90)), "max": int(lengths.max())}


def save_npz(path: Path, data: TokenizedData, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"__meta__": np.array(json.dumps(meta))}
    for name, rows in data.columns.items():
        arrays[name] = np.concatenate(rows) if rows else np.zeros(0, np.int32)
        arrays[f"{name}__lengths"] = np.array([len(r) for r in rows], dtype=np.int64)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)  # atomic: an interrupted run never leaves a half-written cache entry


def load_npz(path: Path) -> tuple[TokenizedData, dict]:
    with np.load(path) as z:
        columns = {}
        for name in (k for k in z.files if k != "__meta__" and not k.endswith("__lengths")):
            bounds = np.cumsum(np.concatenate([[0], z[f"{name}__lengths"]]))
            flat = z[name]
            columns[name] = [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        return TokenizedData(columns), json.loads(str(z["__meta__"]))
