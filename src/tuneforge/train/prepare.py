"""Everything before the training loop, shared by `train` and `check`: model source, tokenizer, template, data."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field, replace

import torch
from transformers import set_seed

from tuneforge.config import TuneForgeConfig
from tuneforge.data.pipeline import DataBundle, load_data
from tuneforge.data.template import ChatTemplate, resolve_template
from tuneforge.errors import ConfigError
from tuneforge.model.adapters import (ParamCount, apply_adapter, check_loftq, column_major_lora_up, count_params,
                                      fused_lora_forward, share_lora_inputs, sparse_tied_embedding_grads,
                                      quantizes_base, upcast_trainable)
from tuneforge.model.depth import CONFIG_KEY, ROUTER, apply_mixture_of_depths
from tuneforge.model.integrity import verify_weight_folder
from tuneforge.model.lean_mlp import lean_mlps, lean_norms
from tuneforge.model.loader import (ModelSource, add_new_tokens, check_kernels, default_cache_dir, fit_vocabulary,
                                   load_model, load_tokenizer, new_token_ids, quantization_config, resolve_dtype,
                                   resolve_model)
from tuneforge.train.engines import check_engine
from tuneforge.train.optimizers import check_optimizer_installed


@dataclass
class Prepared:
    source: ModelSource
    tokenizer: object
    template: ChatTemplate
    template_note: str | None
    data: DataBundle
    warnings: list[str] = field(default_factory=list)


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_trackers(report_to: list[str]) -> None:
    missing = [name for name in report_to if name in TRACKER_PACKAGES
               and importlib.util.find_spec(TRACKER_PACKAGES[name]) is None]
    if missing:
        raise ConfigError(f"train.report_to: {', '.join(missing)} is not installed. "
                          f"hint: pip install {' '.join(TRACKER_PACKAGES[m] for m in missing)}, or remove it")


def prepare(cfg: TuneForgeConfig) -> Prepared:
    check_engine(cfg)
    check_trackers(cfg.train.report_to)
    check_optimizer_installed(getattr(cfg.method.adapter, "optimizer", None))
    check_kernels(cfg.model.attention, cfg.train.liger_kernel)
    if quantizes_base(cfg.method.adapter):
        check_loftq()
    quantization_config(cfg.model, resolve_dtype(cfg.model.dtype))  # unsupported here: say so before loading
    source = resolve_model(cfg.model)
    verify_weight_folder(source.path)  # a truncated or corrupt file is named now, not as a traceback later
    tokenizer = load_tokenizer(source, cfg.model.trust_remote_code)
    add_new_tokens(tokenizer, cfg.model.new_special_tokens)
    template, note = resolve_template(cfg.model.template, tokenizer)
    if not cfg.data.enable_thinking:
        template = replace(template, thinking=False)
    if template.reasoning and cfg.data.mask_history:
        raise ConfigError(f"data.mask_history with template {template.name}: LLaMA-Factory drops the thoughts of "
                          "earlier turns when it trains on the last one only, which TuneForge does not do yet. hint: "
                          "train on every turn (mask_history: false), or use a template without thoughts")
    if template.name != "auto" or not template.thinking:  # saved with the run: chat and export use this format
        tokenizer.chat_template = template.saved_jinja
    data = load_data(cfg.data, cfg.method.stage, tokenizer, template, default_cache_dir(cfg.model),
                     seed=cfg.train.seed)
    return Prepared(source, tokenizer, template, note, data, config_warnings(cfg, source))


def config_warnings(cfg: TuneForgeConfig, source: ModelSource) -> list[str]:
    """Settings that are allowed but almost certainly not meant."""
    from transformers import AutoConfig

    found = []
    if cfg.train.learning_rate > 1e-2:
        found.append(f"train.learning_rate={cfg.train.learning_rate:g} is far above what fine-tuning uses (1e-6 to "
                     "1e-3); the loss will probably become NaN. hint: try 1e-4 (LoRA) or 1e-5 (full)")
    model_config = AutoConfig.from_pretrained(source.path, trust_remote_code=cfg.model.trust_remote_code)
    context = getattr(getattr(model_config, "text_config", None) or model_config, "max_position_embeddings", None)
    if context and cfg.data.cutoff_len > context:
        found.append(f"data.cutoff_len={cfg.data.cutoff_len} is longer than the model's context ({context} tokens); "
                     f"positions past {context} were never trained. hint: data.cutoff_len={context} or less")
    return found


def build_model(cfg: TuneForgeConfig, source: ModelSource, tokenizer=None):
    """Load the weights and make the configured ones trainable (reward models get a new `score` head).
    With `tokenizer` holding model.new_special_tokens, the embeddings grow to its size and the new rows train.
    New weights (adapters, a reward head, routers, new rows) start from train.seed, so a run can be repeated."""
    set_seed(cfg.train.seed)
    dtype = resolve_dtype(cfg.model.dtype)
    reward = cfg.method.stage == "rm"
    quantization = quantization_config(cfg.model, dtype)
    model = load_model(source, dtype, cfg.model.trust_remote_code, reward=reward, quantization=quantization,
                       attention=cfg.model.attention)
    if reward and model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    if quantization is not None:  # QLoRA: norms in float32, inputs that carry gradients into the adapters
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    model = make_trainable(cfg, model, tokenizer)
    lean_mlps(model)  # the same gradients, two intermediate tensors per MLP less kept for backward
    if not (cfg.train.deepspeed or cfg.train.fsdp):  # norms recompute with their whole weight
        lean_norms(model)  # norms' outputs recomputed in backward; float32 norms fused (gradients to rounding)
    if dtype != torch.float32:
        upcast_trainable(model)
    if not (cfg.train.deepspeed or cfg.train.fsdp or cfg.train.torch_compile):
        sparse_tied_embedding_grads(model)  # a tied embedding's lookup adds its rows into the head's gradient
    if (not torch.cuda.is_available() and cfg.train.optim in ("adamw_torch", "adamw_torch_fused")
            and not (cfg.train.deepspeed or cfg.train.fsdp)):  # torch's own optimizers follow a weight's layout
        column_major_lora_up(model)  # the same values; B's gradient in the layout the CPU computes fast
        fused_lora_forward(model)  # the adapters' products added into the base outputs in place
        share_lora_inputs(model)  # one down-projection product per input that several adapters read
    return model


def build_reference(cfg: TuneForgeConfig, source: ModelSource):
    """The frozen reference of dpo/kto/ppo. None when the policy is LoRA (its adapter is switched off instead)
    or the loss needs none (ORPO, SimPO)."""
    m = cfg.method
    if m.stage not in ("dpo", "kto", "ppo") or m.adapter.type == "lora" or getattr(m, "pref_loss", "") in ("orpo", "simpo"):
        return None
    ref = load_model(source, resolve_dtype(cfg.model.dtype), cfg.model.trust_remote_code)
    return ref.requires_grad_(False).eval()


def count_trainable(cfg: TuneForgeConfig, source: ModelSource, tokenizer=None) -> ParamCount:
    """Trainable/total parameters without loading weights (the model is built on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(source.path, trust_remote_code=cfg.model.trust_remote_code)
    reward = cfg.method.stage == "rm"
    if reward:
        config.num_labels = 1
    auto = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    return count_params(make_trainable(cfg, model, tokenizer))


def make_trainable(cfg: TuneForgeConfig, model, tokenizer=None):
    from tuneforge.model.stacking import adapter_folders, adapter_rank, continue_adapter, merge_adapters

    """Grow the vocabulary for model.new_special_tokens, apply the adapter, route Mixture-of-Depths layers."""
    new_ids = []
    if tokenizer is not None and cfg.model.new_special_tokens:
        fit_vocabulary(model, tokenizer, mean_init=model.device.type != "meta")  # meta: shapes only
        new_ids = new_token_ids(tokenizer, cfg.model.new_special_tokens)
    folders = adapter_folders(cfg.model.adapters, cfg.model.name_or_path)
    if folders and not cfg.method.adapter.new_adapter:  # merge all but the last, which trains further
        model = continue_adapter(merge_adapters(model, folders[:-1]), folders[-1])
        print(f"tuneforge: training adapter {folders[-1]} further (rank {adapter_rank(folders[-1])}, as saved)"
              + (f" on top of {len(folders) - 1} merged" if len(folders) > 1 else ""), flush=True)
    else:
        model = apply_adapter(merge_adapters(model, folders), cfg.method.adapter,
                              head="score" if cfg.method.stage == "rm" else None, new_token_ids=new_ids)
    apply_routing(model, cfg.model.mixture_of_depths)
    return model


def apply_routing(model, settings) -> None:
    """model.mixture_of_depths: route the chosen layers (unless the loaded model already was); routers train."""
    if settings is None:
        return
    if not getattr(model.config, CONFIG_KEY, None):
        apply_mixture_of_depths(model, settings.capacity, settings.layers)
    for name, p in model.named_parameters():
        if f".{ROUTER}." in name:
            p.requires_grad_(True)
