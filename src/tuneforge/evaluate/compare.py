"""`tuneforge eval CONFIG`: the fine-tuned run next to its base model on the same data, plus the two checks
beginners need: forgetting (answer perplexity on general data) and repetition (looping, runaway answers)."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Iterator

from tuneforge.config import TuneForgeConfig, load_config
from tuneforge.data.pipeline import load_examples
from tuneforge.evaluate.metrics import repetition_metrics
from tuneforge.evaluate.predict import predict, save_prediction, split_answers, summary
from tuneforge.infer.engine import Engine, GenerationSettings
from tuneforge.model.runs import run_base_model
from tuneforge.model.loader import load_model, resolve_dtype
from tuneforge.rundir import open_run


def run_eval(config, overrides: list[str] = ()) -> dict:
    cfg = load_config(config, overrides)
    run = open_run(cfg.output.run_dir)
    tuned = Engine.from_run(run.path)
    variants = {"tuned": tuned}
    report: dict = {"run_dir": str(run.path), "datasets": {}, "general": {}}
    with (_base_engine(tuned, run.path, cfg) if cfg.eval.compare_to == "base" else contextlib.nullcontext()) as base:
        if base is not None:
            variants = {"base": base, "tuned": tuned}
        for name, engine in variants.items():  # base first: with LoRA it is the same model, adapter switched off
            with engine.active():
                for dataset in cfg.eval.dataset:
                    result = _evaluate_dataset(engine, cfg, dataset)
                    save_prediction(result, run.path / "eval" / name / Path(dataset).stem)
                    report["datasets"].setdefault(dataset, {})[name] = result.metrics
                    print(f"tuneforge: {name} on {dataset}: {summary(result.metrics)}", flush=True)
                if cfg.eval.general_dataset:
                    report["general"][name] = _general_checks(engine, cfg)
    (run.path / "eval.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    print(format_table(report))
    return report


def _evaluate_dataset(engine: Engine, cfg: TuneForgeConfig, dataset: str):
    spec, conversion = load_examples(dataset, cfg.data, cfg.eval.max_samples)
    prompts, references = split_answers(conversion.examples, spec.name)
    return predict(engine, prompts, references, mode=cfg.eval.mode, labels=cfg.eval.labels,
                   batch_size=cfg.eval.batch_size, settings=GenerationSettings(max_new_tokens=cfg.eval.max_new_tokens))


def _general_checks(engine: Engine, cfg: TuneForgeConfig) -> dict:
    """Perplexity of reference answers (forgetting) and greedy generations (repetition) on general data, under the
    general rows' own system prompt (none where they have none): the task's system prompt would ask the model
    to do the task, and its perplexity would then measure obedience to that prompt, not forgetting. Where the
    run has a task system prompt, the perplexity under it is reported as a second, labelled figure."""
    spec, conversion = load_examples(cfg.eval.general_dataset, cfg.data, cfg.eval.general_samples)
    conversations = [e.messages for e in conversion.examples if e.messages[-1]["role"] == "assistant"]
    plain = engine.with_default_system(None)
    batch_size = min(cfg.eval.batch_size, 8)
    nll, count = plain.answer_nll(conversations, batch_size=batch_size)
    outputs = plain.generate_batch([c[:-1] for c in conversations],
                                   GenerationSettings(max_new_tokens=cfg.eval.max_new_tokens),
                                   batch_size=batch_size, progress=True)
    result = {"dataset": spec.name, "answer_perplexity": math.exp(nll / max(count, 1)), "answer_tokens": count,
              **repetition_metrics([o.text for o in outputs], [o.hit_limit for o in outputs])}
    if engine.default_system:
        task_nll, task_count = engine.answer_nll(conversations, batch_size=batch_size)
        result["answer_perplexity_task_system_prompt"] = math.exp(task_nll / max(task_count, 1))
    return result


@contextlib.contextmanager
def _base_engine(tuned: Engine, run_dir: Path, cfg: TuneForgeConfig) -> Iterator[Engine]:
    """The base model with the run's tokenizer, template and system prompt. For LoRA runs it is the same
    model object with the adapter switched off (no second copy in memory)."""
    if hasattr(tuned.model, "disable_adapter"):
        yield tuned.without_adapter()
        return
    model = load_model(run_base_model(open_run(run_dir)), resolve_dtype(cfg.model.dtype), cfg.model.trust_remote_code)
    yield Engine(model.to(tuned.model.device), tuned.tokenizer, tuned.stop, "base model", tuned.default_system)


def format_table(report: dict) -> str:
    names = ["base", "tuned"] if any("base" in v for v in report["datasets"].values()) or "base" in report["general"] \
        else ["tuned"]
    rows = []
    for dataset, by_model in report["datasets"].items():
        for key in ("accuracy", "macro_f1", "bleu-4", "rouge-l", "repetitive_share"):
            if key in by_model[names[-1]]:
                rows.append((f"{dataset} {key}", [by_model[n].get(key) for n in names]))
        if "labels" in by_model[names[-1]]:
            rows.append((f"{dataset} accuracy (generated)", [by_model[n]["labels"]["accuracy"] for n in names]))
    for key in ("answer_perplexity", "answer_perplexity_task_system_prompt", "repetitive_share",
                "hit_max_new_tokens_share"):
        if report["general"] and key in report["general"][names[-1]]:
            label = report["general"][names[-1]]["dataset"]
            rows.append((f"{label} {key}", [report["general"][n][key] for n in names]))
    width = max([len(r[0]) for r in rows] + [10])
    head = f"{'':{width}}  " + "  ".join(f"{n:>10}" for n in names) + ("      change" if len(names) == 2 else "")
    lines = [head]
    for label, values in rows:
        cells = "  ".join(f"{v:>10.4f}" for v in values)
        change = f"  {values[1] - values[0]:>+10.4f}" if len(values) == 2 else ""
        lines.append(f"{label:{width}}  {cells}{change}")
    return "\n".join(lines)
