"""One inference engine for chat, the CLI, the API and the web UI: a model, its tokenizer and its stop tokens.

Loads a run directory (base model + adapter, unmerged), a merged model folder, or any model TuneForge can load.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator

import torch
from pydantic import BaseModel, ConfigDict, Field

from tuneforge.config import ModelConfig
from tuneforge.errors import ModelError
from tuneforge.data.template import resolve_template
from tuneforge.model.loader import load_model, load_tokenizer, resolve_dtype, resolve_model
from tuneforge.rundir import META, open_run


class GenerationSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int = Field(256, ge=1, description="Most tokens to generate per answer.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature; 0 picks the likeliest token (greedy).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: keep the smallest set of tokens with this mass.")
    top_k: int = Field(0, ge=0, description="Sample among the k likeliest tokens (0: no limit).")
    repetition_penalty: float = Field(1.0, gt=0, description="Above 1 discourages repeating tokens.")


class Engine:
    def __init__(self, model, tokenizer, stop: list[str], description: str = "", default_system: str | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.description = description
        self.default_system = default_system  # the system prompt the run was trained with, if it set one
        ids = [tokenizer.convert_tokens_to_ids(s) for s in stop]
        self.stop_ids = [i for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id] or [tokenizer.eos_token_id]

    @classmethod
    def load(cls, target: str, template: str = "auto") -> "Engine":
        """A run directory (it holds run.json), or a model name/path as `model.name_or_path` accepts it."""
        if (Path(target) / META).is_file():
            return cls.from_run(target)
        return cls.from_model(ModelConfig(name_or_path=target, template=template))

    @classmethod
    def from_model(cls, cfg: ModelConfig) -> "Engine":
        source = resolve_model(cfg)
        tokenizer = load_tokenizer(source, cfg.trust_remote_code)
        chat_template, _ = resolve_template(cfg.template, tokenizer)
        tokenizer.chat_template = chat_template.jinja
        model = load_model(source, resolve_dtype(cfg.dtype), cfg.trust_remote_code).to(_device())
        return cls(model, tokenizer, list(chat_template.stop), source.description)

    @classmethod
    def from_run(cls, run_dir: str | Path) -> "Engine":
        run = open_run(run_dir)
        cfg, meta = run.config(), run.meta()
        weights = run.weights
        if not weights.is_dir():
            raise ModelError(f"{run.path}: no adapter/ or model/ folder; the run has not saved weights yet")
        base = meta.get("base_model")
        if not base or not Path(base).is_dir():
            base = resolve_model(cfg.model).path  # e.g. the cache was cleared: convert or download again
        tokenizer = load_tokenizer(str(weights), cfg.model.trust_remote_code)
        dtype = resolve_dtype(cfg.model.dtype)
        if weights.name == "adapter":
            from peft import PeftModel

            model = PeftModel.from_pretrained(load_model(base, dtype, cfg.model.trust_remote_code), str(weights))
        else:
            model = load_model(str(weights), dtype, cfg.model.trust_remote_code)
        stop = meta.get("stop") or [tokenizer.eos_token]
        return cls(model.to(_device()), tokenizer, stop, f"run {run.path} ({cfg.model.name_or_path} + {weights.name})",
                   default_system=meta.get("default_system"))

    def _inputs(self, messages: list[dict]) -> dict[str, torch.Tensor]:
        if self.default_system and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.default_system}] + messages
        enc = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)
        return {k: v.to(self.model.device) for k, v in enc.items()}

    def _generate_kwargs(self, settings: GenerationSettings) -> dict:
        sampling = settings.temperature > 0
        kwargs = dict(max_new_tokens=settings.max_new_tokens, do_sample=sampling, eos_token_id=self.stop_ids,
                      pad_token_id=self.tokenizer.pad_token_id, repetition_penalty=settings.repetition_penalty)
        if sampling:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k or None)
        else:  # greedy: make sure no sampling default of the model's generation config leaks in
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    @torch.inference_mode()
    def chat(self, messages: list[dict], settings: GenerationSettings | None = None) -> str:
        settings = settings or GenerationSettings()
        inputs = self._inputs(messages)
        out = self.model.generate(**inputs, **self._generate_kwargs(settings))
        return self.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    def stream_chat(self, messages: list[dict], settings: GenerationSettings | None = None) -> Iterator[str]:
        from transformers import TextIteratorStreamer

        settings = settings or GenerationSettings()
        inputs = self._inputs(messages)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = {**inputs, **self._generate_kwargs(settings), "streamer": streamer}
        worker = threading.Thread(target=lambda: torch.inference_mode()(self.model.generate)(**kwargs), daemon=True)
        worker.start()
        yield from streamer
        worker.join()


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
