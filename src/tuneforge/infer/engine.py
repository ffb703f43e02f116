"""One inference engine for chat, the CLI, the API and the web UI: a model, its tokenizer and its stop tokens.

Loads a run directory (base model + adapter, unmerged), a merged model folder, or any model TuneForge can load.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from pydantic import BaseModel, ConfigDict, Field

from tuneforge.config import ModelConfig
from tuneforge.data.collate import pad_left, pad_right
from tuneforge.data.convert import Example, with_system
from tuneforge.data.encode import Unusable, encode_sft
from tuneforge.data.template import ChatTemplate, resolve_template, stop_token_ids
from tuneforge.data.tools import calls_as_tool_calls, tools_into_system, uses_tools
from tuneforge.errors import ModelError
from tuneforge.model.adapters import ADAPTED_BASE
from tuneforge.model.loader import load_model, load_tokenizer, resolve_dtype, resolve_model
from tuneforge.model.runs import load_run_weights, run_base_model
from tuneforge.model.depth import CONFIG_KEY as MIXTURE_OF_DEPTHS
from tuneforge.model.scoring import (causal_lm_loss_sum, continuations_after_shared_prompts, supervised_logits,
                                     token_logprobs)
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
        self.stop = list(stop)
        self.adapter_off = False
        self.stop_ids = stop_token_ids(tokenizer, stop) or [tokenizer.eos_token_id]

    @classmethod
    def load(cls, target: str, template: str = "auto", backend: str = "hf", adapters: list[str] = ()):
        """A run directory (it holds run.json), or a model name/path as `model.name_or_path` accepts it, with
        `adapters` (run directories or adapter folders) merged on top. backend "vllm" serves the same model with
        vLLM (GPU machines) behind the same methods."""
        is_run = (Path(target) / META).is_file()
        if is_run and adapters:
            raise ModelError(f"{target} is a run directory: it brings its own adapter; --adapter goes with a base "
                             "model")
        engine = cls.from_run(target) if is_run else cls.from_model(
            ModelConfig(name_or_path=target, template=template, adapters=list(adapters)))
        if backend == "hf":
            return engine
        if backend != "vllm":
            raise ModelError(f"backend {backend!r}: expected hf or vllm")
        from tuneforge.infer.vllm_backend import VLLMEngine

        run = open_run(target) if is_run else None
        if adapters or (run and run.config().model.adapters):
            raise ModelError(f"{target}: adapters stacked on the base are merged for vLLM only after export; run "
                             "`tuneforge export` and serve the exported folder with --backend vllm")
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
        model = load_model(source, resolve_dtype(cfg.dtype), cfg.trust_remote_code)
        if cfg.adapters:  # base model + saved adapters, merged in order (LLaMA-Factory's adapter_name_or_path)
            from tuneforge.model.stacking import adapter_folders, merge_adapters

            model = merge_adapters(model, adapter_folders(cfg.adapters, cfg.name_or_path))
        model = model.to(_device())
        description = source.description + (f" + {len(cfg.adapters)} adapter(s)" if cfg.adapters else "")
        engine = cls(model, tokenizer, list(chat_template.stop), description)
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

    def with_default_system(self, system: str | None) -> "Engine":
        """The same model and settings, with another system prompt for conversations that carry none (None: none)."""
        other = copy.copy(self)
        other.default_system = system
        return other

    @contextlib.contextmanager
    def active(self):
        """Context in which this engine's model is what it says it is (adapter off for `without_adapter`)."""
        if self.adapter_off:
            with self.model.disable_adapter():
                yield self
        else:
            yield self

    def with_system(self, messages: list[dict]) -> list[dict]:
        return with_system(messages, self.default_system)

    def prompt_ids(self, messages: list[dict], tools: list | None = None) -> list[int]:
        """Token ids of a conversation followed by the template's generation prompt; `tools` (function schemas) are
        written in the tool format the run was trained with (see tuneforge.data.tools)."""
        messages = self.with_system(messages)
        if tools and not uses_tools(self.tokenizer.chat_template):
            messages, tools = tools_into_system(messages, tools), None
        elif tools:  # the template writes calls in its own words (e.g. Qwen's <tool_call>)
            messages = calls_as_tool_calls(messages, tools)
        return self.tokenizer.apply_chat_template(messages, tools=tools or None, add_generation_prompt=True,
                                                  return_dict=False)

    @property
    def context_length(self) -> int:
        """Most tokens (prompt and answer) the model reads: its position limit."""
        config = self.model.config
        return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048)

    def batcher(self, max_batch: int = 8, max_queue: int = 64):
        """Continuous batching over this engine's model (the API server's generation loop)."""
        from tuneforge.infer.batching import Batcher

        return Batcher(self.model, self.tokenizer.pad_token_id, max_batch=max_batch, max_queue=max_queue)

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
            ids, mask = pad_left([prompts[i] for i in batch], self.tokenizer.pad_token_id)
            width = ids.shape[1]
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
        """Token ids of each label as the model writes it after the generation prompt, through the template's
        end-of-answer token: scored with it, "1" cannot beat "10" merely by being its first token."""
        probe = self.with_system([{"role": "user", "content": "x"}])
        prefix = self.prompt_ids(probe)
        out = []
        for label in labels:
            if not label:
                raise ValueError("a label must not be empty")
            full = self.tokenizer.apply_chat_template(probe + [{"role": "assistant", "content": label}],
                                                      return_dict=False)
            answer = full[len(prefix):] if full[: len(prefix)] == prefix else []
            end = next((k for k, t in enumerate(answer) if t in self.stop_ids), None)
            if end is None:  # the template writes no stop token after an answer: append the first one
                ids = self.tokenizer(label, add_special_tokens=False)["input_ids"] + self.stop_ids[:1]
            else:
                ids = answer[: end + 1]
            out.append(ids)
        return out

    @torch.inference_mode()
    def score_labels(self, conversations: list[list[dict]], labels: list[str], batch_size: int = 16,
                     progress: bool = False) -> list[list[float]]:
        """log P(label + end of answer | prompt) for every conversation and candidate label, logits only where label
        tokens are predicted. Each prompt is read once and its cache shared by the labels; Mixture-of-Depths
        models (no cache: routing sees the whole sequence) read every (prompt, label) row in full."""
        label_ids = self.label_ids(labels)
        prompts = [self.prompt_ids(c) for c in conversations]
        scores = [[0.0] * len(labels) for _ in prompts]
        shared = not getattr(self.model.config, MIXTURE_OF_DEPTHS, None)
        for batch in _length_batches(prompts, batch_size, progress, "scoring"):
            if shared:
                rows = continuations_after_shared_prompts(self.model, [prompts[i] for i in batch], label_ids,
                                                          self.tokenizer.pad_token_id).tolist()
            else:
                sums = self.continuation_logprobs([prompts[i] for i in batch for _ in label_ids],
                                                  [ids for _ in batch for ids in label_ids])
                rows = [sums[k * len(label_ids): (k + 1) * len(label_ids)] for k in range(len(batch))]
            for row, i in zip(rows, batch):
                scores[i] = row
        return scores

    def continuation_logprobs(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[float]:
        """Summed log-probabilities of each continuation after its prompt, from one batched forward pass."""
        ids, mask = pad_right([p + c for p, c in zip(prompts, continuations)], self.tokenizer.pad_token_id)
        labels = torch.full_like(ids, -100)
        for row, (p, c) in enumerate(zip(prompts, continuations)):
            labels[row, len(p): len(p) + len(c)] = torch.tensor(c)
        logits, targets = supervised_logits(self.model, labels.to(self.model.device),
                                            input_ids=ids.to(self.model.device), attention_mask=mask.to(self.model.device))
        logps = token_logprobs(logits, targets)  # (K,) row-major: each row's continuation in order
        return [part.sum().item() for part in logps.split([len(c) for c in continuations])]

    @torch.inference_mode()
    def answer_nll(self, conversations: list[list[dict]], batch_size: int = 8) -> tuple[float, int]:
        """Summed negative log-likelihood of the answers of full conversations (answer tokens only), and their count:
        perplexity = exp(nll / count). Conversations are rendered and masked exactly as in training."""
        template = ChatTemplate("engine", self.tokenizer.chat_template)
        encoded = []
        for c in conversations:
            try:
                encoded.append(encode_sft(Example("eval", self.with_system(c)), self.tokenizer, template, 2048))
            except Unusable:
                continue
        total, count = 0.0, 0
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start: start + batch_size]
            ids, mask = pad_right([e.input_ids for e in chunk], self.tokenizer.pad_token_id)
            labels, _ = pad_right([e.labels for e in chunk], -100)
            device = self.model.device
            logits, targets = supervised_logits(self.model, labels.to(device), input_ids=ids.to(device),
                                                attention_mask=mask.to(device))
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
