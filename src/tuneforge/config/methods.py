"""The `method` section of the config: the stage (sft, pt, rm, dpo, kto, ppo) and how weights are trained (the
adapter: lora, freeze, full, llama_pro, with the low-memory optimizers of full training)."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import AliasChoices, Field, field_validator

from tuneforge.config.base import Strict, _all_or_names, _split_names


ADAPTER_DOC = ("How weights are trained: lora (adapters), freeze (some layers), full, or llama_pro (new blocks "
               "added and trained).")


class LoraAdapter(Strict):
    type: Literal["lora"] = Field("lora", description=ADAPTER_DOC)
    rank: int = Field(8, ge=1, description="LoRA rank r.")
    alpha: float = Field(16, gt=0, description="LoRA scaling alpha (the update is scaled by alpha / rank).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all"] = Field(
        "all", description="Linear layers that get adapters: `all`, or names such as q_proj,v_proj."
    )
    modules_to_save: list[str] = Field(
        default_factory=list, validation_alias=AliasChoices("modules_to_save", "additional_target"),
        description="Extra modules trained in full and saved with the adapter (e.g. embed_tokens,lm_head); "
        "LLaMA-Factory's name additional_target is accepted too.")
    last_layers: int | None = Field(
        None, ge=1, description="Adapt only the last N decoder layers; backpropagation then stops there (faster)."
    )
    dora: bool = Field(
        False, description="DoRA: train a magnitude per output channel besides the low-rank direction (slower steps)."
    )
    rslora: bool = Field(False, description="rsLoRA: scale the update by alpha / sqrt(rank) instead of alpha / rank.")
    loraplus_lr_ratio: float | None = Field(
        None, gt=0, description="LoRA+: the B matrices learn this many times faster than A (16 is typical)."
    )
    init: Literal["default", "gaussian", "pissa", "olora", "loftq"] = Field(
        "default", description="Adapter start: default (B = 0), gaussian, pissa (principal singular vectors of "
        "each weight, which converge faster), olora (QR-based) or loftq (the base weights are quantized to "
        "loftq_bits and the adapter starts as a low-rank fit of the quantization error; needs a CUDA GPU). pissa "
        "and olora move the base weights while training; the saved adapter is converted to apply to the original "
        "base (at twice the rank). loftq runs keep the quantized weights they trained on, next to the adapter."
    )
    new_adapter: bool = Field(
        False, description="With model.adapters: merge them all into the base and train a new adapter on top, "
        "instead of training the last one further (LLaMA-Factory's create_new_adapter).")
    loftq_bits: Literal[4, 8] = Field(4, description="LoftQ: bits of the quantized base (nf4 or int8).")
    loftq_iter: int = Field(1, ge=1, description="LoftQ: alternating quantize / low-rank fit rounds.")

    _split = field_validator("modules_to_save", mode="before")(_split_names)
    _all_or_split = field_validator("target_modules", mode="before")(_all_or_names)


class FreezeAdapter(Strict):
    type: Literal["freeze"] = Field("freeze", description=ADAPTER_DOC)
    trainable_layers: int = Field(
        2, description="Train the last N decoder layers (a negative number: the first N); the rest are frozen."
    )
    trainable_modules: list[str] | Literal["all"] = Field(
        "all", description="Inside those layers, only these submodules (e.g. mlp,self_attn), or all."
    )
    extra_modules: list[str] = Field(
        default_factory=list, description="Modules outside the decoder layers to train too (e.g. embed_tokens)."
    )

    _split = field_validator("extra_modules", mode="before")(_split_names)
    _all_or_split = field_validator("trainable_modules", mode="before")(_all_or_names)

    @field_validator("trainable_layers")
    @classmethod
    def _nonzero(cls, v: int) -> int:
        if v == 0:
            raise ValueError("0 layers would train nothing; use a positive (last N) or negative (first N) number")
        return v


OPTIMIZER_DOC = ("galore: Adam states kept for low-rank projections of the gradients; apollo: AdamW-like scaling "
                 "estimated in a random low-rank space (SGD-like memory); badam: Adam on one decoder block at a time.")
LOW_RANK_TARGETS_DOC = "Linear layers whose gradients are projected: `all` (every linear layer of the decoder blocks) or names."


class _LowRankOptimizer(Strict):
    rank: int = Field(16, ge=1, description="Rank of the low-rank space the optimizer states live in (memory grows "
                      "with it).")
    update_interval: int = Field(200, ge=1, description="Optimizer steps between new projections.")
    target_modules: list[str] | Literal["all"] = Field("all", description=LOW_RANK_TARGETS_DOC)
    layerwise: bool = Field(False, description="Update each weight right after its gradient is ready (less memory; "
                            "no gradient accumulation, one process).")

    _all_or_split = field_validator("target_modules", mode="before")(_all_or_names)


class GaloreOptimizer(_LowRankOptimizer):
    name: Literal["galore"] = Field(description=OPTIMIZER_DOC)
    scale: float = Field(0.25, gt=0, description="Scale of the projected update (GaLore's alpha).")


class ApolloOptimizer(_LowRankOptimizer):
    name: Literal["apollo"] = Field(description=OPTIMIZER_DOC)
    scale: float = Field(1.0, gt=0, description="Scale of the update.")


class BadamOptimizer(Strict):
    name: Literal["badam"] = Field(description=OPTIMIZER_DOC)
    switch_every: int = Field(50, ge=1, description="Optimizer steps before moving on to the next block.")
    switch_mode: Literal["ascending", "descending", "random", "fixed"] = Field(
        "ascending", description="Order in which blocks take turns.")


LowMemoryOptimizer = Annotated[Union[GaloreOptimizer, ApolloOptimizer, BadamOptimizer], Field(discriminator="name")]


class FullAdapter(Strict):
    type: Literal["full"] = Field("full", description=ADAPTER_DOC)
    optimizer: LowMemoryOptimizer | None = Field(
        None, description="Memory-efficient full-parameter training: galore, apollo or badam (default: plain AdamW "
        "as set by train.optim).")


class LlamaProAdapter(Strict):
    type: Literal["llama_pro"] = Field("llama_pro", description=ADAPTER_DOC)
    new_layers: int = Field(
        2, ge=1, description="LLaMA-Pro: decoder blocks added, one after each of this many equal groups of the "
        "model's blocks; they start as the identity (output projections zero) and are the only ones trained.")
    extra_modules: list[str] = Field(
        default_factory=list, description="Modules outside the decoder layers to train too (e.g. embed_tokens).")

    _split = field_validator("extra_modules", mode="before")(_split_names)


Adapter = Annotated[Union[LoraAdapter, FreezeAdapter, FullAdapter, LlamaProAdapter], Field(discriminator="type")]


STAGE_DOC = ("sft: supervised fine-tuning on conversations; pt: continued pre-training on text; rm: reward model "
             "on preference pairs; dpo: preference optimisation (DPO, IPO, hinge, ORPO, SimPO); kto: single answers "
             "marked desirable or not; ppo: reinforcement learning against a reward model.")


class _Method(Strict):
    adapter: Adapter = Field(default_factory=LoraAdapter)

    @field_validator("adapter", mode="before")
    @classmethod
    def _lora_by_default(cls, v):
        return {"type": "lora", **v} if isinstance(v, dict) and "type" not in v else v


class SftMethod(_Method):
    stage: Literal["sft"] = Field("sft", description=STAGE_DOC)


class PtMethod(_Method):
    stage: Literal["pt"] = Field("pt", description=STAGE_DOC)


class RmMethod(_Method):
    stage: Literal["rm"] = Field("rm", description=STAGE_DOC)


class DpoMethod(_Method):
    stage: Literal["dpo"] = Field("dpo", description=STAGE_DOC)
    pref_loss: Literal["sigmoid", "hinge", "ipo", "orpo", "simpo"] = Field(
        "sigmoid", description="sigmoid (DPO), hinge, ipo; orpo and simpo need no reference model."
    )
    beta: float = Field(0.1, gt=0, description="Strength of the preference term (DPO's beta).")
    pref_ftx: float = Field(0.0, ge=0, description="Weight of an extra SFT loss on the chosen answers.")
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO's target reward margin.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5,
                                   description="Share of preference labels assumed flipped (DPO sigmoid and SimPO).")


class KtoMethod(_Method):
    stage: Literal["kto"] = Field("kto", description=STAGE_DOC)
    beta: float = Field(0.1, gt=0, description="Strength of the KTO term.")
    desirable_weight: float = Field(1.0, gt=0, description="Loss weight of desirable answers.")
    undesirable_weight: float = Field(1.0, gt=0, description="Loss weight of undesirable answers.")
    pref_ftx: float = Field(0.0, ge=0, description="Weight of an extra SFT loss on the desirable answers.")


class PpoMethod(_Method):
    stage: Literal["ppo"] = Field("ppo", description=STAGE_DOC)
    reward_model: str = Field(description="Run directory of a reward model trained with stage rm.")
    kl_coef: float = Field(0.05, ge=0, description="Penalty per unit of KL divergence from the starting model.")
    ppo_epochs: int = Field(2, ge=1, description="Optimisation passes over each batch of rollouts.")
    max_new_tokens: int = Field(32, ge=1, description="Longest generated answer in a rollout.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of rollouts.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of rollouts.")
    clip_range: float = Field(0.2, gt=0, description="PPO ratio clipping.")
    value_clip: float = Field(0.2, gt=0, description="Clipping of value updates.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss.")
    gamma: float = Field(1.0, gt=0, le=1, description="Discount over answer tokens.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")


MethodConfig = Annotated[Union[SftMethod, PtMethod, RmMethod, DpoMethod, KtoMethod, PpoMethod],
                         Field(discriminator="stage")]
PREFERENCE_STAGES = ("rm", "dpo")
