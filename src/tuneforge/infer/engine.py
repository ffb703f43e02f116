"""One inference engine for chat, the CLI, the API and the web UI: a model, its tokenizer and its stop tokens.

Loads a run directory (base model + adapter, unmerged), a merged model folder, or any model TuneForge can load.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from pydantic import BaseModel, ConfigDict, Field

from tuneforge.config import ModelConfig
from tuneforge.errors import ModelError
from tuneforge.data.template import resolve_template, stop_token_ids
from tuneforge.model.adapters import ADAPTED_BASE, load_adapted_base
from tuneforge.model.loader import fit_vocabulary, load_model, load_tokenizer, resolve_dtype, resolve_model
from tuneforge.rundir import META, open_run
from tuneforge.train.losses import causal_lm_loss_sum, next_token_mask, next_token_targets


class GenerationSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int = Field(256, ge=1, description="Most tokens to generate per answer.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature; 0 picks the likeliest token (greedy).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: keep the smallest set of tokens with this mass.")
    top_k: int = Field(0, ge=0, description="Sample among the k likeliest tokens (0: no limit).")
    repetition_penalty: float = Field(1.0, gt=0, description="Above 1 discourages repeating tokens.")


def run_base_model(run) -> str:
    """The base model folder a run was trained on; converted or downloaded again where the cache lost it."""
    base = run.meta().get("base_model")
    if base and Path(base).is_dir():
        return base
    return resolve_model(run.config().model).path


def load_run_weights(run, reward: bool = False):
    """The trained model of a run directory and its tokenizer: base + adapter/ (not merged), or model/.
    `reward` loads the body with its one-output score head (runs of stage rm)."""
    cfg = run.config()
    weights = run.weights
    if not weights.is_dir():
        raise ModelError(f"{run.path}: no adapter/ or model/ folder; the run has not saved weights yet")
    base = run_base_model(run)
    tokenizer = load_tokenizer(str(weights), cfg.model.trust_remote_code)
    dtype = resolve_dtype(cfg.model.dtype)
    if weights.name == "adapter":
        from peft import PeftModel

        model = load_model(base, dtype, cfg.model.trust_remote_code, reward=reward)
        fit_vocabulary(model, tokenizer, mean_init=False)  # model.new_special_tokens: the adapter holds their rows
        if (run.path / ADAPTED_BASE).is_file():  # LoftQ: the quantized weights the adapter was trained on
            load_adapted_base(model, run.path / ADAPTED_BASE)
        return PeftModel.from_pretrained(model, str(weights)), tokenizer
    return load_model(str(weights), dtype, cfg.model.trust_remote_code, reward=reward), tokenizer


class Engine:
    def __init__(self, model, tokenizer, stop: list[str], description: str = "", default_system: str | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.description = description
        self.default_system = default_system  # the system prompt the run was trained with, if it set one
        self.stop = list(stop)
        self.adapter_off = False
        self.stop_ids = stop_token_ids(tokenizer, stop) or [tokenizer.eos_token_id]

    @classmethod
    def load(cls, target: str, template: str = "auto", backend: str = "hf"):
        """A run directory (it holds run.json), or a model name/path as `model.name_or_path` accepts it.
        backend "vllm" serves the same model with vLLM (GPU machines) behind the same methods."""
        is_run = (Path(target) / META).is_file()
        engine = cls.from_run(target) if is_run else cls.from_model(ModelConfig(name_or_path=target, template=template))
        if backend == "hf":
            return engine
        if backend != "vllm":
            raise ModelError(f"backend {backend!r}: expected hf or vllm")
        from tuneforge.infer.vllm_backend import VLLMEngine

        run = open_run(target) if is_run else None
        adapter = str(run.weights) if run and run.weights.name == "adapter" else None
        if adapter and (run.path / ADAPTED_BASE).is_file():
            raise ModelError(f"{target}: a LoftQ run, whose adapter applies to quantized base weights that vLLM "
                             f"would not load; merge it first (`tuneforge export {target} --out DIR`) and serve DIR")
        model_path = (run_base_model(run) if adapter else str(run.weights)) if run else engine.source_path
        return VLLMEngine(engine, model_path, adapter)

    @classmethod
    def from_model(cls, cfg: ModelConfig) -> "Engine":
        source = resolve_model(cfg)
        tokenizer = load_tokenizer(source, cfg.trust_remote_code)
        chat_template, _ = resolve_template(cfg.template, tokenizer)
        tokenizer.chat_template = chat_template.jinja
        model = load_model(source, resolve_dtype(cfg.dtype), cfg.trust_remote_code).to(_device())
        engine = cls(model, tokenizer, list(chat_template.stop), source.description)
        engine.source_path = source.path
        return engine

    @classmethod
    def from_run(cls, run_dir: str | Path) -> "Engine":
        run = open_run(run_dir)
        cfg, meta = run.config(), run.meta()
        if meta.get("stage") == "rm":
            raise ModelError(f"{run.path} is a reward model: it scores answers instead of writing them. "
                             f"hint: tuneforge predict {run.path} --data DATA")
        model, tokenizer = load_run_weights(run)
        stop = meta.get("stop") or [tokenizer.eos_token]
        return cls(model.to(_device()), tokenizer, stop,
                   f"run {run.path} ({cfg.model.name_or_path} + {run.weights.name})",
                   default_system=meta.get("default_system"))

    def without_adapter(self) -> "Engine":
        """The base model of a LoRA run: the same weights with the adapter switched off (use inside `active()`)."""
        base = Engine(self.model, self.tokenizer, self.stop, "base model (adapter off)", self.default_system)
        base.adapter_off = True
        return base

    @contextlib.contextmanager
    def active(self):
        """Context in which this engine's model is what it says it is (adapter off for `without_adapter`)."""
        if self.adapter_off:
            with self.model.disable_adapter():
                yield self
        else:
            yield self

    def with_system(self, messages: list[dict]) -> list[dict]:
        if self.default_system and (not messages or messages[0]["role"] != "system"):
            return [{"role": "system", "content": self.default_system}] + messages
        return messages

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation followed by the template's generation prompt."""
        return self.tokenizer.apply_chat_template(self.with_system(messages), add_generation_prompt=True,
                                                  return_dict=False)

    def _inputs(self, messages: list[dict]) -> dict[str, torch.Tensor]:
        ids = torch.tensor([self.prompt_ids(messages)], device=self.model.device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

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
        return self.generate_batch([messages], settings)[0].text

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

    @torch.inference_mode()
    def generate_batch(self, conversations: list[list[dict]], settings: GenerationSettings | None = None,
                       batch_size: int = 8, progress: bool = False) -> list[Generation]:
        """Answers for many conversations, batched by similar prompt length (left padding), in input order."""
        settings = settings or GenerationSettings()
        prompts = [self.prompt_ids(c) for c in conversations]
        results: list[Generation | None] = [None] * len(prompts)
        for batch in _length_batches(prompts, batch_size, progress, "generating"):
            width = max(len(prompts[i]) for i in batch)
            pad = self.tokenizer.pad_token_id
            ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in batch])
            mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in batch])
            out = self.model.generate(input_ids=ids.to(self.model.device), attention_mask=mask.to(self.model.device),
                                      **self._generate_kwargs(settings))
            for row, i in enumerate(batch):
                new = out[row, width:].tolist()
                ended = any(t in self.stop_ids for t in new)
                if ended:
                    new = new[: next(k for k, t in enumerate(new) if t in self.stop_ids)]
                text = self.tokenizer.decode(new, skip_special_tokens=True).strip()
                results[i] = Generation(text, hit_limit=not ended and len(new) >= settings.max_new_tokens)
        return results

    def label_ids(self, labels: list[str]) -> list[list[int]]:
        """Token ids of each label as the model would write it right after the generation prompt."""
        probe = self.tokenizer.apply_chat_template(self.with_system([{"role": "user", "content": "x"}]),
                                                   add_generation_prompt=True, tokenize=False)
        prefix = self.tokenizer(probe, add_special_tokens=False)["input_ids"]
        out = []
        for label in labels:
            joined = self.tokenizer(probe + label, add_special_tokens=False)["input_ids"]
            ids = joined[len(prefix):] if joined[: len(prefix)] == prefix else \
                self.tokenizer(label, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError(f"label {label!r} tokenizes to nothing")
            out.append(ids)
        return out

    @torch.inference_mode()
    def score_labels(self, conversations: list[list[dict]], labels: list[str], batch_size: int = 16,
                     progress: bool = False) -> list[list[float]]:
        """log P(label | prompt) for every conversation and candidate label: one forward pass per prompt
        when all labels are single tokens, else one per (prompt, label); logits only where labels are."""
        label_ids = self.label_ids(labels)
        prompts = [self.prompt_ids(c) for c in conversations]
        scores = [[0.0] * len(labels) for _ in prompts]
        single = all(len(ids) == 1 for ids in label_ids)
        for batch in _length_batches(prompts, batch_size, progress, "scoring"):
            if single:
                first = torch.tensor([ids[0] for ids in label_ids])
                logp = self._last_logprobs([prompts[i] for i in batch])  # (B, V)
                for row, i in enumerate(batch):
                    scores[i] = logp[row, first].tolist()
                continue
            for k, ids in enumerate(label_ids):
                sums = self._continuation_logprob([prompts[i] for i in batch], ids)
                for row, i in enumerate(batch):
                    scores[i][k] = sums[row]
        return scores

    def _padded(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.tensor([s + [self.tokenizer.pad_token_id] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        return ids.to(self.model.device), mask.to(self.model.device)

    def _last_logprobs(self, seqs: list[list[int]]) -> torch.Tensor:
        ids, mask = self._padded(seqs)
        last = (mask.sum(1) - 1).unsqueeze(1)  # (B, 1): the last real position of each right-padded row
        logits = self.model(input_ids=ids, attention_mask=mask, logits_to_keep=last).logits  # (B, 1, V)
        return torch.log_softmax(logits[:, 0].float(), dim=-1)

    def _continuation_logprob(self, prompts: list[list[int]], continuation: list[int]) -> list[float]:
        ids, mask = self._padded([p + continuation for p in prompts])
        keep = torch.zeros_like(mask, dtype=torch.bool)
        for row, p in enumerate(prompts):
            keep[row, len(p) - 1: len(p) - 1 + len(continuation)] = True  # positions predicting the label
        logits = self.model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits  # (B * C, V)
        targets = torch.tensor(continuation * len(prompts), device=logits.device)
        logp = torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None])
        return logp.view(len(prompts), len(continuation)).sum(1).tolist()

    @torch.inference_mode()
    def answer_nll(self, conversations: list[list[dict]], batch_size: int = 8) -> tuple[float, int]:
        """Summed negative log-likelihood of the answers of full conversations (answer tokens only), and their count:
        perplexity = exp(nll / count). Conversations are rendered and masked exactly as in training."""
        from tuneforge.data.convert import Example
        from tuneforge.data.encode import Overlong, encode_sft
        from tuneforge.data.template import ChatTemplate

        template = ChatTemplate("engine", self.tokenizer.chat_template)
        encoded = []
        for c in conversations:
            try:
                encoded.append(encode_sft(Example("eval", self.with_system(c)), self.tokenizer, template, 2048))
            except Overlong:
                continue
        total, count = 0.0, 0
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start: start + batch_size]
            ids, mask = self._padded([e.input_ids for e in chunk])
            labels = torch.full_like(ids, -100)
            for row, e in enumerate(chunk):
                labels[row, : len(e.labels)] = torch.tensor(e.labels)
            keep = next_token_mask(labels)
            logits = self.model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
            targets = next_token_targets(labels, keep)
            total += causal_lm_loss_sum(logits, targets).item()
            count += targets.numel()
        return total, count


@dataclass
class Generation:
    text: str
    hit_limit: bool = False  # stopped by max_new_tokens rather than by a stop token


def _length_batches(seqs: list[list[int]], batch_size: int, progress: bool, what: str):
    """Index batches of similar length (less padding), longest first so memory problems show at once."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        return tqdm(batches, desc=what, unit="batch")
    return batches


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
