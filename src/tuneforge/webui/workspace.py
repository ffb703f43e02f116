"""The one folder the web UI works in (`--root`): its runs/, data/, configs/ and exports/. Every path typed into the
page is resolved inside it; a path that leads out (`..`, an absolute path elsewhere, a symlink) is refused."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from tuneforge.errors import ConfigError
from tuneforge.rundir import META, RunDir


@dataclass
class RunInfo:
    name: str
    path: Path
    status: str
    stage: str
    base_model: str
    data: str
    started: str
    final_loss: float | None
    metrics: dict

    @property
    def row(self) -> list:
        loss = "" if self.final_loss is None else f"{self.final_loss:.4f}"
        return [self.name, self.status, self.stage, self.base_model, self.data, loss, self.started]


class Workspace:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        for folder in ("runs", "configs", "exports"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)

    def path(self, text: str | Path, what: str = "path") -> Path:
        """A path typed in the page, made absolute inside the root; anything leading outside is an error."""
        text = str(text).strip()
        if not text:
            raise ConfigError(f"{what}: empty; give a path inside {self.root}")
        candidate = Path(text).expanduser()
        resolved = (candidate if candidate.is_absolute() else self.root / candidate).resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise ConfigError(f"{what}: {text} is outside the web UI's folder {self.root}; only paths inside it can "
                              "be used here (start `tuneforge webui --root DIR` elsewhere to work on other files)")
        return resolved

    def relative(self, path: Path) -> str:
        return str(Path(path).resolve().relative_to(self.root))

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    def runs(self) -> list[RunInfo]:
        found = []
        for folder in sorted(self.runs_dir.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True):
            if not (folder / META).is_file() or not (folder / "config.yaml").is_file():
                continue
            run = RunDir(folder)
            meta = run.meta()
            found.append(RunInfo(folder.name, folder, run.status(), meta.get("stage", "?"),
                                 meta.get("base_model_name", "?"), _data_names(folder), meta.get("started", ""),
                                 _final_loss(folder), meta.get("metrics") or {}))
        return found

    def finished_runs(self) -> list[str]:
        """Runs with saved weights, as `runs/<name>`, newest first."""
        return [f"runs/{r.name}" for r in self.runs() if (r.path / "adapter").is_dir() or (r.path / "model").is_dir()]

    def delete_run(self, name: str) -> None:
        folder = self.path(f"runs/{name}", "run")
        if folder.parent != self.runs_dir or not (folder / META).is_file():
            raise ConfigError(f"run {name!r}: not a run directory under {self.runs_dir}")
        if RunDir(folder).status() == "running":
            raise ConfigError(f"run {name!r} is still training; stop it first")
        shutil.rmtree(folder)


def _data_names(folder: Path) -> str:
    try:
        import yaml

        raw = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
        return ",".join(raw.get("data", {}).get("dataset", []))
    except Exception:  # a damaged config.yaml only costs this column
        return "?"


def _final_loss(folder: Path) -> float | None:
    metrics = folder / "metrics.jsonl"
    if not metrics.is_file():
        return None
    last = None
    for line in metrics.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "loss" in record:
            last = record["loss"]
    return last


def dataset_choices(data_dir: Path) -> list[tuple[str, str]]:
    """(label with row count, name) for every entry of a registry; rows are counted for local files only."""
    from tuneforge.data.registry import load_registry

    registry = load_registry(data_dir)
    out = []
    for name in registry:
        try:
            spec = registry[name]
        except Exception:
            out.append((f"{name} (malformed entry)", name))
            continue
        if spec.hf_hub_url or spec.ms_hub_url:
            out.append((f"{name} (hub)", name))
            continue
        try:
            out.append((f"{name} ({_row_count(str(spec.path), spec.path.stat().st_mtime_ns, name, str(data_dir)):,} "
                        "rows)", name))
        except Exception:
            out.append((f"{name} (file missing)", name))
    return out


@lru_cache(maxsize=256)
def _row_count(path: str, mtime: int, name: str, data_dir: str) -> int:
    from tuneforge.data.readers import read_rows
    from tuneforge.data.registry import load_registry

    return len(read_rows(load_registry(data_dir)[name]))
