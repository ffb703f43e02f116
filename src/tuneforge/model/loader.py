"""Find and load a tokenizer and causal LM from whatever the user named.

Order of resolution for `model.name_or_path`: an embedded model name, a local .gguf file, a local folder
(Hugging Face files, or .gguf files), a hub id (Hugging Face or ModelScope). GGUF weights are dequantized
once and cached as a safetensors folder, so later loads take seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from tuneforge.config.schema import ModelConfig
from tuneforge.errors import ConfigError, ModelError
from tuneforge.model.depth import load_mixture_of_depths
from tuneforge.model.embedded import embedded_models, locate_embedded
from tuneforge.model.integrity import verify_gguf

CONVERTED_MARKER = "tuneforge_source.json"
FINGERPRINTS = "gguf_fingerprints.json"


def default_cache_dir(cfg: ModelConfig | None = None) -> Path:
    if cfg is not None and cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return Path.home() / ".cache" / "tuneforge"


@dataclass
class ModelSource:
    """Where the weights were found: a folder `from_pretrained` can read, and how we got there."""

    path: str
    origin: str  # embedded | gguf | local | huggingface | modelscope
    description: str


def resolve_model(cfg: ModelConfig) -> ModelSource:
    name, cache = cfg.name_or_path, default_cache_dir(cfg)
    tried = []
    if name in embedded_models():
        gguf = locate_embedded(name, cache)
        return ModelSource(str(convert_gguf(gguf, cache)), "embedded", f"{name} (embedded, from {gguf.name})")
    tried.append(f"embedded models: not one of {', '.join(embedded_models())}")
    local = Path(name).expanduser()
    if local.is_file() and local.suffix == ".gguf":
        return ModelSource(str(convert_gguf(local, cache)), "gguf", f"{local} (GGUF)")
    if local.is_dir():
        if (local / "config.json").is_file():
            return ModelSource(str(local), "local", str(local))
        ggufs = sorted(local.glob("*.gguf"))
        if cfg.gguf_file:
            ggufs = [g for g in ggufs if g.name == cfg.gguf_file]
        if len(ggufs) == 1:
            return ModelSource(str(convert_gguf(ggufs[0], cache)), "gguf", f"{ggufs[0]} (GGUF)")
        what = "several .gguf files: set model.gguf_file" if ggufs else "no config.json and no .gguf file"
        raise ModelError(f"model.name_or_path: folder {local} holds {what}")
    tried.append(f"local path: {local.absolute()} does not exist")
    first = Path(name.split("/")[0]).expanduser()
    if name.count("/") == 1 and not name.startswith((".", "/", "~")) and not first.is_dir():
        return _from_hub(cfg, tried)  # org/name, where org is not a local folder (runs/nope is a missing run)
    raise ModelError(f"model.name_or_path: cannot find model {name!r}. tried: " + "; ".join(tried)
                     + ". hint: give an embedded name, a local folder or .gguf file, or a hub id like org/name")


def _from_hub(cfg: ModelConfig, tried: list[str]) -> ModelSource:
    name = cfg.name_or_path
    try:
        if cfg.hub == "modelscope":
            try:
                from modelscope import snapshot_download
            except ImportError:
                raise ModelError("model.hub is modelscope, which needs the modelscope package. "
                                 "hint: pip install 'tuneforge[modelscope]'") from None
            path = snapshot_download(name, revision=cfg.revision or "master")  # honours MODELSCOPE_CACHE
        else:
            from huggingface_hub import hf_hub_download, snapshot_download

            if cfg.gguf_file:
                gguf = hf_hub_download(name, cfg.gguf_file, revision=cfg.revision)
                return ModelSource(str(convert_gguf(Path(gguf), default_cache_dir(cfg))), "gguf", f"{name}/{cfg.gguf_file}")
            path = snapshot_download(name, revision=cfg.revision,
                                     allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.py", "*.jinja"])
    except ModelError:
        raise
    except Exception as exc:  # offline, missing repo, gated repo: the user needs the reason and the list
        reason = (str(exc).splitlines() or [""])[0]
        tried.append(f"{cfg.hub} hub: {type(exc).__name__}: {reason if len(reason) <= 200 else reason[:200] + '...'}")
        raise ModelError(f"model.name_or_path: cannot find model {name!r}. tried: " + "; ".join(tried)
                         + ". hint: without network, use an embedded model or download the model folder") from None
    return ModelSource(path, cfg.hub, f"{name} ({cfg.hub} hub)")


def gguf_fingerprint(gguf: Path, cache_dir: Path) -> str:
    """The first 16 hex digits of the file's SHA-256. Remembered per path, size and modification time in
    `<cache>/models/gguf_fingerprints.json`, so that a file is read through once, not at every load."""
    stat = gguf.stat()
    index_path = Path(cache_dir) / "models" / FINGERPRINTS
    key = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        index = {}
    if key not in index:
        digest = hashlib.sha256()
        with open(gguf, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        index[key] = digest.hexdigest()[:16]
        index_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = index_path.with_name(f"{FINGERPRINTS}.{os.getpid()}")
        tmp.write_text(json.dumps(index, indent=1), encoding="utf-8")
        os.replace(tmp, index_path)
    return index[key]


def convert_gguf(gguf: Path, cache_dir: Path) -> Path:
    """Dequantize a GGUF file once into `<cache>/models/<stem>-<content fingerprint>/` (safetensors + tokenizer).
    Keyed by content, so a reinstalled package (same file, new modification time) reuses the conversion."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = gguf.stat()
    target = Path(cache_dir) / "models" / f"{gguf.stem}-{gguf_fingerprint(gguf, cache_dir)}"
    if (target / CONVERTED_MARKER).is_file():
        return target
    verify_gguf(gguf)
    print(f"tuneforge: converting {gguf.name} to a safetensors cache (once) at {target}", flush=True)
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:
        raise ModelError(f"{gguf}: transformers cannot read this GGUF file ({type(exc).__name__}: "
                         f"{str(exc)[:200]}). hint: supported architectures are those transformers' GGUF "
                         "loader knows (llama, mistral, qwen2/3, gemma2/3, phi3, ...)") from None
    # save_pretrained refuses GGUF-loaded models: copy the weights into a plain model of the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / CONVERTED_MARKER).write_text(json.dumps({"gguf": str(gguf), "size": stat.st_size}))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def resolve_dtype(name: str) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_tokenizer(source: ModelSource | str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = source.path if isinstance(source, ModelSource) else source
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelError(f"{path}: cannot load a tokenizer ({type(exc).__name__}: {str(exc)[:200]})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def add_new_tokens(tokenizer, tokens: list[str]) -> None:
    """model.new_special_tokens: added as special tokens (never split, kept when decoding chat turns)."""
    if tokens:
        tokenizer.add_tokens(list(tokens), special_tokens=True)


def new_token_ids(tokenizer, tokens: list[str]) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def fit_vocabulary(model, tokenizer, mean_init: bool = True) -> None:
    """Grow the embedding (and output) matrices to the tokenizer's size, if smaller; new rows start at the mean
    of the old ones (a neutral start)."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=mean_init)


GPU_KERNELS = {"model.attention: flash_attention_2": ("flash_attn", "flash-attn"),
               "train.liger_kernel": ("liger_kernel", "liger-kernel")}


def check_kernels(attention: str, liger: bool) -> None:
    """FlashAttention and Liger kernels run on CUDA GPUs with their packages; say so before loading anything."""
    import importlib.util

    asked = {"model.attention: flash_attention_2": attention == "flash_attention_2", "train.liger_kernel": liger}
    for key, (module, package) in GPU_KERNELS.items():
        if not asked[key]:
            continue
        if not torch.cuda.is_available():
            raise ConfigError(f"{key} needs a CUDA GPU and none is visible. hint: remove it on this machine "
                              "(sdpa attention and the default kernels are used)")
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"{key} needs the {package} package. hint: pip install {package}")


def quantization_problem() -> str | None:
    """Why 4/8-bit loading cannot work here, or None when it can (bitsandbytes on a CUDA GPU)."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        return ("needs the bitsandbytes package and a CUDA GPU. hint: pip install bitsandbytes on a machine with "
                "an NVIDIA GPU, or remove model.quantization_bit to train plain LoRA")
    if not torch.cuda.is_available():
        return ("bitsandbytes is installed but no CUDA GPU is visible, and TuneForge quantizes only on CUDA. "
                "hint: remove model.quantization_bit to train plain LoRA on this machine")
    return None


def quantization_config(cfg: ModelConfig, compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for model.quantization_bit, or None; a clear error where unsupported."""
    if not cfg.quantization_bit:
        return None
    problem = quantization_problem()
    if problem:
        from tuneforge.errors import ConfigError

        raise ConfigError(f"model.quantization_bit: {cfg.quantization_bit}-bit loading {problem}")
    from transformers import BitsAndBytesConfig

    if cfg.quantization_bit == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quantization_type,
                              bnb_4bit_use_double_quant=cfg.double_quantization,
                              bnb_4bit_compute_dtype=compute_dtype)


def load_model(source: ModelSource | str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
               reward: bool = False, quantization=None, attention: str = "auto"):
    """A causal LM, or with `reward` the same body with a one-output `score` head (reward models).
    `quantization` (a BitsAndBytesConfig) loads the weights in 4/8 bits on the current CUDA device;
    `attention` picks the attention kernel (model.attention)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = source.path if isinstance(source, ModelSource) else source
    extra = {} if attention == "auto" else {"attn_implementation": attention}
    if quantization is not None:
        extra.update(quantization_config=quantization, device_map={"": torch.cuda.current_device()})
    try:
        if reward:
            return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype,
                                                                      trust_remote_code=trust_remote_code, **extra)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, **extra)
        load_mixture_of_depths(model, path)  # a saved Mixture-of-Depths model: routed layers and their routers
        return model
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ModelError(f"{path}: this model needs its own Python code. hint: set model.trust_remote_code: "
                             "true only if you trust its author") from None
        raise ModelError(f"{path}: cannot load the model ({str(exc)[:300]})") from None
    except OSError as exc:
        raise ModelError(f"{path}: cannot load the model ({str(exc)[:300]})") from None
