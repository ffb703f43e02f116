"""Request bodies of the OpenAI-compatible API. Fields OpenAI clients send and TuneForge does not use are accepted
and ignored when they do not change the answer (`user`, `metadata`, `store`, `parallel_tool_calls`...); fields that
would change it and cannot be honoured (`logprobs`, `logit_bias`, structured output) are refused by name."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class FunctionCall(_Body):
    name: str
    arguments: str = "{}"


class ToolCall(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ContentPart(_Body):
    type: str
    text: str | None = None


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"content part of type {part.type!r}: this server reads text only")
            parts.append(part.text)
        return "".join(parts)


class FunctionSpec(_Body):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict | None = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionSpec


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = Field(None, validate_default=True)
    n: int = Field(1, ge=1, le=16)
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | int | None = None
    logit_bias: dict | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("a stop sequence must not be empty")
        return stops

    @model_validator(mode="after")
    def _unsupported(self):
        if self.logprobs:
            raise ValueError("logprobs: not supported by this server; leave it out")
        if self.logit_bias:
            raise ValueError("logit_bias: not supported by this server; leave it out")
        return self


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict | None = None
    response_format: dict | None = None
    top_logprobs: int | None = None

    @model_validator(mode="after")
    def _chat_unsupported(self):
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ValueError("response_format: only {\"type\": \"text\"} is supported by this server")
        if self.top_logprobs:
            raise ValueError("top_logprobs: not supported by this server; leave it out")
        return self


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(min_length=1)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _completion_unsupported(self):
        if self.echo:
            raise ValueError("echo: not supported by this server; leave it out")
        if self.suffix:
            raise ValueError("suffix: not supported by this server; leave it out")
        if self.best_of not in (None, 1):
            raise ValueError("best_of: not supported by this server; use n")
        return self


class ScoreRequest(_Body):
    model: str | None = None
    messages: list[list[Message]] | list[str] = Field(min_length=1)
