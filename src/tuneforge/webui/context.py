"""What every tab of the web UI shares: the workspace, the job runner, the texts, loaded engines and the model bar."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from tuneforge.errors import UserError
from tuneforge.webui.jobs import Jobs
from tuneforge.webui.texts import Texts, text
from tuneforge.webui.workspace import Workspace


@dataclass
class Context:
    workspace: Workspace
    jobs: Jobs
    texts: Texts
    lang: Any = None  # gr.State holding "en" or "zh"
    model_bar: dict[str, Any] = field(default_factory=dict)  # config key -> component
    _engines: dict[str, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def run_picker(self):
        """A dropdown of the finished runs (the newest first), free to type in."""
        import gradio as gr

        runs = self.workspace.finished_runs()
        return self.texts.add(gr.Dropdown(runs, value=runs[0] if runs else None, allow_custom_value=True,
                                          label=self.texts.initial("run")), label="run")

    def engine(self, target: str):
        """A loaded Engine for a run directory or model, kept for the next request (at most two at a time)."""
        from tuneforge.infer.engine import Engine

        with self._lock:
            if target not in self._engines:
                if len(self._engines) >= 2:
                    self._engines.pop(next(iter(self._engines)))
                self._engines[target] = Engine.load(target)
            return self._engines[target]

    def forget(self, target: str) -> None:
        with self._lock:
            self._engines.pop(target, None)

    def target(self, value: str) -> str:
        """A run or model named in the page: runs and local paths must lie inside the root; embedded names and hub
        ids pass as they are."""
        from tuneforge.model.embedded import embedded_models

        value = (value or "").strip()
        if not value:
            raise UserError("choose a run or a model first")
        if value in embedded_models():
            return value
        local = self.workspace.root / value
        if value.startswith((".", "/", "~")) or local.exists() or value.split("/")[0] in ("runs", "exports", "data"):
            return str(self.workspace.path(value, "model"))
        return value  # a hub id


def message(error: Exception, lang: str) -> str:
    """A user error as shown in the page (never a traceback)."""
    if isinstance(error, UserError):
        return f"❌ {error.render()}"
    return f"❌ {text('unexpected_error', lang)} {type(error).__name__}: {error}"
