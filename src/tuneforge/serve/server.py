"""`tuneforge api`: an OpenAI-compatible server (FastAPI + uvicorn) over the same Engine as chat and the web UI.

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, POST /v1/score (reward-model runs),
GET /health. Generation goes through one continuous batcher (tuneforge.infer.batching): requests from many clients
share decoding steps, a request joining while others decode does not wait for them, the waiting line is bounded
(503 with Retry-After when full) and a client that goes away frees its slot at the next step.
Errors have OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tuneforge.serve.schema import ChatRequest, CompletionRequest, Message, ScoreRequest
from tuneforge.data.convert import with_system
from tuneforge.data.tools import format_tool_calls, parse_tool_calls
from tuneforge.infer.batching import QueueFull, Sampling

log = logging.getLogger("tuneforge.serve")
DEFAULT_MAX_BODY = 4 * 1024 * 1024


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_body: int = DEFAULT_MAX_BODY
    max_batch: int = 8
    max_queue: int = 64


@dataclass
class _Choice:
    """One answer being generated: its tokens, the text decoded so far and how much of it has been sent."""
    request: object
    index: int
    text: str = ""
    sent: int = 0
    finish_reason: str | None = None
    tool_calls: list | None = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)


def create_app(engine, settings: ServerSettings, batcher=None):
    """The FastAPI application. `engine`: an Engine (chat/completions) or a RewardModel (score)."""
    from tuneforge.model.reward import RewardModel

    is_reward = isinstance(engine, RewardModel)
    if batcher is None and not is_reward:
        batcher = engine.batcher(settings.max_batch, settings.max_queue)
    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        if batcher is not None:
            batcher.close()

    app = FastAPI(title="TuneForge API", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(_Guard, limit=settings.max_body, api_key=settings.api_key)
    app.state.batcher = batcher
    created = int(time.time())

    # --- errors in OpenAI's shape -------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(_, error: ApiError):
        return JSONResponse(error_body(error.message, error.kind, error.param, error.code), error.status,
                            headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, error: RequestValidationError):
        first = error.errors()[0]
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = "".join(f"[{p}]" if p.isdigit() else (f".{p}" if i else p) for i, p in enumerate(location)) or None
        message = first.get("msg", "invalid request").removeprefix("Value error, ")
        if first.get("type") == "json_invalid":
            param, message = None, "the request body is not valid JSON"
        elif not location:
            message = "the request body must be a JSON object (Content-Type: application/json)"
        elif first.get("type") == "missing":
            message = f"{param} is required"
        elif param:
            message = f"{param}: {message}"
        return JSONResponse(error_body(message, "invalid_request_error", param, None), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, error: StarletteHTTPException):
        code = "request_too_large" if error.status_code == 413 else None
        return JSONResponse(error_body(str(error.detail), "invalid_request_error", None, code), error.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_, error: Exception):
        log.error("unexpected error", exc_info=error)  # the traceback for the operator, a message for the client
        return JSONResponse(error_body(f"internal error: {type(error).__name__}: {error}", "server_error"), 500)

    # --- endpoints ------------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name,
                "waiting": batcher.waiting if batcher is not None else 0}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": created,
                                            "owned_by": "tuneforge"}]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        _no_reward(is_reward)
        tools, tool_names = _offered_tools(body)
        try:
            messages = [_message(m, i) for i, m in enumerate(body.messages)]
            prompt = engine.prompt_ids(messages, tools)
        except ApiError:
            raise
        except Exception as error:  # the template refused the conversation (roles, order)
            raise ApiError(400, f"messages: the chat template cannot render this conversation: {error}",
                           "messages") from None
        choices = _submit(engine, batcher, prompt, body, body.max_completion_tokens or body.max_tokens, "messages")
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if body.stream:
            return StreamingResponse(_stream_chat(engine, choices, body, len(prompt), completion_id,
                                                  settings.model_name, tool_names),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        await _wait(choices, request, engine, body.stop)
        out = []
        for choice in choices:
            message = {"role": "assistant", "content": choice.text}
            calls = parse_tool_calls(choice.text, tool_names) if tool_names else None
            if calls:
                message = {"role": "assistant", "content": None, "tool_calls": _tool_call_items(calls)}
                choice.finish_reason = "tool_calls"
            out.append({"index": choice.index, "message": message, "logprobs": None,
                        "finish_reason": choice.finish_reason})
        return {"id": completion_id, "object": "chat.completion", "created": int(time.time()),
                "model": settings.model_name, "choices": out, "usage": _usage(len(prompt), choices),
                "system_fingerprint": None}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _no_reward(is_reward)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        ids = [engine.tokenizer(p)["input_ids"] for p in prompts]
        choices = []
        for k, prompt in enumerate(ids):
            for choice in _submit(engine, batcher, prompt, body, body.max_tokens or 16, "prompt"):
                choice.index = k * body.n + choice.index
                choices.append(choice)
        completion_id = f"cmpl-{uuid.uuid4().hex[:24]}"
        prompt_tokens = sum(len(p) for p in ids) * body.n
        if body.stream:
            return StreamingResponse(_stream_completion(engine, choices, body, prompt_tokens, completion_id,
                                                        settings.model_name),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        await _wait(choices, request, engine, body.stop)
        return {"id": completion_id, "object": "text_completion", "created": int(time.time()),
                "model": settings.model_name,
                "choices": [{"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                            for c in choices],
                "usage": _usage(prompt_tokens, choices)}

    @app.post("/v1/score")
    async def score(body: ScoreRequest):
        if not is_reward:
            raise ApiError(400, "this server runs a chat model; /v1/score needs a reward-model run (stage rm)",
                           None, "not_a_reward_model")
        if isinstance(body.messages[0], str):
            sequences = [engine.tokenizer(text)["input_ids"] for text in body.messages]
        else:
            conversations = [[_message(m, i) for i, m in enumerate(c)] for c in body.messages]
            sequences = [engine.tokenizer.apply_chat_template(with_system(c, engine.default_system), return_dict=False)
                         for c in conversations]
        limit = int(getattr(engine.model.config, "max_position_embeddings", 0) or 0)
        for i, seq in enumerate(sequences):
            if limit and len(seq) > limit:
                raise ApiError(400, f"messages[{i}] is {len(seq)} tokens, longer than the model's context of {limit}",
                               f"messages[{i}]", "context_length_exceeded")
        scores = await asyncio.to_thread(engine.score_ids, sequences)
        return {"object": "list", "model": settings.model_name,
                "data": [{"object": "score", "index": i, "score": s} for i, s in enumerate(scores)]}

    return app


class _Guard:
    """Before any route reads the body: the API key (constant-time comparison; /health stays open) and the body size,
    also of bodies sent without a Content-Length (chunked), counted while they are read. A plain ASGI middleware, so
    that routes still see the client disconnect."""

    def __init__(self, app, limit: int, api_key: str | None):
        self.app, self.limit, self.api_key = app, limit, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _reply(send, 413, error_body(f"the request body is larger than {self.limit} bytes",
                                                      "invalid_request_error", None, "request_too_large"))
        if self.api_key and scope["path"].startswith("/v1/"):
            given = headers.get("authorization", "")
            token = given[7:] if given[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                return await _reply(send, 401, error_body("Incorrect or missing API key. Send 'Authorization: "
                                                          "Bearer KEY'.", "invalid_request_error", None,
                                                          "invalid_api_key"))
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise StarletteHTTPException(413, f"the request body is larger than {self.limit} bytes")
            return message

        await self.app(scope, limited, send)


async def _reply(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


# --- helpers ------------------------------------------------------------------------------------------------------
def _no_reward(is_reward: bool) -> None:
    if is_reward:
        raise ApiError(400, "this server runs a reward model: it scores answers instead of writing them; "
                            "use POST /v1/score", None, "reward_model")


def _offered_tools(body: ChatRequest) -> tuple[list | None, set | None]:
    """Function schemas the template writes into the prompt, and their names for reading calls back."""
    if not body.tools or body.tool_choice == "none":
        return None, None
    tools = [t.function.model_dump(exclude_none=True) for t in body.tools]
    if isinstance(body.tool_choice, dict):
        name = (body.tool_choice.get("function") or {}).get("name")
        tools = [t for t in tools if t["name"] == name]
        if not tools:
            raise ApiError(400, f"tool_choice names function {name!r}, which is not among tools", "tool_choice")
    return tools, {t["name"] for t in tools}


def _message(message: Message, index: int) -> dict:
    """An OpenAI message as the chat template (and the tool format of training data) sees it."""
    try:
        text = message.text()
    except ValueError as error:
        raise ApiError(400, f"messages[{index}].content: {error}", f"messages[{index}].content") from None
    role = {"developer": "system", "function": "tool"}.get(message.role, message.role)
    if role == "assistant" and message.tool_calls:
        calls = []
        for k, call in enumerate(message.tool_calls):
            try:
                arguments = json.loads(call.function.arguments or "{}")
            except ValueError:
                raise ApiError(400, f"messages[{index}].tool_calls[{k}].function.arguments is not JSON",
                               f"messages[{index}].tool_calls[{k}].function.arguments") from None
            calls.append({"name": call.function.name, "arguments": arguments})
        text = format_tool_calls(calls)
    return {"role": role, "content": text}


def _tool_call_items(calls: list[dict]) -> list[dict]:
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for c in calls]


def _submit(engine, batcher, prompt: list[int], body, max_tokens: int | None, prompt_param: str) -> list[_Choice]:
    context = engine.context_length
    if len(prompt) >= context:
        raise ApiError(400, f"the prompt is {len(prompt)} tokens; the model reads at most {context} (prompt and "
                            "answer together). Shorten the conversation.", prompt_param, "context_length_exceeded")
    room = context - len(prompt)
    if max_tokens is not None and max_tokens > room:
        param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
        raise ApiError(400, f"{param}={max_tokens} does not fit: the prompt takes {len(prompt)} of the model's "
                            f"{context} tokens, leaving {room}", param, "context_length_exceeded")
    sampling = [Sampling(max_new_tokens=max_tokens or room,
                         temperature=1.0 if body.temperature is None else body.temperature,
                         top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0,
                         repetition_penalty=body.repetition_penalty or 1.0,
                         presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                         seed=None if body.seed is None else body.seed + k) for k in range(body.n)]
    loop = asyncio.get_running_loop()
    try:
        requests = batcher.submit_many([prompt] * body.n, sampling, engine.stop_ids)
    except QueueFull as error:
        raise ApiError(503, f"the server is busy ({error}); retry shortly", None, "queue_full", "server_error",
                       {"Retry-After": "1"}) from None
    choices = [_Choice(r, k) for k, r in enumerate(requests)]
    for choice in choices:
        choice.request.listen(lambda event, c=choice: loop.call_soon_threadsafe(c.events.put_nowait, event))
    return choices


def _advance(choice: _Choice, engine, event, stops: list[str], final: bool = False) -> str:
    """Apply one batcher event to a choice; return the text that may be sent now (held back: a possible start of a
    stop sequence, an unfinished character)."""
    kind, value = event
    if kind == "error":
        choice.finish_reason = "error"
        raise ApiError(500, f"generation failed: {value}", None, "generation_failed", "server_error")
    if kind == "done":
        choice.finish_reason = {"cancelled": "stop"}.get(value, value)
    text = engine.tokenizer.decode(choice.request.tokens, skip_special_tokens=True)
    done = choice.finish_reason is not None
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    if cut >= 0:
        text, done = text[:cut], True
        choice.finish_reason = "stop"
        choice.request.cancel()
    safe = len(text)
    if not done:
        while safe and text[safe - 1] == "\ufffd":  # a character whose bytes are not all generated yet
            safe -= 1
        hold = max((k for s in stops for k in range(1, len(s)) if text[:safe].endswith(s[:k])), default=0)
        safe -= hold
    choice.text = text
    new = text[choice.sent: safe] if safe > choice.sent else ""
    choice.sent = max(choice.sent, safe)
    return new


async def _wait(choices: list[_Choice], request, engine, stops: list[str]) -> None:
    """Until every choice is finished; a client that disconnects cancels its requests. The connection is looked at
    every half second, also while tokens keep coming (a client that gave up on a long answer frees its slot)."""
    try:
        checked = time.monotonic()
        for choice in choices:
            while choice.finish_reason is None:
                try:
                    event = await asyncio.wait_for(choice.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    event = None
                if time.monotonic() - checked >= 0.5:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        raise asyncio.CancelledError
                if event is not None:
                    _advance(choice, engine, event, stops)
    finally:
        for choice in choices:
            choice.request.cancel()


def _usage(prompt_tokens: int, choices: list[_Choice]) -> dict:
    completion = sum(len(c.request.tokens) for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def _sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _merged_events(choices: list[_Choice]):
    """(choice, event) pairs from all choices as they come."""
    pending = {asyncio.ensure_future(c.events.get()): c for c in choices}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                choice = pending.pop(task)
                event = task.result()
                yield choice, event  # the consumer applies it before this resumes
                if event[0] not in ("done", "error") and choice.finish_reason is None:
                    pending[asyncio.ensure_future(choice.events.get())] = choice
    finally:
        for task in pending:
            task.cancel()


async def _stream_chat(engine, choices, body: ChatRequest, prompt_tokens: int, completion_id: str, model: str,
                       tool_names: set | None):
    created = int(time.time())

    def chunk(index, delta, finish=None):
        return _sse({"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                     "system_fingerprint": None,
                     "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]})

    try:
        for choice in choices:
            yield chunk(choice.index, {"role": "assistant", "content": ""})
        buffered: dict[int, str] = {}
        async for choice, event in _merged_events(choices):
            try:
                new = _advance(choice, engine, event, body.stop)
            except ApiError as error:
                yield _sse(error_body(error.message, error.kind, error.param, error.code))
                return
            if tool_names is not None:  # a reply that may be a tool call is held until it is complete
                seen = buffered.get(choice.index, "") + new
                if seen.lstrip()[:1] in ("{", "[", "<", "`") or not seen.strip():
                    buffered[choice.index], new = seen, ""
                else:
                    buffered[choice.index], new = "", seen
                if choice.finish_reason is not None:
                    calls = parse_tool_calls(choice.text, tool_names)
                    if calls:
                        items = [dict(item, index=k) for k, item in enumerate(_tool_call_items(calls))]
                        yield chunk(choice.index, {"tool_calls": items})
                        choice.finish_reason = "tool_calls"
                        new = ""
                    else:
                        new = buffered.get(choice.index, "")
            if new:
                yield chunk(choice.index, {"content": new})
            if choice.finish_reason is not None:
                yield chunk(choice.index, {}, choice.finish_reason)
        if body.stream_options and body.stream_options.include_usage:
            yield _sse({"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [], "usage": _usage(prompt_tokens, choices)})
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or the stream ended): free the slots at the next step
        for choice in choices:
            choice.request.cancel()


async def _stream_completion(engine, choices, body: CompletionRequest, prompt_tokens: int, completion_id: str,
                             model: str):
    created = int(time.time())

    def chunk(index, text, finish=None):
        return _sse({"id": completion_id, "object": "text_completion", "created": created, "model": model,
                     "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]})

    try:
        async for choice, event in _merged_events(choices):
            try:
                new = _advance(choice, engine, event, body.stop)
            except ApiError as error:
                yield _sse(error_body(error.message, error.kind, error.param, error.code))
                return
            if new or choice.finish_reason is not None:
                yield chunk(choice.index, new, choice.finish_reason)
        if body.stream_options and body.stream_options.include_usage:
            yield _sse({"id": completion_id, "object": "text_completion", "created": created, "model": model,
                        "choices": [], "usage": _usage(prompt_tokens, choices)})
        yield "data: [DONE]\n\n"
    finally:
        for choice in choices:
            choice.request.cancel()
