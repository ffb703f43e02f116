"""Optional vLLM backend (GPU machines): the same methods as `Engine`, served by vllm.LLM.

Chosen with `Engine.load(target, backend="vllm")` or `--backend vllm`. LoRA runs are served with vLLM's
LoRA support (the base weights plus the run's adapter folder), without merging.
"""

from __future__ import annotations

from typing import Iterator

from tuneforge.errors import ModelError
from tuneforge.infer.engine import Engine, Generation, GenerationSettings


class VLLMEngine:
    """Wraps an HF `Engine` (tokenizer, template, stop tokens, system prompt) and runs the model with vLLM."""

    def __init__(self, hf: Engine, model_path: str, adapter_path: str | None = None, trust_remote_code: bool = False):
        try:
            from vllm import LLM
        except ImportError:
            raise ModelError("backend vllm needs the vllm package (Linux with a CUDA GPU). hint: pip install vllm, "
                             "or use the default backend hf") from None
        self.hf, self.tokenizer, self.default_system, self.stop_ids = hf, hf.tokenizer, hf.default_system, hf.stop_ids
        self.description = f"{hf.description} (vLLM)"
        self.llm = LLM(model=model_path, tokenizer=model_path, enable_lora=adapter_path is not None,
                       trust_remote_code=trust_remote_code, max_lora_rank=256 if adapter_path else 16)
        self.lora = None
        if adapter_path:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest("run", 1, adapter_path)

    def prompt_ids(self, messages: list[dict], tools: list | None = None) -> list[int]:
        return self.hf.prompt_ids(messages, tools)

    @property
    def context_length(self) -> int:
        return self.hf.context_length

    def batcher(self, max_batch: int = 8, max_queue: int = 64):
        """The API server's generation loop: waiting requests go to vLLM in groups (vLLM batches them itself)."""
        from tuneforge.infer.batching import GroupBatcher

        return GroupBatcher(self._run_group, max_batch=max_batch, max_queue=max_queue)

    def _run_group(self, requests) -> list[tuple[list[int], str]]:
        from vllm import SamplingParams

        params = [SamplingParams(max_tokens=r.sampling.max_new_tokens, temperature=r.sampling.temperature,
                                 top_p=r.sampling.top_p, top_k=r.sampling.top_k or -1,
                                 repetition_penalty=r.sampling.repetition_penalty,
                                 presence_penalty=r.sampling.presence_penalty,
                                 frequency_penalty=r.sampling.frequency_penalty, seed=r.sampling.seed,
                                 stop_token_ids=sorted(r.stop_ids)) for r in requests]
        outputs = self.llm.generate([{"prompt_token_ids": r.prompt} for r in requests], params,
                                    lora_request=self.lora, use_tqdm=False)
        return [(list(o.outputs[0].token_ids), "length" if o.outputs[0].finish_reason == "length" else "stop")
                for o in outputs]

    def _params(self, settings: GenerationSettings, **extra):
        from vllm import SamplingParams

        return SamplingParams(max_tokens=settings.max_new_tokens, temperature=settings.temperature,
                              top_p=settings.top_p, top_k=settings.top_k or -1,
                              repetition_penalty=settings.repetition_penalty, stop_token_ids=self.stop_ids, **extra)

    def generate_batch(self, conversations: list[list[dict]], settings: GenerationSettings | None = None,
                       batch_size: int = 0, progress: bool = False) -> list[Generation]:
        settings = settings or GenerationSettings()
        prompts = [{"prompt_token_ids": self.prompt_ids(c)} for c in conversations]
        outputs = self.llm.generate(prompts, self._params(settings), lora_request=self.lora, use_tqdm=progress)
        return [Generation(o.outputs[0].text.strip(), hit_limit=o.outputs[0].finish_reason == "length")
                for o in outputs]

    def chat(self, messages: list[dict], settings: GenerationSettings | None = None) -> str:
        return self.generate_batch([messages], settings)[0].text

    def stream_chat(self, messages: list[dict], settings: GenerationSettings | None = None) -> Iterator[str]:
        yield self.chat(messages, settings)  # the offline LLM class answers whole; the API server streams

    def score_labels(self, conversations: list[list[dict]], labels: list[str], batch_size: int = 0,
                     progress: bool = False) -> list[list[float]]:
        """log P(label | prompt) from vLLM's prompt log-probabilities of prompt + label."""
        label_ids = self.hf.label_ids(labels)
        prompts = [self.prompt_ids(c) for c in conversations]
        requests = [{"prompt_token_ids": p + ids} for p in prompts for ids in label_ids]
        params = self._params(GenerationSettings(max_new_tokens=1), prompt_logprobs=0)
        outputs = self.llm.generate(requests, params, lora_request=self.lora, use_tqdm=progress)
        scores, k = [], 0
        for p in prompts:
            row = []
            for ids in label_ids:
                logprobs = outputs[k].prompt_logprobs
                row.append(sum(logprobs[len(p) + j][t].logprob for j, t in enumerate(ids)))
                k += 1
            scores.append(row)
        return scores
