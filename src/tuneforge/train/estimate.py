"""What a run will need before it starts: peak memory from the model's shape and the config, and (on request)
time per epoch and peak memory measured over a few real training steps.

The memory model counts weights, gradients and optimizer states of the trainable parameters, the activations
that backpropagation keeps per token of the largest batch, the logits at supervised positions (a slice of them
where the loss takes a single pass over a frozen head, tuneforge.model.scoring), and a fixed process overhead.
The activation term is what autograd saves per token and decoder block (counted with its saved-tensor hooks on
Llama, Qwen2, Qwen3 and Gemma 3 blocks, see `saved_per_token`), in the training dtype; `tuneforge check
--measure` reports how far the total is from a measured peak on the machine at hand.

On a CPU the measured peak is the process's resident memory, which includes what the memory allocator keeps after
tensors are freed. The tuneforge command runs on tcmalloc when it is installed (tuneforge.allocator), which hands
freed memory back; glibc's malloc keeps far more of a step's temporaries (SmolLM2-135M LoRA, batch 8: 5.82 GiB
peak against 3.74 GiB), so the estimate adds that slack when the process runs on glibc.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass

import torch

from tuneforge.config import TuneForgeConfig
from tuneforge.model.adapters import ParamCount

GIB = 1024 ** 3
PROCESS_OVERHEAD = int(0.7 * GIB)  # Python, torch, transformers and the data in a training process (CPU, measured)
# backward's temporaries and what the allocator keeps, over the saved tensors: fitted on measured peaks of LoRA and
# full training (SmolLM2-135M, Gemma-3-270M, Qwen2.5-0.5B and -1.5B shapes; bench/train_speed.py)
ACTIVATION_SLACK = 1.04  # tcmalloc or jemalloc (what the tuneforge command preloads when installed), CUDA
GLIBC_ACTIVATION_SLACK = 1.8  # glibc's malloc
PAIR_STAGES = {"rm": 2, "dpo": 2, "kto": 2}  # sequences per row: chosen + rejected, answer + mismatched KL pair


@dataclass
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    activations: int
    overhead: int
    tokens: int  # tokens in the largest forward pass
    offloaded: int = 0  # moved to CPU memory by the engine (not in total)
    engine: str = ""  # set for a per-device estimate under an engine (engines.per_device)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.overhead

    def __str__(self) -> str:
        parts = ", ".join(f"{name} {getattr(self, name) / GIB:.2f}" for name in
                          ("weights", "gradients", "optimizer", "activations", "overhead"))
        where = f" per process ({self.engine})" if self.engine else ""
        moved = f"; {self.offloaded / GIB:.2f} GiB offloaded to CPU memory" if self.offloaded else ""
        return (f"~{self.total / GIB:.2f} GiB peak{where} ({parts} GiB; {self.tokens:,} tokens in the largest "
                f"batch{moved})")


def estimate_memory(cfg: TuneForgeConfig, model_config, params: ParamCount, longest: int,
                    supervised_share: float) -> MemoryEstimate:
    """`longest`: tokens of the longest training sequence; `supervised_share`: share of tokens with a loss."""
    t, adapter = cfg.train, cfg.method.adapter
    width = 4 if cfg.model.dtype in ("auto", "float32") and not torch.cuda.is_available() else 2
    weight_bytes = 0.5 if cfg.model.quantization_bit == 4 else 1 if cfg.model.quantization_bit == 8 else width
    weights = params.total * weight_bytes
    if cfg.method.stage in ("dpo", "kto", "ppo") and adapter.type != "lora":
        weights *= 2  # a frozen reference copy
    # trainable weights are kept in float32. At the peak (the start of the backward pass, every activation still
    # kept) the gradients of the embedding and LM head exist, while the blocks' arrive as their activations go:
    # half of those are counted (measured: full training of SmolLM2-135M, Gemma-3-270M, Qwen2.5-0.5B)
    in_blocks = min(params.trainable, _block_weights(model_config) * model_config.num_hidden_layers)
    gradients = (params.trainable - in_blocks / 2) * 4
    optimizer = _optimizer_bytes(cfg, model_config, params)
    sequences = t.batch_size * PAIR_STAGES.get(cfg.method.stage, 1)
    tokens = sequences * min(longest, cfg.data.cutoff_len)
    activations = _activation_bytes(cfg, model_config, tokens, longest, supervised_share, width)
    return MemoryEstimate(int(weights), int(gradients), int(optimizer), int(activations), PROCESS_OVERHEAD, tokens)


def _optimizer_bytes(cfg: TuneForgeConfig, model_config, params: ParamCount) -> float:
    optimizer = getattr(cfg.method.adapter, "optimizer", None)
    states = 0 if cfg.train.optim.startswith("sgd") else 2  # AdamW: two float32 moments per trainable weight
    if optimizer is None:
        return params.trainable * 4 * states
    h, layers = model_config.hidden_size, model_config.num_hidden_layers
    block = 4 * h * h + 3 * h * model_config.intermediate_size  # weights of one decoder block (approximate)
    if optimizer.name == "badam":
        return block * 4 * 2
    projected = layers * block
    low_rank = layers * 7 * optimizer.rank * max(h, model_config.intermediate_size)  # states live in rank space
    return (params.trainable - projected + low_rank) * 4 * 2


# model types whose causal LM class is in scoring.PLAIN_HEADS, for configs that do not name their class
PLAIN_HEAD_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo2", "olmo3", "smollm3",
                    "phi3"}
QK_NORM = ("qwen3", "gemma3", "olmo2", "olmo3")  # model types that normalise queries and keys per head
SANDWICH_NORM = ("gemma2", "gemma3")  # model types with norms after attention and MLP as well
# model types whose MLPs tuneforge.model.lean_mlp makes keep gate and up only
LEAN_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "olmo2", "olmo3",
              "granite", "cohere", "ministral3", "smollm3"}


def _activation(c) -> str:
    return getattr(c, "hidden_activation", None) or getattr(c, "hidden_act", "") or ""


def saved_per_token(c, trains_weights: bool, lora_rank: int = 0, lean_norms: bool = True,
                    float32: bool = True) -> float:
    """Numbers that backpropagation keeps per token and decoder block, counted with autograd's saved-tensor hooks
    on Llama, Qwen2, Qwen3 and Gemma 3 blocks (scaled-dot-product attention) while varying one dimension at a
    time: each norm's input (and its output, where lean_mlp's norms do not recompute it), queries, keys and values
    after rotation, the attention output and its projection's input, the gated MLP's gate and up (and its
    activation and product, where lean_mlp does not apply); norms' outputs a second time when their weights
    train, unless lean_mlp's fused float32 norms (ScaledNorm) recompute them."""
    h, inter = c.hidden_size, c.intermediate_size
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or h // heads
    q, k = heads * head_dim, kv * head_dim
    kind = getattr(c, "model_type", "") or ""
    lean = _lean(c)
    mlp = 2 if lean else 4  # lean_mlps
    norms = 2 if lean and lean_norms else 4  # lean_norms: the two norms before projections keep their input only
    fused = lean and lean_norms and float32  # ScaledNorm: a trained weight's gradient recomputes the norm's output
    per = (norms + 2 if trains_weights and not fused else norms) * h + 2 * q + 2 * k + mlp * inter + heads \
        + 7 * lora_rank
    if kind.startswith(QK_NORM):
        per += (2 if trains_weights else 1) * (q + k)
    if kind.startswith(SANDWICH_NORM):
        per += (4 if trains_weights and not fused else 2) * h
    return per


def _activation_bytes(cfg: TuneForgeConfig, c, tokens: int, longest: int, supervised_share: float,
                      width: int) -> float:
    adapter = cfg.method.adapter
    lora_rank = adapter.rank if adapter.type == "lora" else 0
    per_token = saved_per_token(c, adapter.type != "lora", lora_rank,
                                lean_norms=not (cfg.train.deepspeed or cfg.train.fsdp),
                                float32=width == 4) * activation_slack()
    if cfg.model.attention == "eager":
        per_token += 2 * c.num_attention_heads * min(longest, cfg.data.cutoff_len)  # attention probabilities
    kept_layers = _layers_with_gradients(cfg, c.num_hidden_layers)
    single_pass = _single_pass_loss(cfg, c, width)
    if cfg.train.gradient_checkpointing:  # only each block's input, plus one block recomputed at a time
        blocks = kept_layers * c.hidden_size + per_token
    else:
        blocks = kept_layers * per_token
        if single_pass and _lean(c):  # the last block's MLP runs (and keeps gate and up) where a loss is taken
            blocks -= 2 * c.intermediate_size * activation_slack() * (1 - supervised_share)
    supervised = tokens if cfg.method.stage == "pt" else tokens * supervised_share
    if single_pass:  # a vocabulary slice of about 4 MiB of weights at a time: its logits, exp and slope
        logits = supervised * min(c.vocab_size, max(1, (4 << 20) // (c.hidden_size * 4))) * 3
    else:
        logits = supervised * c.vocab_size * 3  # logits, their log-softmax and its gradient (float32)
    return tokens * blocks * width + logits * 4


def _single_pass_loss(cfg: TuneForgeConfig, c, width: int) -> bool:
    """Whether training's loss goes through scoring.supervised_loss_sum's single pass over a frozen head (no
    logits kept): SFT or pre-training with LoRA in float32 on a model class listed in scoring.PLAIN_HEADS."""
    from tuneforge.model.scoring import PLAIN_HEADS

    adapter = cfg.method.adapter
    architectures = getattr(c, "architectures", None) or []
    kind = getattr(c, "model_type", "") or ""
    plain = architectures[0] in PLAIN_HEADS if architectures else kind in PLAIN_HEAD_TYPES
    return (cfg.method.stage in ("sft", "pt") and adapter.type == "lora" and not adapter.modules_to_save
            and not cfg.model.new_special_tokens and width == 4 and plain)


def _lean(c) -> bool:
    return (getattr(c, "model_type", "") or "") in LEAN_TYPES and _activation(c) in ("silu", "gelu_pytorch_tanh")


def _block_weights(c) -> int:
    """Weights of one decoder block's projections (attention and gated MLP)."""
    h, heads = c.hidden_size, c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or h // heads
    return 2 * h * heads * head_dim + 2 * h * kv * head_dim + 3 * h * c.intermediate_size


def activation_slack() -> float:
    if torch.cuda.is_available():
        return ACTIVATION_SLACK
    from tuneforge.allocator import loaded

    return ACTIVATION_SLACK if loaded() else GLIBC_ACTIVATION_SLACK


def _layers_with_gradients(cfg: TuneForgeConfig, layers: int) -> int:
    """Backpropagation stops at the first block that trains (LoRA last_layers, freeze last N)."""
    adapter = cfg.method.adapter
    if adapter.type == "lora" and adapter.last_layers:
        return min(adapter.last_layers, layers)
    if adapter.type == "freeze" and adapter.trainable_layers > 0 and not adapter.extra_modules:
        return min(adapter.trainable_layers, layers)
    return layers


def available_memory() -> tuple[int, str]:
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return free, f"free on GPU {torch.cuda.get_device_name()}"
    import psutil

    return psutil.virtual_memory().available, "available RAM"


@dataclass
class Measurement:
    steps: int
    tokens_per_second: float
    epoch_seconds: float
    peak_bytes: int

    def __str__(self) -> str:
        return (f"{self.peak_bytes / GIB:.2f} GiB peak, {self.tokens_per_second:.0f} tokens/s over {self.steps} "
                f"steps after a warm-up step: about {format_duration(self.epoch_seconds)} per epoch")


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def peak_memory() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss if sys.platform == "darwin" else rss * 1024
