"""Runs tab: every run under runs/ with stage, base model, data, status, final loss; select one to see its loss
picture and metrics, open it in the other tabs, resume it, or delete it (after a confirmation)."""

from __future__ import annotations

import json

import gradio as gr

from tuneforge.webui.context import Context, message
from tuneforge.webui.texts import text

HEADERS = ["run", "status", "stage", "base model", "data", "final loss", "started"]


class RunsTab:
    def __init__(self, ctx: Context):
        self.ctx = ctx

    def build(self, open_targets: list) -> None:
        """`open_targets`: the run pickers of the other tabs (Chat, Evaluate, Export) that Open fills in."""
        ctx, T = self.ctx, self.ctx.texts
        refresh = T.add(gr.Button(T.initial("refresh"), size="sm"), value="refresh")
        self.table = T.add(gr.Dataframe(self.rows(), headers=HEADERS, label=T.initial("runs"), interactive=False,
                                        wrap=True, elem_id="runs-table"), label="runs")
        with gr.Row():
            self.selected = T.add(gr.Textbox("", label=T.initial("selected_run"), info=T.initial("selected_run_info")),
                                  label="selected_run", info="selected_run_info")
            open_it = T.add(gr.Button(T.initial("open_run")), value="open_run")
            resume = T.add(gr.Button(T.initial("resume")), value="resume")
        with gr.Row():
            self.picture = T.add(gr.Image(label=T.initial("loss_picture"), height=300), label="loss_picture")
            self.details = T.add(gr.Code(label=T.initial("details"), language="json"), label="details")
        with gr.Row():
            self.confirm = T.add(gr.Checkbox(False, label=T.initial("confirm_delete")), label="confirm_delete")
            delete = T.add(gr.Button(T.initial("delete_run"), variant="stop"), value="delete_run")
        self.status = gr.Markdown()
        refresh.click(lambda: self.rows(), None, self.table)
        self.table.select(self.on_select, None, [self.selected, self.picture, self.details])
        self.selected.submit(self.on_show, self.selected, [self.picture, self.details])
        open_it.click(lambda name: [gr.update(value=f"runs/{name}") for _ in open_targets], self.selected, open_targets)
        resume.click(self.on_resume, [ctx.lang, self.selected], self.status)
        delete.click(self.on_delete, [ctx.lang, self.selected, self.confirm], [self.status, self.table, self.confirm])

    def rows(self):
        import pandas as pd

        return pd.DataFrame([r.row for r in self.ctx.workspace.runs()], columns=HEADERS)

    def on_select(self, event: gr.SelectData):
        name = event.row_value[0] if getattr(event, "row_value", None) else ""
        return (name, *self.on_show(name))

    def on_show(self, name):
        run = self.ctx.workspace.runs_dir / (name or "")
        picture = str(run / "loss.png") if (run / "loss.png").is_file() else None
        meta = json.loads((run / "run.json").read_text(encoding="utf-8")) if (run / "run.json").is_file() else {}
        return picture, json.dumps(meta, indent=2, ensure_ascii=False)

    def on_resume(self, lang, name):
        try:
            run = self.ctx.workspace.path(f"runs/{name}", "run")
            self.ctx.jobs.start(run / "config.yaml", run, ["train.resume_from_checkpoint=auto"])
            return text("resumed", lang, run=f"runs/{run.name}")
        except Exception as error:
            return message(error, lang)

    def on_delete(self, lang, name, confirmed):
        if not confirmed:
            return text("confirm_first", lang), self.rows(), False
        try:
            self.ctx.forget(self.ctx.target(f"runs/{name}"))  # a loaded engine of it goes too
            self.ctx.workspace.delete_run(name)
            return text("deleted", lang, run=name), self.rows(), False
        except Exception as error:
            return message(error, lang), self.rows(), False
