"""Train tab: stage, data (with a token-level preview), the common hyper-parameters, every other setting generated
from the config schema, and Check / Preview / Save / Start / Stop / Resume with live progress, log and loss curve."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import gradio as gr
import yaml

from tuneforge.config import TuneForgeConfig, dump_config, load_config
from tuneforge.webui.context import Context, message
from tuneforge.webui.forms import FormField, active, config_from_form, form_from_config, schema_fields
from tuneforge.webui.texts import text

# Keys with a control of their own (model bar, this tab's top rows); every other key is in the Advanced area.
COMMON = ["method.stage", "data.dataset_dir", "data.dataset", "train.learning_rate", "train.num_epochs",
          "train.batch_size", "data.cutoff_len", "train.max_steps", "method.adapter.rank", "method.adapter.alpha",
          "method.adapter.dropout", "method.adapter.target_modules"]
MODEL_BAR = ["model.name_or_path", "model.hub", "method.adapter.type", "model.template"]
FIXED = {"data.strict_paths": True, "output.run_dir": None}  # set by the page: containment on, run_dir from the name
SECTIONS = ["model", "data", "method", "train", "output", "eval"]


def defaults() -> TuneForgeConfig:
    """What the page starts with: the quickstart (SmolLM2, identity, LoRA), ready to Start."""
    raw = yaml.safe_load(resources.files("tuneforge.webui").joinpath("defaults.yaml").read_text(encoding="utf-8"))
    return load_config(raw)


class TrainTab:
    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.fields = [f for f in schema_fields() if f.key not in FIXED]
        self.controls: dict[str, gr.components.Component] = dict(ctx.model_bar)
        self.initial = form_from_config(defaults())

    def build(self) -> None:
        ctx, T, v = self.ctx, self.ctx.texts, self.initial
        by_key = {f.key: f for f in self.fields}
        with gr.Row():
            self.controls["method.stage"] = T.add(gr.Dropdown(by_key["method.stage"].choices, value=v["method.stage"],
                                                              label=T.initial("stage"), info=T.initial("stage_info")),
                                                  label="stage", info="stage_info")
            self.controls["data.dataset_dir"] = T.add(gr.Textbox(v["data.dataset_dir"], label=T.initial("data_dir")),
                                                      label="data_dir")
            self.controls["data.dataset"] = T.add(gr.Dropdown(self._datasets(v["data.dataset_dir"]),
                                                              value=v["data.dataset"].split(","), multiselect=True,
                                                              allow_custom_value=True, label=T.initial("datasets"),
                                                              info=T.initial("datasets_info"), scale=2),
                                                  label="datasets", info="datasets_info")
        with T.add(gr.Accordion(T.initial("preview_title"), open=False), label="preview_title"):
            preview_button = T.add(gr.Button(T.initial("preview_button"), size="sm"), value="preview_button")
            preview = T.add(gr.HighlightedText(label=T.initial("preview_label"), combine_adjacent=True,
                                               show_legend=True, color_map={"trained": "#16a34a"}),
                            label="preview_label")
        with gr.Row():
            for key, label in (("train.learning_rate", "learning_rate"), ("train.num_epochs", "epochs"),
                               ("train.batch_size", "batch_size"), ("data.cutoff_len", "cutoff_len"),
                               ("train.max_steps", "max_steps")):
                self.controls[key] = T.add(gr.Textbox(v[key], label=T.initial(label),
                                                      info=T.initial(label + "_info")),
                                           label=label, info=label + "_info")
        with gr.Row() as lora_row:
            for key, label in (("method.adapter.rank", "lora_rank"), ("method.adapter.alpha", "lora_alpha"),
                               ("method.adapter.dropout", "lora_dropout"),
                               ("method.adapter.target_modules", "lora_targets")):
                self.controls[key] = T.add(gr.Textbox(v[key], label=T.initial(label)), label=label)
        self.lora_row = lora_row
        with gr.Row():
            self.run_name = T.add(gr.Textbox(self._free_name("quickstart"), label=T.initial("run_name"),
                                             info=T.initial("run_name_info")), label="run_name", info="run_name_info")
        with T.add(gr.Accordion(T.initial("advanced"), open=False), label="advanced"):
            T.add(gr.Markdown(T.initial("advanced_info")), value="advanced_info")
            self._advanced(v)
        with gr.Row():
            check = T.add(gr.Button(T.initial("check")), value="check")
            show = T.add(gr.Button(T.initial("show_yaml")), value="show_yaml")
            save = T.add(gr.Button(T.initial("save_config")), value="save_config")
            start = T.add(gr.Button(T.initial("start"), variant="primary"), value="start")
            stop = T.add(gr.Button(T.initial("stop"), variant="stop"), value="stop")
            resume = T.add(gr.Button(T.initial("resume")), value="resume")
        self.alongside = T.add(gr.Checkbox(False, label=T.initial("alongside"), info=T.initial("alongside_info")),
                               label="alongside", info="alongside_info")
        self.status = gr.Markdown(elem_id="train-status")
        self.report = T.add(gr.Code(language="yaml", label=T.initial("details"), visible=False), label="details")
        self.progress = gr.HTML(elem_id="train-progress")
        with gr.Row():
            self.plot = T.add(gr.LinePlot(x="step", y="value", color="series", label=T.initial("loss_curve"),
                                          height=280), label="loss_curve")
            self.log = T.add(gr.Textbox(label=T.initial("log"), lines=14, max_lines=14, autoscroll=True),
                             label="log")
        keys = list(self.controls)
        inputs = [ctx.lang, self.run_name] + [self.controls[k] for k in keys]
        self.keys = keys
        preview_button.click(self.on_preview, inputs, [preview, self.status])
        check.click(self.on_check, inputs, [self.status, self.report])
        show.click(self.on_show, inputs, [self.status, self.report])
        save.click(self.on_save, inputs, [self.status, self.report])
        start.click(self.on_start, [ctx.lang, self.run_name, self.alongside] + inputs[2:], [self.status, self.report])
        stop.click(self.on_stop, [ctx.lang], [self.status])
        resume.click(self.on_resume, [ctx.lang, self.run_name], [self.status, self.report])
        self.controls["data.dataset_dir"].change(self.on_data_dir, [self.controls["data.dataset_dir"]],
                                                 [self.controls["data.dataset"]])
        selectors = [k for k in keys if self._is_selector(k)]
        for key in selectors:
            self.controls[key].change(self.on_variant, [self.controls[k] for k in selectors],
                                      self._variant_outputs())
        timer = gr.Timer(2.0)
        timer.tick(self.on_tick, [ctx.lang], [self.progress, self.plot, self.log])
        self.refresh_outputs = [self.progress, self.plot, self.log]

    # --- layout helpers -------------------------------------------------------------------------------------------
    def _advanced(self, v: dict) -> None:
        T, shown = self.ctx.texts, set(COMMON) | set(MODEL_BAR)
        self.groups: list[tuple[FormField, gr.components.Component]] = []
        for section in SECTIONS:
            fields = [f for f in self.fields if f.section == section and f.key not in shown]
            if not fields:
                continue
            with T.add(gr.Accordion(T.initial(f"section_{section}"), open=False), label=f"section_{section}"):
                for f in fields:
                    self.controls[f.key] = self._control(f, v)

    def _control(self, f: FormField, v: dict):
        T = self.ctx.texts
        label = f.key + (" *" if f.required else "")
        help_spec = ("config", f.key, f.description)
        visible = active(f, v)
        if f.kind == "bool":
            control = gr.Checkbox(bool(v[f.key]), label=label, info=f.description, visible=visible)
        elif f.kind == "choice":
            control = gr.Dropdown(f.choices, value=v[f.key], label=label, info=f.description, visible=visible)
        else:
            control = gr.Textbox(v[f.key], label=label, info=f.description, visible=visible)
        self.groups.append((f, control))
        return T.add(control, info=help_spec)

    def _is_selector(self, key: str) -> bool:
        return any(key == selector for f in self.fields for selector, _ in f.conditions)

    def _variant_outputs(self) -> list:
        return [c for _, c in self.groups] + [self.lora_row]

    def _datasets(self, data_dir: str) -> list:
        from tuneforge.webui.workspace import dataset_choices

        try:
            return dataset_choices(self.ctx.workspace.path(data_dir, "data folder"))
        except Exception:  # no registry there (yet): the dropdown stays free to type in
            return []

    def _free_name(self, stem: str) -> str:
        existing = {p.name for p in self.ctx.workspace.runs_dir.iterdir()}
        if stem not in existing:
            return stem
        return next(f"{stem}-{n}" for n in range(2, 10_000) if f"{stem}-{n}" not in existing)

    # --- building the config --------------------------------------------------------------------------------------
    def values(self, run_name: str, *controls) -> dict:
        values = dict(zip(self.keys, controls))
        datasets = values["data.dataset"]
        values["data.dataset"] = ",".join(datasets) if isinstance(datasets, list) else datasets
        name = (run_name or "").strip()
        if not re.fullmatch(r"[\w.-]+", name or "-") or name in (".", ".."):
            raise ValueError(f"run name {name!r}: use letters, digits, . _ and - only")
        self.ctx.workspace.path(values["data.dataset_dir"], "data.dataset_dir")  # inside the root
        model = values["model.name_or_path"]
        if (model or "").startswith("runs/"):
            raise ValueError(f"{model} is a finished run: chat with it, evaluate or export it; to train, pick a base "
                             "model (continuing a run's adapter is not offered here yet)")
        values["model.name_or_path"] = self.ctx.target(model)
        values.update({"data.strict_paths": True, "output.run_dir": f"runs/{name}"})
        return values

    def config(self, run_name: str, *controls) -> TuneForgeConfig:
        values = self.values(run_name, *controls)
        fields = self.fields + [f for f in schema_fields() if f.key in FIXED]
        return config_from_form({k: values.get(k, self.initial.get(k)) for k in {f.key for f in fields}})

    def save(self, cfg: TuneForgeConfig) -> Path:
        path = self.ctx.workspace.root / "configs" / f"{Path(cfg.output.run_dir).name}.yaml"
        path.write_text(dump_config(cfg), encoding="utf-8")
        return path

    # --- handlers ---------------------------------------------------------------------------------------------------
    def on_preview(self, lang, run_name, *controls):
        from tuneforge.webui.preview import preview_rows

        try:
            cfg = self.config(run_name, *controls)
            return preview_rows(cfg, cfg.data.dataset[0], rows=3), text("preview_done", lang)
        except Exception as error:
            return None, message(error, lang)

    def on_check(self, lang, run_name, *controls):
        from tuneforge.train.check import check

        try:
            cfg = self.config(run_name, *controls)
            report = check(cfg).report
            warn = "warning:" in report
            return text("check_ok_warn" if warn else "check_ok", lang), gr.update(value=report, visible=True)
        except Exception as error:
            return message(error, lang), gr.update(visible=False)

    def on_show(self, lang, run_name, *controls):
        try:
            cfg = self.config(run_name, *controls)
            command = f"# {text('command_line', lang)}\n# tuneforge train configs/{Path(cfg.output.run_dir).name}.yaml\n"
            return text("yaml_shown", lang), gr.update(value=command + dump_config(cfg), visible=True)
        except Exception as error:
            return message(error, lang), gr.update(visible=False)

    def on_save(self, lang, run_name, *controls):
        try:
            path = self.save(self.config(run_name, *controls))
            return text("saved", lang, path=self.ctx.workspace.relative(path)), gr.update(visible=False)
        except Exception as error:
            return message(error, lang), gr.update(visible=False)

    def on_start(self, lang, run_name, alongside, *controls):
        try:
            cfg = self.config(run_name, *controls)
            path = self.save(cfg)
            self.ctx.jobs.start(path, self.ctx.workspace.root / cfg.output.run_dir, alongside=bool(alongside))
            return text("started", lang, run=cfg.output.run_dir), gr.update(visible=False)
        except Exception as error:
            return message(error, lang), gr.update(visible=False)

    def on_stop(self, lang):
        return text("stopping" if self.ctx.jobs.stop() else "nothing_running", lang)

    def on_resume(self, lang, run_name):
        try:
            run = self.ctx.workspace.path(f"runs/{(run_name or '').strip()}", "run")
            if not (run / "config.yaml").is_file():
                raise ValueError(f"runs/{run.name} holds no run to resume")
            self.ctx.jobs.start(run / "config.yaml", run, ["train.resume_from_checkpoint=auto"])
            return text("resumed", lang, run=f"runs/{run.name}"), gr.update(visible=False)
        except Exception as error:
            return message(error, lang), gr.update(visible=False)

    def on_data_dir(self, data_dir):
        return gr.update(choices=self._datasets(data_dir))

    def on_variant(self, *selected):
        values = dict(self.initial)
        values.update({k: s for k, s in zip([k for k in self.keys if self._is_selector(k)], selected)})
        return [gr.update(visible=active(f, values)) for f, _ in self.groups] + [
            gr.update(visible=values.get("method.adapter.type") == "lora")]

    def on_tick(self, lang):
        return progress_view(self.ctx, lang)


def progress_view(ctx: Context, lang: str):
    """Progress bar and line, loss curve and log tail of the current (or last) job."""
    import pandas as pd

    status = ctx.jobs.status()
    if status.run_dir is None:
        return text("no_job", lang), None, ""
    run = Path(status.run_dir)
    records = _metrics(run / "metrics.jsonl")
    series = ("loss", "eval_loss", "rewards/margin", "eval_rewards/margin", "reward", "kl")  # sft/pt, rm/dpo, ppo
    rows = [(r["step"], r[k], k) for r in records for k in series if isinstance(r.get(k), (int, float)) and r[k] == r[k]]
    plot = pd.DataFrame(rows, columns=["step", "value", "series"]) if rows else None
    meta = json.loads((run / "run.json").read_text(encoding="utf-8")) if (run / "run.json").is_file() else {}
    state = "running" if status.running else meta.get("status", "failed" if status.returncode else "starting")
    last = next((r for r in reversed(records) if "loss" in r), {})
    parts = [text(f"state_{state}", lang) if f"state_{state}" in _known_states() else state]
    done, total = status.step, status.total
    if done is not None and total:
        parts.append(text("progress_steps", lang, step=done, total=total, percent=round(100 * done / total)))
        parts.append(text("progress_time", lang, elapsed=status.elapsed, remaining=status.remaining))
    if "epoch" in last:
        parts.append(f"epoch {last['epoch']:.2f}")
    if "tokens_per_second" in last:
        parts.append(f"{last['tokens_per_second']:.0f} tokens/s")
    if "loss" in last:
        parts.append(f"loss {last['loss']:.4f}")
    bar = f"<progress value='{done or 0}' max='{total or 1}' style='width:100%'></progress>" if total else ""
    error = f"<p>❌ {meta['error']}</p>" if meta.get("error") and not status.running else ""
    html = f"<div><b>{status.run_dir and Path(status.run_dir).name}</b>: {' · '.join(parts)}{bar}{error}</div>"
    return html, plot, ctx.jobs.log_tail()


def _known_states() -> set[str]:
    return {"state_running", "state_completed", "state_interrupted", "state_failed", "state_crashed", "state_starting"}


def _metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


