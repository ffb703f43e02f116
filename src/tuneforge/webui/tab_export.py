"""Export tab: a merged Hugging Face folder, or a GGUF file with an Ollama Modelfile; lists the files written with
their sizes and the `ollama create` command."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from tuneforge.export.gguf_writer import TYPES
from tuneforge.webui.context import Context, message
from tuneforge.webui.texts import text


class ExportTab:
    def __init__(self, ctx: Context):
        self.ctx = ctx

    def build(self) -> None:
        ctx, T = self.ctx, self.ctx.texts
        with gr.Row():
            self.run = ctx.run_picker()
            self.format = T.add(gr.Radio(["gguf", "hf"], value="gguf", label=T.initial("export_format"),
                                         info=T.initial("export_format_info")), label="export_format",
                                info="export_format_info")
            self.gguf_type = T.add(gr.Dropdown(list(TYPES), value="q8_0", label=T.initial("gguf_type"),
                                               info=T.initial("gguf_type_info")), label="gguf_type",
                                   info="gguf_type_info")
            self.out = T.add(gr.Textbox("", label=T.initial("export_out"), info=T.initial("export_out_info")),
                             label="export_out", info="export_out_info")
        export = T.add(gr.Button(T.initial("export"), variant="primary"), value="export")
        self.status = gr.Markdown()
        self.files = T.add(gr.Dataframe(label=T.initial("files_written"), headers=["file", "size"]),
                           label="files_written")
        self.command = T.add(gr.Code(label=T.initial("ollama_command"), language="shell"), label="ollama_command")
        export.click(self.on_export, [ctx.lang, self.run, self.format, self.gguf_type, self.out],
                     [self.status, self.files, self.command])
        self.format.change(lambda fmt: gr.update(visible=fmt == "gguf"), self.format, self.gguf_type)

    def on_export(self, lang, run, fmt, gguf_type, out, progress=gr.Progress(track_tqdm=True)):
        import pandas as pd

        from tuneforge.export.export import export_run

        try:
            folder = self.ctx.workspace.path(run, "run")
            name = f"{folder.name}-{gguf_type if fmt == 'gguf' else 'hf'}"
            target = self.ctx.workspace.path(out.strip() or f"exports/{name}", "export folder")
            written = export_run(folder, target, fmt, gguf_type)
            files = sorted(p for p in target.rglob("*") if p.is_file())
            table = pd.DataFrame({"file": [self.ctx.workspace.relative(p) for p in files],
                                  "size": [_size(p.stat().st_size) for p in files]})
            command = (f"cd {target}\nollama create {folder.name} -f Modelfile\nollama run {folder.name}"
                       if fmt == "gguf" else f"# transformers: AutoModelForCausalLM.from_pretrained('{target}')")
            return text("exported", lang, path=self.ctx.workspace.relative(Path(written))), table, command
        except Exception as error:
            return message(error, lang), None, ""


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"
