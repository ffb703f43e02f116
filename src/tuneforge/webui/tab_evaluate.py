"""Evaluate tab: predict on a data set of the registry (metrics, a confusion matrix picture for label tasks, sample
predictions), and the before/after table of `tuneforge eval` (base vs fine-tuned, forgetting, repetition)."""

from __future__ import annotations

import gradio as gr

from tuneforge.webui.context import Context, message
from tuneforge.webui.texts import text


class EvaluateTab:
    def __init__(self, ctx: Context):
        self.ctx = ctx

    def build(self) -> None:
        ctx, T = self.ctx, self.ctx.texts
        with gr.Row():
            self.run = ctx.run_picker()
            self.data_dir = T.add(gr.Textbox("data", label=T.initial("data_dir")), label="data_dir")
            self.dataset = T.add(gr.Textbox("identity", label=T.initial("eval_dataset"),
                                            info=T.initial("eval_dataset_info")), label="eval_dataset",
                                 info="eval_dataset_info")
        with gr.Row():
            self.mode = T.add(gr.Radio(["auto", "score", "generate"], value="auto", label=T.initial("eval_mode")),
                              label="eval_mode")
            self.labels = T.add(gr.Textbox("", label=T.initial("eval_labels"), info=T.initial("eval_labels_info")),
                                label="eval_labels", info="eval_labels_info")
            self.max_samples = T.add(gr.Number(50, precision=0, minimum=1, label=T.initial("eval_max_samples")),
                                     label="eval_max_samples")
        with gr.Row():
            predict = T.add(gr.Button(T.initial("predict"), variant="primary"), value="predict")
            compare = T.add(gr.Button(T.initial("before_after")), value="before_after")
        self.status = gr.Markdown()
        with gr.Row():
            self.metrics = T.add(gr.Dataframe(label=T.initial("metrics"), wrap=True), label="metrics")
            self.confusion = T.add(gr.Plot(label=T.initial("confusion")), label="confusion")
        self.rows = T.add(gr.Dataframe(label=T.initial("sample_predictions"), wrap=True,
                                       column_widths=["35%", "28%", "28%", "9%"]), label="sample_predictions")
        self.table = T.add(gr.Code(label=T.initial("before_after_table"), language=None), label="before_after_table")
        inputs = [ctx.lang, self.run, self.data_dir, self.dataset, self.mode, self.labels, self.max_samples]
        predict.click(self.on_predict, inputs, [self.status, self.metrics, self.confusion, self.rows])
        compare.click(self.on_compare, inputs, [self.status, self.table])

    def on_predict(self, lang, run, data_dir, dataset, mode, labels, max_samples, progress=gr.Progress(track_tqdm=True)):
        from tuneforge.config import DataConfig
        from tuneforge.data.pipeline import load_examples
        from tuneforge.evaluate.predict import predict, save_prediction, split_answers, summary

        try:
            target = self.ctx.target(run)
            folder = self.ctx.workspace.path(data_dir, "data folder")
            cfg = DataConfig(dataset=[dataset], dataset_dir=str(folder), strict_paths=True,
                             placeholders=run_placeholders(target))
            spec, conversion = load_examples(dataset, cfg, int(max_samples) if max_samples else None)
            prompts, references = split_answers(conversion.examples, spec.name)
            engine = self.ctx.engine(target)
            chosen = [x.strip() for x in labels.split(",") if x.strip()] or None
            result = predict(engine, prompts, references, mode=mode, labels=chosen, progress=True)
            save_prediction(result, self.ctx.workspace.path(run, "run") / "predict" / spec.name
                            if run.startswith("runs/") else self.ctx.workspace.root / "predict" / spec.name)
            return (f"✅ {summary(result.metrics)}", _metrics_table(result.metrics), _confusion(result.metrics),
                    _sample_rows(result.rows))
        except Exception as error:
            return message(error, lang), None, None, None

    def on_compare(self, lang, run, data_dir, dataset, mode, labels, max_samples, progress=gr.Progress(track_tqdm=True)):
        from tuneforge.evaluate.compare import format_table, run_eval

        try:
            folder = self.ctx.workspace.path(run, "run")
            overrides = [f"eval.dataset={dataset}", f"data.dataset_dir={self.ctx.workspace.path(data_dir, 'data')}",
                         f"eval.mode={mode}", "eval.general_samples=8", "data.strict_paths=true"]
            if max_samples:
                overrides.append(f"eval.max_samples={int(max_samples)}")
            if labels.strip():
                overrides.append(f"eval.labels=[{labels}]")
            report = run_eval(folder / "config.yaml", overrides + [f"output.run_dir={folder}"])
            return text("compare_done", lang), format_table(report)
        except Exception as error:
            return message(error, lang), ""


def run_placeholders(target: str) -> dict:
    """A run's data.placeholders, so that its evaluation data read as its training data did."""
    from pathlib import Path

    from tuneforge.rundir import META, open_run

    return open_run(target).config().data.placeholders if (Path(target) / META).is_file() else {}


def _metrics_table(metrics: dict):
    import pandas as pd

    keys = [k for k, v in metrics.items() if isinstance(v, (int, float, str)) and k not in ("mode",)]
    return pd.DataFrame({"metric": keys, "value": [metrics[k] for k in keys]})


def _confusion(metrics: dict):
    matrix = metrics.get("confusion_matrix")
    if not matrix:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values = matrix["labels"], matrix["matrix"]
    fig, ax = plt.subplots(figsize=(3.6, 3.2), dpi=100)
    ax.imshow(values, cmap="Greens")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("prediction")
    ax.set_ylabel("reference")
    for i, row in enumerate(values):
        for j, n in enumerate(row):
            ax.text(j, i, str(n), ha="center", va="center")
    fig.tight_layout()
    return fig


def _sample_rows(rows: list[dict]):
    import pandas as pd

    shown = rows[:50]
    return pd.DataFrame({"input": [r["prompt"][:300] for r in shown], "reference": [r["label"] for r in shown],
                         "prediction": [r["prediction"] for r in shown],
                         "correct": ["✓" if r["prediction"] == r["label"] else "✗" for r in shown]})
