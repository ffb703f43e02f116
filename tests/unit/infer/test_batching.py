"""Continuous batching: requests joining and leaving a running batch get exactly what `generate` gives each alone."""

from __future__ import annotations

import time

import pytest
import torch

from tests.conftest import build_family_model
from tuneforge.infer.batching import Batcher, QueueFull, Sampling


def collect(request, timeout=120):
    tokens = []
    while True:
        kind, value = request.events.get(timeout=timeout)
        if kind == "token":
            tokens.append(value)
        elif kind == "done":
            return tokens, value
        else:
            raise AssertionError(value)


def wait_until(condition, timeout=30):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def generate_alone(model, prompt, max_new_tokens, **kw):
    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=0, eos_token_id=None, **kw)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("kind", ["llama", "qwen3", "mistral", "gemma3_text"])
def test_staggered_requests_get_the_tokens_generate_gives_each_alone(kind, tokenizer):
    # gemma3 and mistral with a sliding window shorter than the sequences: the window must hold in the batch too
    extra = {"sliding_window": 16} if kind in ("gemma3_text", "mistral") else {}
    model = build_family_model(kind, len(tokenizer), seed=1, initializer_range=0.3, **extra)
    prompts = [tokenizer("hello world " * (3 * i + 1))["input_ids"] for i in range(6)]
    expected = [generate_alone(model, p, 24) for p in prompts]
    batcher = Batcher(model, 0, max_batch=4, max_queue=8)
    try:
        requests = []
        for prompt in prompts:  # arriving one after another while earlier ones decode
            requests.append(batcher.submit(prompt, Sampling(max_new_tokens=24), set()))
            time.sleep(0.02)
        got = [collect(r) for r in requests]
    finally:
        batcher.close()
    assert [tokens for tokens, _ in got] == expected and {reason for _, reason in got} == {"length"}
    assert batcher.largest_batch > 1 and len({len(p) for p in prompts}) == 6


def test_stop_tokens_cancellation_and_the_bounded_line(tokenizer):
    model = build_family_model("llama", len(tokenizer), seed=2, initializer_range=0.3)
    prompt = tokenizer("hello world")["input_ids"]
    free = generate_alone(model, prompt, 12)
    batcher = Batcher(model, 0, max_batch=1, max_queue=1)
    try:
        stopped = batcher.submit(prompt, Sampling(max_new_tokens=12), {free[5]})
        tokens, reason = collect(stopped)
        assert reason == "stop" and tokens == free[: free.index(free[5])]
        long = batcher.submit(prompt, Sampling(max_new_tokens=10_000), set())
        wait_until(lambda: batcher.active == 1 and batcher.waiting == 0 and long.tokens)  # long is decoding
        waiting = batcher.submit(prompt, Sampling(max_new_tokens=2), set())
        with pytest.raises(QueueFull):
            batcher.submit(prompt, Sampling(max_new_tokens=2), set())
        long.cancel()
        assert collect(long)[1] == "cancelled" and collect(waiting)[1] == "length"
    finally:
        batcher.close()


def test_sampling_settings_match_their_definitions(tokenizer):
    """Repetition penalty equals transformers' processor (through generate); presence/frequency penalties follow
    OpenAI's definition (logit - frequency * count - presence * [count > 0] over generated tokens), checked with a
    plain loop over full forward passes; a seed makes sampling repeatable whatever shares the batch."""
    model = build_family_model("llama", len(tokenizer), seed=4, initializer_range=0.3)
    prompt = tokenizer("the sea and the sky")["input_ids"]
    batcher = Batcher(model, 0, max_batch=4)
    try:
        penalised = collect(batcher.submit(prompt, Sampling(max_new_tokens=16, repetition_penalty=1.3), set()))[0]
        assert penalised == generate_alone(model, prompt, 16, repetition_penalty=1.3)

        tokens = []
        with torch.no_grad():
            for _ in range(16):
                logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0, -1]
                counts = torch.bincount(torch.tensor(tokens, dtype=torch.long), minlength=logits.numel()).float() \
                    if tokens else torch.zeros_like(logits)
                logits = logits - 0.7 * counts - 1.1 * (counts > 0).float()
                tokens.append(int(logits.argmax()))
        got = collect(batcher.submit(prompt, Sampling(max_new_tokens=16, presence_penalty=1.1,
                                                      frequency_penalty=0.7), set()))[0]
        assert got == tokens and got != generate_alone(model, prompt, 16)

        sampled = Sampling(max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=123)
        alone = collect(batcher.submit(prompt, sampled, set()))[0]
        crowd = [batcher.submit(prompt, Sampling(max_new_tokens=16, temperature=1.0), set()) for _ in range(2)]
        again = batcher.submit(prompt, sampled, set())
        assert collect(again)[0] == alone
        assert all(len(collect(r)[0]) == 16 for r in crowd)
    finally:
        batcher.close()
