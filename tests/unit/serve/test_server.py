"""The OpenAI-compatible server, driven by the official `openai` client against a live server on a loopback port."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import torch

from tests.conftest import build_family_model
from tests.unit.serve.live import live_server
from tuneforge.infer.engine import Engine, GenerationSettings

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

PROMPTS = ["Who are you?", "Name three colours.", "What is 2 + 2?", "Write a short poem about the sea.",
           "Translate 'good morning' into French.", "Tell me a fact about the moon.", "How do I boil an egg?",
           "Describe a cat in one line."]


@pytest.fixture(scope="module")
def engine(tokenizer):
    """A tiny random Qwen2-style model with the ChatML template; <|im_end|> stops. Its weights are drawn wider than
    usual (std 0.3) so that greedy answers differ from prompt to prompt instead of all being newlines."""
    model = build_family_model("qwen2", len(tokenizer), seed=3, initializer_range=0.3)
    return Engine(model, tokenizer, ["<|im_end|>"], "tiny qwen2")


def client(url, key="none", **kw):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, **kw)


def ask(text):
    return [{"role": "user", "content": text}]


def reference(engine, text, max_tokens):
    """The answer of a plain `generate` call (greedy), as token ids, ended by a stop token or by the limit."""
    ids = torch.tensor([engine.prompt_ids(ask(text))])
    out = engine.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                **engine._generate_kwargs(GenerationSettings(max_new_tokens=max_tokens)))
    new = out[0, ids.shape[1]:].tolist()
    stop = next((k for k, t in enumerate(new) if t in engine.stop_ids), None)
    return engine.tokenizer.decode(new[:stop] if stop is not None else new, skip_special_tokens=True)


def test_models_chat_stream_and_usage_match_plain_generation(engine):
    with live_server(engine) as (url, _):
        c = client(url)
        assert [m.id for m in c.models.list().data] == ["tiny"]
        assert httpx.get(url + "/health").json()["status"] == "ok"
        expected = reference(engine, PROMPTS[1], 24)
        reply = c.chat.completions.create(model="tiny", messages=ask(PROMPTS[1]), temperature=0, max_tokens=24)
        choice = reply.choices[0]
        assert choice.message.content == expected and choice.message.role == "assistant"
        assert choice.finish_reason in ("stop", "length")
        assert reply.usage.prompt_tokens == len(engine.prompt_ids(ask(PROMPTS[1])))
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
        chunks = list(c.chat.completions.create(model="tiny", messages=ask(PROMPTS[1]), temperature=0, max_tokens=24,
                                                stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == expected
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == choice.finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
        # the raw stream is server-sent events ending with [DONE]
        raw = httpx.post(url + "/v1/chat/completions", json={"messages": ask("hi"), "stream": True, "max_tokens": 3})
        assert raw.headers["content-type"].startswith("text/event-stream")
        assert raw.text.rstrip().endswith("data: [DONE]")


def test_max_tokens_stop_strings_n_and_seed(engine):
    with live_server(engine) as (url, _):
        c = client(url)
        long = c.chat.completions.create(model="tiny", messages=ask(PROMPTS[3]), temperature=0, max_tokens=20)
        text = long.choices[0].message.content
        assert long.choices[0].finish_reason == "length" and long.usage.completion_tokens == 20
        stop = text[len(text) // 2: len(text) // 2 + 3]
        assert stop.strip(), f"answer too uniform for a stop-string test: {text!r}"
        cut = c.chat.completions.create(model="tiny", messages=ask(PROMPTS[3]), temperature=0, max_tokens=20,
                                        stop=[stop])
        assert cut.choices[0].message.content == text[: text.find(stop)]
        assert cut.choices[0].finish_reason == "stop"
        streamed = c.chat.completions.create(model="tiny", messages=ask(PROMPTS[3]), temperature=0, max_tokens=20,
                                             stop=stop, stream=True)
        assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == text[: text.find(stop)]
        sampled = dict(model="tiny", messages=ask(PROMPTS[0]), temperature=1.0, max_tokens=12, n=3, seed=7)
        first, again = c.chat.completions.create(**sampled), c.chat.completions.create(**sampled)
        answers = [ch.message.content for ch in first.choices]
        assert [ch.index for ch in first.choices] == [0, 1, 2]
        assert answers == [ch.message.content for ch in again.choices]  # a seed makes sampling repeatable
        assert len(set(answers)) > 1  # and each of the n answers has its own
        assert 3 <= first.usage.completion_tokens <= 3 * 12  # counted over the n answers


def test_text_completions(engine):
    with live_server(engine) as (url, _):
        c = client(url)
        prompt = "The capital of France is"
        ids = torch.tensor([engine.tokenizer(prompt)["input_ids"]])
        out = engine.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                                    do_sample=False, eos_token_id=engine.stop_ids, pad_token_id=0)
        expected = engine.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        reply = c.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0)
        assert reply.choices[0].text == expected and reply.object == "text_completion"
        chunks = list(c.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, stream=True))
        assert "".join(ch.choices[0].text for ch in chunks) == expected


def test_eight_concurrent_streaming_clients_get_the_sequential_greedy_answers(engine):
    with live_server(engine, max_batch=8) as (url, app):
        c = client(url)
        sequential = [c.chat.completions.create(model="tiny", messages=ask(p), temperature=0, max_tokens=32)
                      .choices[0].message.content for p in PROMPTS]
        assert app.state.batcher.largest_batch == 1
        results: dict[int, str] = {}
        barrier = threading.Barrier(len(PROMPTS))

        def stream(i):
            barrier.wait()
            parts = c.chat.completions.create(model="tiny", messages=ask(PROMPTS[i]), temperature=0, max_tokens=32,
                                              stream=True)
            results[i] = "".join(ch.choices[0].delta.content or "" for ch in parts)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert [results.get(i) for i in range(len(PROMPTS))] == sequential
        assert app.state.batcher.largest_batch > 1  # they really shared decoding steps
        assert len(set(sequential)) > 4


def test_a_request_joining_does_not_wait_for_running_ones_and_a_gone_client_frees_its_slot(engine):
    with live_server(engine, max_batch=2) as (url, app):
        c = client(url)
        batcher = app.state.batcher
        long = c.chat.completions.create(model="tiny", messages=ask(PROMPTS[3]), temperature=0, max_tokens=200,
                                         stream=True)
        next(iter(long))  # the long answer is being decoded
        started = time.perf_counter()
        short = c.chat.completions.create(model="tiny", messages=ask(PROMPTS[0]), temperature=0, max_tokens=4)
        joined_after = time.perf_counter() - started
        assert short.usage.completion_tokens <= 4
        assert batcher.largest_batch == 2  # decoded beside the long one, not after it
        long.close()  # the client goes away mid-stream
        deadline = time.time() + 10
        while batcher.active and time.time() < deadline:
            time.sleep(0.05)
        assert batcher.active == 0, "the disconnected stream still holds its slot"
        assert joined_after < 30


def test_a_full_queue_answers_503_with_retry_after(engine):
    with live_server(engine, max_batch=1, max_queue=0) as (url, app):
        c = client(url)
        holder = c.chat.completions.create(model="tiny", messages=ask(PROMPTS[3]), temperature=0, max_tokens=200,
                                           stream=True)
        next(iter(holder))
        response = httpx.post(url + "/v1/chat/completions", json={"messages": ask("hi"), "max_tokens": 2})
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert response.json()["error"]["code"] == "queue_full"
        with pytest.raises(openai.InternalServerError):
            c.chat.completions.create(model="tiny", messages=ask("hi"), max_tokens=2)
        holder.close()


def test_bad_requests_get_400_naming_the_field_and_the_key_is_checked(engine):
    with live_server(engine, api_key="s3cret", max_body=20_000) as (url, _):
        with pytest.raises(openai.AuthenticationError) as error:
            client(url, "wrong").models.list()
        assert error.value.status_code == 401 and error.value.body["code"] == "invalid_api_key"
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/health").status_code == 200  # health needs no key
        c = client(url, "s3cret")
        assert c.models.list().data[0].id == "tiny"
        cases = [({"temperature": 5}, "temperature"), ({"n": 0}, "n"), ({"max_tokens": 0}, "max_tokens"),
                 ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
                 ({"messages": []}, "messages"), ({"logprobs": True}, None), ({"stop": ["a", "b", "c", "d", "e"]},
                                                                              "stop"),
                 ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice":
                   {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
                 ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
                  "messages[0].content")]
        for change, param in cases:
            body = {"model": "tiny", "messages": ask("hi"), "max_tokens": 2, **change}
            with pytest.raises(openai.BadRequestError) as error:
                c.chat.completions.create(**body)
            assert error.value.status_code == 400 and error.value.body["type"] == "invalid_request_error", change
            if param:
                assert error.value.body["param"] == param, (change, error.value.body)
            assert error.value.body["message"], change
        missing = httpx.post(url + "/v1/chat/completions", json={"model": "tiny"},
                             headers={"Authorization": "Bearer s3cret"})
        assert missing.status_code == 400 and missing.json()["error"]["message"] == "messages is required"
        broken = httpx.post(url + "/v1/chat/completions", content=b"{not json",
                            headers={"Authorization": "Bearer s3cret", "Content-Type": "application/json"})
        assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]
        huge = httpx.post(url + "/v1/chat/completions", json={"messages": ask("x" * 50_000)},
                          headers={"Authorization": "Bearer s3cret"})
        assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"


def test_a_prompt_longer_than_the_context_is_a_400_not_a_crash(engine):
    context = engine.context_length
    with live_server(engine, max_body=10_000_000) as (url, _):
        c = client(url)
        with pytest.raises(openai.BadRequestError) as error:
            c.chat.completions.create(model="tiny", messages=ask("hello world " * context))
        assert error.value.body["code"] == "context_length_exceeded" and error.value.body["param"] == "messages"
        with pytest.raises(openai.BadRequestError) as error:
            c.chat.completions.create(model="tiny", messages=ask("hi"), max_tokens=context)
        assert error.value.body["param"] == "max_tokens" and "does not fit" in error.value.body["message"]
        with pytest.raises(openai.BadRequestError) as error:
            c.completions.create(model="tiny", prompt="hello world " * context)
        assert error.value.body["param"] == "prompt"
        ok = c.chat.completions.create(model="tiny", messages=ask("hi"), max_tokens=3, temperature=0)
        assert ok.usage.completion_tokens <= 3  # the server is still fine


# --- tool calls: a tiny model trained on tool-call data answers the official client's function-calling loop -------
WEATHER_TOOL = {"name": "get_weather", "description": "Current weather of a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def tool_run(tmp_path_factory, tiny_model_dir):
    """A full fine-tune of the tiny model on sharegpt tool-call rows (glaive_toolcall's layout: a tools column,
    function_call and observation turns) until it answers them by heart."""
    from tuneforge.train.run import train

    root = tmp_path_factory.mktemp("tools")
    rows = []
    for city, degrees in (("Paris", 22), ("Oslo", 3)):
        rows.append({"conversations": [
            {"from": "human", "value": f"What is the weather in {city}?"},
            {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": city}})},
            {"from": "observation", "value": json.dumps({"temperature": degrees})},
            {"from": "gpt", "value": f"It is {degrees} degrees in {city}."}],
            "tools": json.dumps([WEATHER_TOOL])})
    (root / "weather.json").write_text(json.dumps(rows * 4), encoding="utf-8")
    (root / "dataset_info.json").write_text(json.dumps({"weather": {
        "file_name": "weather.json", "formatting": "sharegpt", "columns": {"messages": "conversations",
                                                                           "tools": "tools"}}}), encoding="utf-8")
    config = {"model": {"name_or_path": str(tiny_model_dir), "cache_dir": str(root / "cache")},
              "data": {"dataset": "weather", "dataset_dir": str(root), "cutoff_len": 256},
              "method": {"stage": "sft", "adapter": {"type": "full"}},
              "train": {"max_steps": 150, "batch_size": 4, "learning_rate": 1e-2, "save_steps": 1000,
                        "warmup_ratio": 0.0, "logging_steps": 50},
              "output": {"run_dir": str(root / "run")}}
    return train(config).run_dir


def test_tool_call_round_trip_with_the_official_client(tool_run):
    engine = Engine.load(str(tool_run))
    tools = [{"type": "function", "function": WEATHER_TOOL}]
    with live_server(engine) as (url, _):
        c = client(url)
        messages = [{"role": "user", "content": "What is the weather in Paris?"}]
        first = c.chat.completions.create(model="tiny", messages=messages, tools=tools, temperature=0, max_tokens=60)
        call = first.choices[0].message.tool_calls[0]
        assert first.choices[0].finish_reason == "tool_calls" and first.choices[0].message.content is None
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
        messages += [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 22})}]
        second = c.chat.completions.create(model="tiny", messages=messages, tools=tools, temperature=0, max_tokens=40)
        assert second.choices[0].message.content == "It is 22 degrees in Paris."
        assert second.choices[0].finish_reason == "stop"
        # streaming: the call arrives as one tool_calls delta
        chunks = list(c.chat.completions.create(model="tiny", messages=messages[:1], tools=tools, temperature=0,
                                                max_tokens=60, stream=True))
        deltas = [ch.choices[0].delta.tool_calls for ch in chunks if ch.choices and ch.choices[0].delta.tool_calls]
        assert len(deltas) == 1 and deltas[0][0].function.name == "get_weather"
        assert json.loads(deltas[0][0].function.arguments) == {"city": "Paris"}
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        # without tools offered, the same text is an ordinary answer
        plain = c.chat.completions.create(model="tiny", messages=messages[:1], temperature=0, max_tokens=60,
                                          tools=tools, tool_choice="none")
        assert plain.choices[0].message.tool_calls is None


def test_reward_model_runs_are_scored_on_v1_score(tmp_path, tiny_model_dir):
    from tests.conftest import REPO
    from tuneforge.model.reward import RewardModel
    from tuneforge.train.run import train

    run = train({"model": {"name_or_path": str(tiny_model_dir), "cache_dir": str(tmp_path / "cache")},
                 "data": {"dataset": "dpo_en_demo", "dataset_dir": str(REPO / "data"), "max_samples": 8},
                 "method": {"stage": "rm"}, "train": {"max_steps": 1, "batch_size": 4},
                 "output": {"run_dir": str(tmp_path / "rm")}}).run_dir
    rm = RewardModel.from_run(run)
    conversations = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
                     [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]]
    with live_server(rm) as (url, _):
        scored = httpx.post(url + "/v1/score", json={"messages": conversations}).json()
        assert [d["score"] for d in scored["data"]] == pytest.approx(rm.score(conversations), rel=1e-5)
        texts = httpx.post(url + "/v1/score", json={"messages": ["Hello!", "Go away."]}).json()
        assert len(texts["data"]) == 2
        refused = httpx.post(url + "/v1/chat/completions", json={"messages": ask("hi")})
        assert refused.status_code == 400 and "/v1/score" in refused.json()["error"]["message"]


def test_v1_score_on_a_chat_model_is_refused(engine):
    with live_server(engine) as (url, _):
        response = httpx.post(url + "/v1/score", json={"messages": ["text"]})
        assert response.status_code == 400 and response.json()["error"]["code"] == "not_a_reward_model"


def test_a_chunked_body_over_the_limit_is_refused_while_read(engine):
    with live_server(engine, max_body=10_000) as (url, _):
        def chunks():
            yield b'{"messages": [{"role": "user", "content": "'
            for _ in range(40):
                yield b"x" * 1000
            yield b'"}]}'

        response = httpx.post(url + "/v1/chat/completions", content=chunks(),
                              headers={"Content-Type": "application/json"})
        assert "content-length" not in response.request.headers
        assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_the_vllm_backend_serves_the_same_endpoints(tiny_run, monkeypatch):
    """vLLM needs a GPU; a stand-in `vllm` module records what the server asks of it and answers with fixed tokens,
    so that the glue (sampling parameters, LoRA request, grouping, stop tokens, the OpenAI responses) is tested."""
    import sys
    import types

    calls = []

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    class LLM:
        def __init__(self, **kw):
            self.kw = kw

        def generate(self, prompts, params, lora_request=None, use_tqdm=False):
            calls.append((prompts, params, lora_request))
            outs = []
            for prompt, p in zip(prompts, params):
                tokens = prompt["prompt_token_ids"][-3:] + p.kw["stop_token_ids"][:1] + [5, 6]
                outs.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=tokens,
                                                                                 finish_reason="stop")]))
            return outs

    class LoRARequest:
        def __init__(self, name, number, path):
            self.path = path

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = LoRARequest
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.lora", lora)
    monkeypatch.setitem(sys.modules, "vllm.lora.request", request)
    from tuneforge.serve import load_target

    engine = load_target(str(tiny_run), backend="vllm")
    assert type(engine).__name__ == "VLLMEngine" and engine.lora.path.endswith("adapter")
    with live_server(engine) as (url, _):
        c = client(url)
        reply = c.chat.completions.create(model="tiny", messages=ask("hi"), temperature=0.5, top_p=0.9, seed=11,
                                          presence_penalty=0.5, max_tokens=8)
        prompt = engine.prompt_ids(ask("hi"))
        assert reply.choices[0].message.content == engine.tokenizer.decode(prompt[-3:], skip_special_tokens=True)
        assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens == 3
        params = calls[-1][1][0].kw
        assert params["temperature"] == 0.5 and params["top_p"] == 0.9 and params["seed"] == 11
        assert params["presence_penalty"] == 0.5 and params["max_tokens"] == 8
        assert params["stop_token_ids"] == sorted(engine.stop_ids)
        streamed = c.chat.completions.create(model="tiny", messages=ask("hi"), max_tokens=8, stream=True)
        assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == reply.choices[0].message.content
        many = c.chat.completions.create(model="tiny", messages=ask("hi"), max_tokens=8, n=3, seed=1)
        assert len(many.choices) == 3 and [p.kw["seed"] for p in calls[-1][1]] == [1, 2, 3]  # one group of 3


def test_a_client_that_gives_up_on_a_non_streamed_answer_frees_its_slot(tokenizer):
    model = build_family_model("qwen2", len(tokenizer), seed=3, initializer_range=0.3)
    hook = model.register_forward_pre_hook(lambda *_: time.sleep(0.02))  # about 50 steps a second at most
    engine = Engine(model, tokenizer, ["<|im_end|>"], "slow tiny qwen2")
    try:
        with live_server(engine) as (url, app):
            with pytest.raises(httpx.TimeoutException):
                httpx.post(url + "/v1/chat/completions", timeout=1.0,
                           json={"messages": ask(PROMPTS[3]), "max_tokens": 200, "temperature": 0})
            started = time.time()
            while app.state.batcher.active and time.time() - started < 3:
                time.sleep(0.05)
            assert app.state.batcher.active == 0  # long before its 200 tokens (4 s or more) would be done
    finally:
        hook.remove()
