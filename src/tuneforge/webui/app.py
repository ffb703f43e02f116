"""`tuneforge webui`: a Gradio page over the same functions and config as the CLI (train, check, predict, eval,
chat, export). The layout lives here; each tab is a module of its own."""

from __future__ import annotations

import os
from pathlib import Path

import gradio as gr

from tuneforge.data.template import builtin_templates
from tuneforge.errors import ConfigError
from tuneforge.ports import port_is_free
from tuneforge.model.embedded import embedded_models
from tuneforge.webui.context import Context
from tuneforge.webui.jobs import Jobs
from tuneforge.webui.tab_chat import ChatTab
from tuneforge.webui.tab_evaluate import EvaluateTab
from tuneforge.webui.tab_export import ExportTab
from tuneforge.webui.tab_runs import RunsTab
from tuneforge.webui.tab_train import TrainTab, defaults
from tuneforge.webui.texts import LANGUAGES, Texts
from tuneforge.webui.workspace import Workspace

CSS = """
#train-progress progress { height: 14px; }
.tf-header h1 { margin: 0; }
"""
# The page's first language: the browser's (Chinese for zh-*, else English).
BROWSER_LANGUAGE = "() => (navigator.language || 'en').toLowerCase().startsWith('zh') ? '中文' : 'English'"


def build_app(root: str | Path) -> gr.Blocks:
    workspace = Workspace(root)
    ctx = Context(workspace, Jobs(workspace.root), Texts())
    T = ctx.texts
    with gr.Blocks(title="TuneForge") as app:
        ctx.lang = gr.State("en")
        with gr.Row(elem_classes="tf-header"):
            T.add(gr.Markdown(T.initial("title")), value="title")
            language = gr.Radio(list(LANGUAGES), value="English", show_label=False, container=False, scale=0,
                                min_width=200, elem_id="language")
        _model_bar(ctx, defaults())
        train, evaluate, chat, export, runs = (TrainTab(ctx), EvaluateTab(ctx), ChatTab(ctx), ExportTab(ctx),
                                               RunsTab(ctx))
        with gr.Tabs():
            with T.add(gr.Tab(T.initial("tab_train"), id="train"), label="tab_train"):
                train.build()
            with T.add(gr.Tab(T.initial("tab_evaluate"), id="evaluate"), label="tab_evaluate"):
                evaluate.build()
            with T.add(gr.Tab(T.initial("tab_chat"), id="chat"), label="tab_chat"):
                chat.build()
            with T.add(gr.Tab(T.initial("tab_export"), id="export"), label="tab_export"):
                export.build()
            with T.add(gr.Tab(T.initial("tab_runs"), id="runs"), label="tab_runs"):
                runs.build([chat.target, evaluate.run, export.run])

        def relabel(choice):
            lang = LANGUAGES.get(choice, "en")
            return [lang, *T.updates(lang)]

        language.change(relabel, language, [ctx.lang, *T.components])
        app.load(relabel, language, [ctx.lang, *T.components], js=BROWSER_LANGUAGE).then(
            lambda lang: train.on_tick(lang), ctx.lang, train.refresh_outputs)
        app.load(lambda: _pickers(ctx), None, [chat.target, evaluate.run, export.run])
        ctx.model_bar["model.name_or_path"].input(_follow_model_bar, ctx.model_bar["model.name_or_path"],
                                                  [chat.target, evaluate.run, export.run])
    return app


def _model_bar(ctx: Context, start) -> None:
    """Model, hub, adapter type and template: shared by the training form (and filled from the defaults)."""
    T = ctx.texts
    choices = list(embedded_models()) + ctx.workspace.finished_runs()
    with gr.Row(variant="panel"):
        ctx.model_bar["model.name_or_path"] = T.add(
            gr.Dropdown(choices, value=start.model.name_or_path, allow_custom_value=True, scale=3,
                        label=T.initial("model"), info=T.initial("model_info")), label="model", info="model_info")
        ctx.model_bar["model.hub"] = T.add(gr.Radio(["huggingface", "modelscope"], value=start.model.hub,
                                                    label=T.initial("hub")), label="hub")
        ctx.model_bar["method.adapter.type"] = T.add(
            gr.Dropdown(["lora", "freeze", "full", "llama_pro"], value=start.method.adapter.type,
                        label=T.initial("adapter"), info=T.initial("adapter_info")), label="adapter", info="adapter_info")
        ctx.model_bar["model.template"] = T.add(
            gr.Dropdown(["auto", *sorted(builtin_templates())], value=start.model.template, allow_custom_value=True,
                        label=T.initial("template"), info=T.initial("template_info")), label="template",
            info="template_info")


def _pickers(ctx: Context):
    """Run pickers refreshed when a page opens (runs finished since the UI started appear)."""
    runs = ctx.workspace.finished_runs()
    chat = runs + list(embedded_models())
    return (gr.update(choices=chat, value=chat[0] if chat else None), gr.update(choices=runs, value=runs[0] if runs
                                                                                 else None),
            gr.update(choices=runs, value=runs[0] if runs else None))


def _follow_model_bar(value: str):
    """The model bar picks what the other tabs work on: Chat talks to any model or run; Evaluate and Export take
    runs."""
    run = gr.update(value=value) if (value or "").startswith("runs/") else gr.update()
    return gr.update(value=value), run, run



def launch(root: str | Path = ".", host: str = "127.0.0.1", port: int = 7860, auth: str | None = None,
           block: bool = True):
    """Serve the page on host:port (loopback by default, never a share link); `auth` is USER:PASS."""
    if not port_is_free(host, port):
        raise ConfigError(f"--port {port}: something is already listening on {host}:{port}. hint: give another "
                          "--port, or stop what runs there")
    credentials = None
    if auth:
        user, sep, password = auth.partition(":")
        if not sep or not user or not password:
            raise ConfigError("--auth / TUNEFORGE_WEBUI_AUTH: expected USER:PASS")
        credentials = (user, password)
    # relative paths in the page and in the saved configs (data, runs/...) mean the same to the page and to the
    # training processes it starts: both work from the root
    os.chdir(root)
    app = build_app(root)
    app.queue(default_concurrency_limit=4)
    root = Path(root).resolve()
    return app.launch(server_name=host, server_port=port, auth=credentials, share=False, show_error=False,
                      prevent_thread_lock=not block, inbrowser=False, css=CSS, footer_links=["gradio"],
                      allowed_paths=[str(root)], blocked_paths=[str(root / ".tuneforge")])
