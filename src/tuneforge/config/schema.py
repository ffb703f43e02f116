"""The typed, strict configuration of a TuneForge run.

Every field carries its documentation once (`Field(description=...)`); the CLI help, the JSON schema and
the web UI forms are derived from it. Unknown keys are errors (`extra="forbid"`), and combinations that
make no sense cannot be written: the adapter is a discriminated union on `type`. The `method` section (stages,
adapters, low-memory optimizers) lives in methods.py.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from tuneforge.config.base import Strict, _all_or_names, _split_names  # noqa: F401 (re-exported)
from tuneforge.config.methods import (  # noqa: F401 (the schema's names, importable from here as before)
    ADAPTER_DOC, OPTIMIZER_DOC, PREFERENCE_STAGES, STAGE_DOC, Adapter, ApolloOptimizer, BadamOptimizer, DpoMethod,
    FreezeAdapter, FullAdapter, GaloreOptimizer, KtoMethod, LlamaProAdapter, LoraAdapter, LowMemoryOptimizer,
    MethodConfig, PpoMethod, PtMethod, RmMethod, SftMethod)


class MixtureOfDepths(Strict):
    capacity: float = Field(0.5, gt=0, le=1, description="Share of each sequence's tokens a routed layer processes "
                            "(the paper uses 0.125; fine-tuning a dense model starts gentler).")
    layers: list[int] | None = Field(None, description="Decoder layers to route (default: every second, 1, 3, 5, ...).")


class ModelConfig(Strict):
    _split = field_validator("new_special_tokens", "adapters", mode="before")(_split_names)

    name_or_path: str = Field(
        description="What to fine-tune: an embedded model name (see `tuneforge env`), a local Hugging Face "
        "folder, a .gguf file, or a hub id such as Qwen/Qwen2.5-0.5B-Instruct."
    )
    hub: Literal["huggingface", "modelscope"] = Field(
        "huggingface", description="Where a hub id is downloaded from. ModelScope honours MODELSCOPE_CACHE."
    )
    revision: str | None = Field(None, description="Hub branch, tag or commit of the model.")
    gguf_file: str | None = Field(
        None, description="Name of the .gguf file inside a folder or hub repository holding several."
    )
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with a hub model. Off unless you trust its author."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype. auto: float32 on CPU, bfloat16 on GPUs that support it, else float16."
    )
    quantization_bit: Literal[4, 8] | None = Field(
        None, description="QLoRA: load the frozen base weights in 4 or 8 bits (bitsandbytes, CUDA GPU); "
        "LoRA adapters train on top in full precision."
    )
    quantization_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit number format: nf4 or fp4.")
    double_quantization: bool = Field(True, description="4-bit: quantize the quantization constants too.")
    new_special_tokens: list[str] = Field(
        default_factory=list, description="Tokens added to the vocabulary as special tokens (e.g. <tool_call>): the "
        "embedding matrix grows, and the new rows train (with LoRA only those rows, saved with the adapter).")
    mixture_of_depths: MixtureOfDepths | None = Field(
        None, description="Mixture-of-Depths: routed layers process only the top `capacity` share of tokens, chosen "
        "by a trained router (Llama, Mistral, Qwen2/3, Gemma 3 text; full or freeze training; generation runs "
        "without KV cache).")
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="Attention kernel: auto (PyTorch's scaled-dot-product attention where the model supports "
        "it), eager, or flash_attention_2 (CUDA GPUs with the flash-attn package).")
    template: str = Field(
        "auto",
        description="Chat template: auto uses the tokenizer's own template (or `empty` if it has none); "
        "or a built-in name such as chatml, qwen, llama3, gemma, mistral, phi, deepseek, glm4, alpaca, "
        "vicuna, default, empty.",
    )
    cache_dir: str | None = Field(
        None, description="Where converted GGUF models and tokenized data are cached (default ~/.cache/tuneforge)."
    )
    adapters: list[str] = Field(
        default_factory=list, description="LoRA adapters on top of the base model, in order: run directories "
        "(their adapter/) or PEFT adapter folders. Training merges all but the last into the base and trains the "
        "last one further (method.adapter.new_adapter: merges all, trains a new one); chat, predict and export "
        "merge them all. LLaMA-Factory's adapter_name_or_path.")


class DataConfig(Strict):
    dataset: list[str] = Field(
        description="Registered data set names from dataset_info.json, mixed in order: `identity,alpaca_en_demo`."
    )
    dataset_dir: str = Field("data", description="Folder holding dataset_info.json and the data files.")
    eval_dataset: list[str] = Field(
        default_factory=list, description="Data set names used only for evaluation (instead of val_size)."
    )
    cutoff_len: int = Field(
        1024, ge=8, description="Maximum tokens per training sequence; longer prompts are shortened first."
    )
    max_samples: int | None = Field(None, ge=1, description="Use at most this many rows of each data set.")
    val_size: float = Field(
        0.0, ge=0, description="Held-out evaluation split: a fraction below 1, or a number of rows."
    )
    train_on_prompt: bool = Field(False, description="Also compute the loss on prompt tokens.")
    mask_history: bool = Field(False, description="Train only on the last assistant turn of each conversation.")
    enable_thinking: bool = Field(
        True, description="Reasoning templates (qwen3, deepseekr1, gpt_oss, ...): false trains without thoughts "
        "(empty thought blocks in the prompt) and the run answers without them (LLaMA-Factory's enable_thinking).")
    default_system: str | None = Field(
        None, description="System prompt for rows that have none (else the template's own default)."
    )
    placeholders: dict[str, str] = Field(
        default_factory=dict,
        description="Text substituted for {{key}} in every row, e.g. {name: My Bot, author: Me} for `identity`.",
    )
    packing: bool = Field(
        False, description="sft: put the rows of a batch end to end in one sequence with no padding; each row "
        "attends only to itself and its positions restart (the same loss as unpacked rows, less wasted compute)."
    )
    mix_strategy: Literal["concat", "interleave_under", "interleave_over", "interleave_once"] = Field(
        "concat", description="Several data sets: concat (one after another; batches are shuffled anyway), or "
        "interleave rows by interleave_probs until the first runs out (under), until all have run out, repeating "
        "(over), or all once (once); as LLaMA-Factory, with Hugging Face datasets' interleave_datasets and train.seed.")
    interleave_probs: list[float] | None = Field(
        None, description="Sampling probability of each data set for the interleave strategies, in data.dataset "
        "order (default: equal).")
    overlong: Literal["drop", "truncate_answer", "split"] = Field(
        "drop",
        description="Rows whose answers alone exceed cutoff_len: drop them (counted), or cut the answers; split "
        "(sft, rm, dpo, kto): LLaMA-Factory's truncation, each turn's prompt and answer tokens share what is left in proportion, "
        "each keeping its beginning (rm, dpo, kto: the prompt and the (longer) answer share cutoff_len that way).",
    )
    on_bad_row: Literal["error", "skip"] = Field(
        "error", description="Malformed rows: stop with a report of all of them, or skip them (counted)."
    )
    strict_paths: bool = Field(
        False, description="Refuse registered files outside data.dataset_dir (absolute paths, .., symlinks leading "
        "out); off: they are read with a warning. The web UI and the API turn it on.")
    overwrite_cache: bool = Field(False, description="Re-tokenize even if a cached copy exists.")
    tokenized_path: str | None = Field(
        None, description="Folder for the tokenized training data: saved there by the first run, loaded from there "
        "by later runs (which then read no data set; delete the folder to tokenize again). As LLaMA-Factory.")
    preprocessing_num_workers: int | None = Field(
        None, ge=1, description="Processes that tokenize in parallel (chunks of at least 64 rows; pre-training and "
        "KTO data are tokenized in one pass, as their blocks and KL pairs span rows). Default: one.")
    streaming: bool = Field(
        False, description="Read the data sets while training instead of loading them first, for data larger than "
        "memory (needs train.max_steps; data sets are read one after the other). As LLaMA-Factory.")
    buffer_size: int = Field(16384, ge=1, description="With data.streaming: rows held to shuffle from.")

    _split = field_validator("dataset", "eval_dataset", mode="before")(_split_names)

    @field_validator("interleave_probs", mode="before")
    @classmethod
    def _probs(cls, v):
        return [float(x) for x in v.split(",")] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _mixing(self) -> "DataConfig":
        if self.interleave_probs is not None:
            if self.mix_strategy == "concat":
                raise ValueError("data.interleave_probs applies to the interleave strategies; set data.mix_strategy")
            if len(self.interleave_probs) != len(self.dataset) or any(p < 0 for p in self.interleave_probs) or \
                    abs(sum(self.interleave_probs) - 1) > 1e-6:
                raise ValueError(f"data.interleave_probs: {len(self.dataset)} non-negative numbers adding up to 1 "
                                 f"(one per data set), got {self.interleave_probs}")
        return self

    @field_validator("dataset")
    @classmethod
    def _need_one(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("name at least one data set")
        return v

    @field_validator("val_size")
    @classmethod
    def _fraction_or_count(cls, v: float) -> float:
        if v >= 1 and v != int(v):
            raise ValueError("use a fraction below 1 (0.1) or a whole number of rows (200)")
        return v


FSDP_WORDS = ("full_shard", "shard_grad_op", "hybrid_shard", "hybrid_shard_zero2", "no_shard", "offload",
              "auto_wrap")


class TrainConfig(Strict):
    num_epochs: float = Field(3.0, gt=0, description="Passes over the training data.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    batch_size: int = Field(4, ge=1, description="Rows per device per forward pass.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Forward passes per optimizer step.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal[
        "linear", "cosine", "constant", "constant_with_warmup", "cosine_with_min_lr", "polynomial"
    ] = Field("cosine", description="Learning-rate schedule after warmup.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Share of steps spent warming the learning rate up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 turns clipping off).")
    non_finite_patience: int = Field(
        3, ge=0, description="Optimizer steps in a row whose loss or gradients may be NaN or infinite (each is skipped) "
        "before the run stops as failed; a weight that becomes NaN or infinite stops it at once.")
    optim: str = Field(
        "adamw_torch_fused", description="Optimizer name as transformers knows it (the default, transformers' own, "
        "updates all weights in one fused kernel: faster than adamw_torch's per-tensor loop, bench/optimizer_step.py)."
    )
    seed: int = Field(42, description="Seed for shuffling, dropout and adapter initialisation.")
    logging_steps: int = Field(10, ge=1, description="Log loss, learning rate and throughput every N steps.")
    eval_steps: int | None = Field(None, ge=1, description="Evaluate every N steps (default: at each save).")
    save_steps: int = Field(500, ge=1, description="Write a checkpoint every N optimizer steps.")
    save_total_limit: int = Field(3, ge=1, description="Keep only the newest K checkpoints.")
    resume_from_checkpoint: str | None = Field(
        None, description="Continue a run: `auto` (the newest complete checkpoint in the run directory) or a "
        "checkpoint path."
    )
    resume_without_optimizer_state: bool = Field(
        False, description="Allow resuming from a checkpoint that lacks its optimizer state (the optimizer then "
        "starts afresh, which changes the run); off: such a checkpoint is refused.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory (slower).")
    torch_compile: bool = Field(False, description="Compile the model with torch.compile (minutes of compilation "
                                "first; pays off on long GPU runs; on a CPU the compiled steps were slower).")
    liger_kernel: bool = Field(False, description="Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU) on CUDA GPUs; "
                               "needs the liger-kernel package.")
    report_to: list[Literal["none", "tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["none"], description="Experiment trackers to log to, besides metrics.jsonl."
    )
    dataloader_num_workers: int = Field(0, ge=0, description="Worker processes feeding batches.")
    group_by_length: bool = Field(
        True, description="Batch rows of similar length together, so little compute goes to padding."
    )
    neftune_alpha: float | None = Field(
        None, gt=0, description="NEFTune: uniform noise of this scale on the input embeddings while training (try 5)."
    )
    deepspeed: str | None = Field(
        None, description="A DeepSpeed config (JSON) to train with: ZeRO-2 or ZeRO-3, optionally offloading to the "
        "CPU (examples/deepspeed/). Needs the deepspeed package; use with distributed.nproc_per_node.")
    fsdp: str | None = Field(
        None, description="PyTorch FSDP through the Trainer: `full_shard auto_wrap` shards weights, gradients and "
        "optimizer state (like ZeRO-3), `shard_grad_op auto_wrap` gradients and optimizer state (like ZeRO-2); add "
        "`offload` to keep weights on the CPU. Needs GPUs.")
    fsdp_config: str | None = Field(
        None, description="FSDP settings (a JSON file of transformers' fsdp_config keys); FSDP2 unless it says "
        '`"fsdp_version": 1`.')

    _split = field_validator("report_to", mode="before")(_split_names)

    @field_validator("fsdp")
    @classmethod
    def _fsdp_words(cls, value: str | None) -> str | None:
        words = (value or "").split()
        unknown = [w for w in words if w not in FSDP_WORDS]
        if unknown:
            raise ValueError(f"unknown FSDP option {' '.join(unknown)!r}; combine {', '.join(FSDP_WORDS)} "
                             "(e.g. `full_shard auto_wrap`)")
        if words and not set(words) & {"full_shard", "shard_grad_op", "hybrid_shard", "hybrid_shard_zero2",
                                       "no_shard"}:
            raise ValueError("say how to shard: full_shard, shard_grad_op, hybrid_shard, hybrid_shard_zero2 or "
                             "no_shard (e.g. `full_shard auto_wrap`)")
        return " ".join(words) or None

    @model_validator(mode="after")
    def _one_engine(self) -> "TrainConfig":
        if self.deepspeed and self.fsdp:
            raise ValueError("train.deepspeed and train.fsdp: choose one engine (set the other to empty)")
        if self.fsdp_config and not self.fsdp:
            raise ValueError("train.fsdp_config is set but train.fsdp is empty; set train.fsdp (e.g. `full_shard "
                             "auto_wrap`)")
        return self

    @field_validator("optim")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        import difflib

        from transformers.training_args import OptimizerNames

        names = [o.value for o in OptimizerNames]
        if value not in names:
            close = difflib.get_close_matches(value, names, n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ValueError(f"unknown optimizer {value!r}; {hint}transformers knows {', '.join(names)}")
        return value


class OutputConfig(Strict):
    run_dir: str = Field("runs/default", description="Folder that receives everything the run produces.")
    overwrite: bool = Field(False, description="Start afresh in a run directory that already holds a run.")
    plot_loss: bool = Field(True, description="Write loss.png during and after training.")


class EvalConfig(Strict):
    dataset: list[str] = Field(
        default_factory=list, description="Data sets to evaluate after training (registry names or files)."
    )
    max_samples: int | None = Field(None, ge=1, description="Evaluate at most this many rows of each data set.")
    mode: Literal["auto", "score", "generate"] = Field(
        "auto",
        description="score: pick the likeliest of the labels (fast, always valid); generate: free text; "
        "auto: score when the answers come from a small set of labels.",
    )
    labels: list[str] | None = Field(None, description="Candidate labels for scoring (default: detected from answers).")
    batch_size: int = Field(16, ge=1, description="Rows per forward pass during evaluation.")
    max_new_tokens: int = Field(64, ge=1, description="Longest generated answer during evaluation.")
    compare_to: Literal["none", "base"] = Field(
        "base", description="Also evaluate the base model, side by side with the fine-tuned one."
    )
    general_dataset: str | None = Field(
        "alpaca_en_demo", description="General data for the forgetting and repetition checks (none to skip)."
    )
    general_samples: int = Field(32, ge=1, description="Rows of general_dataset used by those checks.")

    _split = field_validator("dataset", mode="before")(_split_names)

    @field_validator("labels", mode="before")
    @classmethod
    def _labels(cls, v):
        return _split_names(v) if isinstance(v, str) else v


class DistributedConfig(Strict):
    nproc_per_node: int | Literal["auto"] = Field(
        1, description="Training processes on this machine (`auto`: one per GPU). Above 1, `tuneforge train` "
        "starts itself under torchrun (PyTorch's DDP through the Trainer; gloo on CPUs).")
    nnodes: int = Field(1, ge=1, description="Machines taking part (run the same command on each, with its node_rank).")
    node_rank: int = Field(0, ge=0, description="This machine's number among nnodes (0 on the one at master_addr).")
    master_addr: str = Field("127.0.0.1", description="Address of machine 0, which the others connect to.")
    master_port: int = Field(29500, ge=1, le=65535, description="Port on machine 0 for the processes to meet.")

    @field_validator("nproc_per_node")
    @classmethod
    def _positive(cls, v):
        if v != "auto" and v < 1:
            raise ValueError("distributed.nproc_per_node: 1 or more, or auto")
        return v


class TuneForgeConfig(Strict):
    model: ModelConfig
    data: DataConfig
    method: MethodConfig = Field(default_factory=SftMethod, description="What is learned, and how.")
    train: TrainConfig = Field(default_factory=TrainConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    @field_validator("method", mode="before")
    @classmethod
    def _sft_by_default(cls, v):
        return {"stage": "sft", **v} if isinstance(v, dict) and "stage" not in v else v

    def _streaming_combinations(self) -> None:
        d = self.data
        problems = [
            (not self.train.max_steps, "train.max_steps (a stream has no length to count epochs in)", "set it"),
            (self.method.stage == "ppo", "stage ppo (its prompts are drawn at random)", "turn streaming off"),
            (d.val_size > 0, "data.val_size (nothing is split off a stream)", "name data.eval_dataset instead"),
            (d.mix_strategy != "concat", f"data.mix_strategy {d.mix_strategy}", "use concat"),
            (d.tokenized_path is not None, "data.tokenized_path (nothing is kept)", "remove it"),
            (self.train.dataloader_num_workers > 0, "train.dataloader_num_workers (each worker would read it all)",
             "set it to 0"),
        ]
        for bad, what, fix in problems:
            if bad:
                raise ValueError(f"data.streaming does not go with {what}; {fix}")

    @model_validator(mode="after")
    def _combinations(self) -> "TuneForgeConfig":
        if self.method.stage != "sft" and (self.data.train_on_prompt or self.data.mask_history):
            raise ValueError("data.train_on_prompt and data.mask_history apply to sft only; remove them")
        if self.data.overlong == "split" and self.method.stage not in ("sft", "rm", "dpo", "kto"):
            raise ValueError("data.overlong: split applies to stages sft, rm, dpo and kto; use drop or "
                             "truncate_answer")
        if self.data.streaming:
            self._streaming_combinations()
        if self.data.packing and self.method.stage != "sft":
            raise ValueError("data.packing applies to stage sft (pt already joins documents into blocks; the "
                             "preference stages pair rows); remove it")
        adapter = self.method.adapter
        if getattr(adapter, "init", "default") in ("pissa", "olora", "loftq") and (
                adapter.dora or self.model.quantization_bit or self.method.stage not in ("sft", "pt")):
            raise ValueError(f"method.adapter.init: {adapter.init} works with plain LoRA on unquantized weights "
                             "in stages sft and pt (other stages use the base as their reference); remove dora / "
                             "model.quantization_bit, or use init: default"
                             + ("; loftq quantizes the base itself (method.adapter.loftq_bits)" if adapter.init == "loftq" else ""))
        optimizer = getattr(adapter, "optimizer", None)
        if optimizer is not None and self.method.stage == "ppo":
            raise ValueError(f"method.adapter.optimizer: {optimizer.name} is not available for stage ppo (its loop "
                             "uses AdamW); remove it")
        if getattr(optimizer, "layerwise", False) and self.train.gradient_accumulation_steps > 1:
            raise ValueError("method.adapter.optimizer.layerwise updates weights during the backward pass and cannot "
                             "accumulate gradients; set train.gradient_accumulation_steps: 1 or layerwise: false")
        if self.model.mixture_of_depths and (adapter.type not in ("full", "freeze") or self.method.stage not in
                                             ("sft", "pt")):
            raise ValueError("model.mixture_of_depths trains new routers with the layers: use method.adapter.type "
                             "full or freeze, in stage sft or pt")
        if self.model.adapters:
            if adapter.type != "lora":
                raise ValueError("model.adapters are LoRA adapters: they continue with method.adapter.type lora "
                                 f"(not {adapter.type}); merge them first with `tuneforge export` to train otherwise")
            if not adapter.new_adapter and adapter.init != "default":
                raise ValueError(f"method.adapter.init: {adapter.init} starts a new adapter, but the last of "
                                 "model.adapters is trained further; set method.adapter.new_adapter: true")
            if self.model.quantization_bit and (adapter.new_adapter or len(self.model.adapters) > 1):
                raise ValueError("model.adapters cannot be merged into quantized weights: with "
                                 "model.quantization_bit give one adapter to train further")
            if self.method.stage == "rm" and not adapter.new_adapter:
                raise ValueError("stage rm trains a new score head: set method.adapter.new_adapter: true to merge "
                                 "model.adapters and train a new adapter with it")
        elif getattr(adapter, "new_adapter", False):
            raise ValueError("method.adapter.new_adapter applies with model.adapters; give the adapters to stack on")
        if self.model.quantization_bit and self.method.adapter.type != "lora":
            raise ValueError(f"model.quantization_bit: quantized weights cannot be trained with "
                             f"method.adapter.type {self.method.adapter.type}; use lora (QLoRA) or drop quantization_bit")
        return self
