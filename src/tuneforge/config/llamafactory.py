"""LLaMA-Factory configs, unchanged: a flat LLaMA-Factory YAML (model_name_or_path, stage, finetuning_type, lora_rank,
dataset, template, cutoff_len, per_device_train_batch_size, output_dir, ...) is translated into TuneForge's sections.

The key table is data (`llamafactory.yaml`): keys with the same meaning, LLaMA-Factory defaults that differ from
TuneForge's (kept, so a config behaves as it did there), keys that change nothing TuneForge computes (one warning)
and keys TuneForge cannot honour (one error listing them all). The few keys whose translation needs a rule are
handled below. Every difference kept is said in `Translation.notes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

import yaml

from tuneforge.errors import ConfigError

# keys only LLaMA-Factory configs have at the top level (TuneForge's are the section names)
MARKERS = {"model_name_or_path", "finetuning_type", "stage", "do_train", "lora_rank", "lora_target", "dataset",
           "template", "cutoff_len", "per_device_train_batch_size", "output_dir", "num_train_epochs"}
SECTIONS = {"model", "data", "method", "train", "output", "eval"}
FLAT_ADAPTERS = {"lora", "freeze", "full"}
# generation settings of LLaMA-Factory's GeneratingArguments, which its PPO rollouts sample with
GENERATION_DEFAULTS = {"temperature": 0.95, "top_p": 0.7, "top_k": 50, "max_new_tokens": 1024, "do_sample": True,
                       "repetition_penalty": 1.0, "max_length": 1024, "length_penalty": 1.0,
                       "skip_special_tokens": True}
SCHEDULERS = {"linear", "cosine", "constant", "constant_with_warmup", "cosine_with_min_lr", "polynomial"}


@dataclass
class Translation:
    config: dict
    notes: list[str] = field(default_factory=list)  # LLaMA-Factory behaviour kept where TuneForge's default differs
    ignored: list[str] = field(default_factory=list)  # keys that change nothing TuneForge computes


@lru_cache(maxsize=1)
def key_table() -> dict:
    return yaml.safe_load(resources.files("tuneforge.config").joinpath("llamafactory.yaml").read_text(encoding="utf-8"))


def is_llamafactory(raw: dict) -> bool:
    """A flat LLaMA-Factory config: its marker keys at the top level, none of TuneForge's sections."""
    return bool(MARKERS & set(raw)) and not any(isinstance(raw.get(s), dict) for s in SECTIONS)


def apply_flat_overrides(raw: dict, overrides: list[str]) -> tuple[dict, list[str]]:
    """Overrides in LLaMA-Factory's spelling (`lora_rank=16`) change the flat config before it is translated; dotted
    TuneForge overrides (`method.adapter.rank=16`) are returned to be applied after."""
    rest = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if sep and "." not in key.strip() and key.strip():
            raw[key.strip()] = yaml.safe_load(text) if text.strip() else None
        else:
            rest.append(item)
    return raw, rest


def translate(raw: dict, where: str = "config") -> Translation:
    """The TuneForge config of a flat LLaMA-Factory config; ConfigError lists every key that cannot be honoured."""
    table = key_table()
    out: dict[str, dict] = {s: {} for s in ("model", "data", "method", "train", "output", "eval")}
    result = Translation(out)
    problems: list[str] = []
    raw = dict(raw)

    def put(path: str, value: Any) -> None:
        node = out
        *parents, last = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value

    for key, (default, note) in table["defaults"].items():
        if key not in raw:
            raw[key] = default
            result.notes.append(note)

    if not raw.get("dataset"):
        problems.append("dataset: required: the data set names from dataset_info.json, e.g. dataset: identity")
    if not raw.get("model_name_or_path"):
        problems.append("model_name_or_path: required: a model folder, hub id or .gguf file")
    stage = raw.pop("stage", "sft")
    put("method.stage", stage)
    template = raw.pop("template", None)
    if template:
        from tuneforge.data.template import LLAMAFACTORY_PREFIX, builtin_templates

        theirs = LLAMAFACTORY_PREFIX + template
        put("model.template", theirs if theirs in builtin_templates() else template)
    if stage in ("sft", "rm", "dpo", "kto"):
        put("data.overlong", "split")
        result.notes.append("data.overlong: split: an overlong conversation is cut " + ("turn by turn, " if stage ==
                            "sft" else "") + "prompt and answer sharing the budget as LLaMA-Factory's infer_seqlen "
                            "does (TuneForge's default shortens prompts first and drops rows whose answers alone do "
                            "not fit)")
    kind = raw.pop("finetuning_type", "lora")
    if kind not in FLAT_ADAPTERS:
        problems.append(f"finetuning_type: {kind!r} is not supported; use lora, freeze or full")
    put("method.adapter.type", kind)
    _adapter_rules(raw, kind, put, result, problems)
    _method_rules(raw, stage, put, result, problems)
    _train_rules(raw, put, result, problems)

    for key, value in list(raw.items()):
        if key in table["direct"]:
            target = table["direct"][key]
            if value is None and key not in ("default_system",):
                continue  # LLaMA-Factory's "not set"
            if target.startswith("method.adapter.") and not _adapter_has(kind, target):
                if value not in (None, False, 0):
                    problems.append(f"{key}: applies to finetuning_type {_adapter_of(target)}, not {kind}")
                continue
            put(target, _list_or_value(key, value))
        elif key in table["cosmetic"]:
            result.ignored.append(f"{key}: {table['cosmetic'][key]}")
        elif key in table["unsupported"]:
            default, reason = table["unsupported"][key]
            if value != default and value is not None and not (value is False and default is None):
                problems.append(f"{key}: {value!r}: {reason}")
        elif key in GENERATION_DEFAULTS:
            if stage != "ppo" and value != GENERATION_DEFAULTS[key]:
                result.ignored.append(f"{key}: generation settings of a training config are used by PPO only; "
                                      "chat/predict take them as options")
        else:
            problems.append(f"{key}: not a LLaMA-Factory key TuneForge knows")
    out = {section: values for section, values in out.items() if values}
    result.config = out
    if problems:
        raise ConfigError(*[f"{where}: {p}" for p in problems])
    return result


def _adapter_rules(raw: dict, kind: str, put, result: Translation, problems: list[str]) -> None:
    rank = raw.get("lora_rank", 8)
    alpha = raw.pop("lora_alpha", None)
    target = raw.pop("lora_target", "all")
    extra = raw.pop("additional_target", None)
    pissa, pissa_iter = raw.pop("pissa_init", False), raw.pop("pissa_iter", 16)
    if kind == "lora":
        if not alpha and 2 * rank != 16:
            result.notes.append(f"lora_alpha: {2 * rank} (2 x lora_rank, LLaMA-Factory's rule when it is not set; "
                                "TuneForge's default is 16)")
        put("method.adapter.alpha", alpha or 2 * rank)
        put("method.adapter.target_modules", "all" if target in ("all", ["all"]) else _names(target))
        if extra:
            put("method.adapter.modules_to_save", _names(extra))
        if pissa:
            put("method.adapter.init", "pissa")
            if pissa_iter != -1:
                result.notes.append(f"pissa_iter: {pissa_iter} fast-SVD iterations in LLaMA-Factory; TuneForge's PiSSA "
                                    "uses the exact SVD (the start differs slightly)")
    else:
        for key, value, default in (("lora_alpha", alpha, None), ("additional_target", extra, None),
                                    ("pissa_init", pissa, False)):
            if value not in (default, None, False, 0):
                problems.append(f"{key}: applies to finetuning_type lora, not {kind}")
    modules, extras = raw.pop("freeze_trainable_modules", "all"), raw.pop("freeze_extra_modules", None)
    if kind == "freeze":
        put("method.adapter.trainable_modules", "all" if modules in ("all", ["all"]) else _names(modules))
        if extras:
            put("method.adapter.extra_modules", _names(extras))
    optimizers = [name for name in ("galore", "apollo", "badam") if raw.pop(f"use_{name}", False)]
    settings = {k: raw.pop(k) for k in list(raw) if k.split("_")[0] in ("galore", "apollo", "badam")}
    if len(optimizers) > 1:
        problems.append(f"use_{'/use_'.join(optimizers)}: choose one low-memory optimizer")
    elif optimizers:
        name = optimizers[0]
        if kind != "full":
            problems.append(f"use_{name}: TuneForge runs {name} with finetuning_type full only")
        optimizer = {"name": name}
        if name in ("galore", "apollo"):
            scale_default = 2.0 if name == "galore" else 32.0
            optimizer.update(rank=settings.pop(f"{name}_rank", 16),
                             update_interval=settings.pop(f"{name}_update_interval", 200),
                             scale=settings.pop(f"{name}_scale", scale_default),
                             layerwise=settings.pop(f"{name}_layerwise", False))
            target = settings.pop(f"{name}_target", "all")
            optimizer["target_modules"] = "all" if target in ("all", ["all"]) else _names(target)
            if f"{name}_scale" not in settings:
                result.notes.append(f"{name}_scale: {optimizer['scale']} as in LLaMA-Factory (TuneForge's default "
                                    f"is {0.25 if name == 'galore' else 1.0})")
        else:
            optimizer.update(switch_every=settings.pop("badam_switch_interval", 50),
                             switch_mode=settings.pop("badam_switch_mode", "ascending"))
            settings.pop("badam_verbose", None)
        put("method.adapter.optimizer", optimizer)
    unsupported = key_table()["unsupported"]
    for key, value in settings.items():
        if key in unsupported:
            default, reason = unsupported[key]
            if value != default:
                problems.append(f"{key}: {value!r}: {reason}")
        elif not optimizers and value not in (None, False):
            result.ignored.append(f"{key}: its optimizer is not switched on")
    if raw.pop("disable_gradient_checkpointing", False) is False:
        put("train.gradient_checkpointing", True)
        result.notes.append("gradient checkpointing on, as LLaMA-Factory trains by default "
                            "(disable_gradient_checkpointing: true turns it off; TuneForge's default is off)")
    raw.pop("gradient_checkpointing", None)  # LLaMA-Factory decides this itself (above)
    mod = raw.pop("mixture_of_depths", None)
    if mod == "convert":
        put("model.mixture_of_depths", {})
    elif mod is not None:
        problems.append(f"mixture_of_depths: {mod!r}: only convert is supported")
    special = raw.pop("add_special_tokens", None)
    if special:
        put("model.new_special_tokens", _names(special))


def _method_rules(raw: dict, stage: str, put, result: Translation, problems: list[str]) -> None:
    beta, loss = raw.pop("pref_beta", 0.1), raw.pop("pref_loss", "sigmoid")
    if stage in ("dpo", "kto"):
        put("method.beta", beta)
    if stage == "dpo":
        if loss == "kto_pair":
            problems.append("pref_loss: kto_pair is not supported; use stage kto with KTO data")
        put("method.pref_loss", loss)
    elif loss != "sigmoid":
        problems.append(f"pref_loss: applies to stage dpo, not {stage}")
    if stage == "ppo":
        put("method.ppo_epochs", raw.pop("ppo_epochs", 4))
        result.notes.append("PPO: ppo_epochs 4, rollouts sampled with temperature 0.95, top_p 0.7 and up to 1024 new "
                            "tokens unless set, as LLaMA-Factory's generation defaults (TuneForge's: 2 epochs, "
                            "temperature 1, top_p 1, 32 tokens)")
        put("method.temperature", raw.pop("temperature", 0.95))
        put("method.top_p", raw.pop("top_p", 0.7))
        put("method.max_new_tokens", raw.pop("max_new_tokens", 1024))
        top_k = raw.pop("top_k", GENERATION_DEFAULTS["top_k"])
        if top_k:
            result.notes.append(f"top_k: {top_k} is not applied to PPO rollouts (TuneForge samples them with "
                                "temperature and top_p; top_k: 0 says the same)")
        for key in ("do_sample", "repetition_penalty", "max_length", "length_penalty", "skip_special_tokens"):
            value = raw.pop(key, GENERATION_DEFAULTS[key])
            if value != GENERATION_DEFAULTS[key]:
                problems.append(f"{key}: {value!r}: PPO rollouts take temperature, top_p and max_new_tokens only")
    elif stage not in ("dpo", "kto") and "pref_beta" in raw:
        raw.pop("pref_beta")


def _train_rules(raw: dict, put, result: Translation, problems: list[str]) -> None:
    scheduler = raw.pop("lr_scheduler_type", "linear")
    if scheduler not in SCHEDULERS:
        problems.append(f"lr_scheduler_type: {scheduler!r} is not supported; use one of {', '.join(sorted(SCHEDULERS))}")
    put("train.lr_scheduler", scheduler)
    max_steps = raw.pop("max_steps", -1)
    if max_steps not in (None, -1) and max_steps > 0:
        put("train.max_steps", max_steps)
    neat, packing = raw.pop("neat_packing", False), raw.pop("packing", None)
    if neat or packing:
        put("data.packing", True)
        if packing and not neat:
            result.notes.append("packing: TuneForge packs rows so that each attends only to itself, as "
                                "LLaMA-Factory's neat_packing (its plain packing lets rows attend to each other)")
    reports = raw.pop("report_to", None)
    names = [r for r in _names(reports or []) if r in ("tensorboard", "wandb", "mlflow")]
    if names:
        put("train.report_to", names)
    if reports and set(_names(reports)) - set(names) - {"none"}:
        result.ignored.append(f"report_to: {', '.join(sorted(set(_names(reports)) - set(names) - {'none'}))}: "
                              "TuneForge logs to tensorboard, wandb or mlflow")


def _names(value) -> list[str]:
    if isinstance(value, list):
        return [str(v).strip() for v in value if str(v).strip()]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def _list_or_value(key: str, value):
    return _names(value) if key in ("dataset", "eval_dataset", "adapter_name_or_path") else value


ADAPTER_KEYS = {"lora": {"rank", "dropout", "loraplus_lr_ratio", "rslora", "dora", "new_adapter"}, "freeze": {"trainable_layers"},
                "full": set()}


def _adapter_has(kind: str, target: str) -> bool:
    return target.rsplit(".", 1)[-1] in ADAPTER_KEYS.get(kind, set())


def _adapter_of(target: str) -> str:
    key = target.rsplit(".", 1)[-1]
    return next((kind for kind, keys in ADAPTER_KEYS.items() if key in keys), "?")


def describe(result: Translation) -> str:
    """The translation as `tuneforge convert` prints it: YAML, then what was kept from LLaMA-Factory and ignored."""
    text = yaml.safe_dump(result.config, sort_keys=False, allow_unicode=True)
    lines = ["# TuneForge config translated from a LLaMA-Factory config", text.rstrip()]
    if result.notes:
        lines += ["", "# LLaMA-Factory behaviour kept where TuneForge's default differs:"]
        lines += [f"#   - {n}" for n in result.notes]
    if result.ignored:
        lines += ["", "# ignored (they change nothing TuneForge computes):"]
        lines += [f"#   - {n}" for n in result.ignored]
    return "\n".join(lines) + "\n"
