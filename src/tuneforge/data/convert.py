"""Raw rows (alpaca or sharegpt columns) -> `Example`s: one canonical conversation shape for every stage.

Malformed rows (wrong types, unknown roles, broken turn order) become `BadRow`s that name the file, the row,
the field and a fix; empty prompts or answers are policy drops, counted by reason. Nothing is dropped silently.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tuneforge.data.readers import RawRow
from tuneforge.data.registry import DatasetSpec
from tuneforge.data.tools import format_tool_calls
from tuneforge.errors import DataError

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Example:
    """A conversation: `messages` alternate user/tool and assistant turns, after an optional system message."""

    where: str
    messages: list[dict[str, str]]
    tools: str | None = None
    chosen: str | None = None  # preference data: the better final answer
    rejected: str | None = None
    kto_tag: bool | None = None

    @property
    def text(self) -> str:
        """Plain text for pre-training: all contents of the conversation, in order."""
        return "\n\n".join(m["content"] for m in self.messages if m["content"])


@dataclass
class Conversion:
    examples: list[Example] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)  # policy drops by reason
    bad_rows: list[str] = field(default_factory=list)  # malformed rows, with where and a fix


class _Bad(Exception):
    pass


def convert_rows(spec: DatasetSpec, rows: list[RawRow], placeholders: dict[str, str] | None = None,
                 default_system: str | None = None) -> Conversion:
    _check_columns_exist(spec, rows)
    out = Conversion()
    convert = _convert_sharegpt if spec.is_chat else _convert_alpaca
    for row in rows:
        if not isinstance(row.data, dict):
            out.bad_rows.append(f"{row.where}: expected an object with named columns, got {row.data!r:.60}")
            continue
        try:
            example = convert(spec, row)
        except _Bad as bad:
            out.bad_rows.append(f"{row.where}: {bad}")
            continue
        if placeholders:
            _fill_placeholders(example, placeholders)
        if example.messages:
            example.messages = with_system(example.messages, default_system)
        reason = _empty_reason(example)
        if reason:
            out.dropped[reason] += 1
        else:
            out.examples.append(example)
    return out


def with_system(messages: list[dict], system: str | None) -> list[dict]:
    """The conversation with `system` as its first message, unless it has a system message of its own."""
    if system and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system}] + messages
    return messages


def _check_columns_exist(spec: DatasetSpec, rows: list[RawRow]) -> None:
    """A mapped column that no row has is a registry mistake, not a row mistake: say so once."""
    if not rows:
        return
    keys = set().union(*(r.data.keys() for r in rows[:200] if isinstance(r.data, dict)))
    c = spec.columns
    needed = [("messages", c.messages)] if spec.is_chat else [("prompt", c.prompt)]
    needed += [(n, getattr(c, n)) for n in ("chosen", "rejected", "kto_tag") if getattr(c, n)]
    if spec.formatting == "alpaca" and not spec.ranking and not spec.is_text_only and c.response:
        needed.append(("response", c.response))
    for role, column in needed:
        if column and column not in keys:
            raise DataError(
                f"data set {spec.name!r}: column {column!r} (columns.{role}) is in none of the rows; "
                f"their keys are {sorted(keys)}. hint: map columns.{role} to one of them in dataset_info.json"
            )


def _text(value: Any, what: str) -> str:
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # labels such as 0/1 in classification data
    if not isinstance(value, str):
        raise _Bad(f"{what} should be text, got {type(value).__name__} {value!r:.60}")
    return value


CONVERSATION_KEYS = ("conversations", "messages")


def _convert_alpaca(spec: DatasetSpec, row: RawRow) -> Example:
    c, d = spec.columns, row.data
    if c.prompt and c.prompt not in d and any(isinstance(d.get(k), list) for k in CONVERSATION_KEYS):
        key = next(k for k in CONVERSATION_KEYS if isinstance(d.get(k), list))
        raise _Bad(f"this row is a conversation ({key!r}) but data set {spec.name!r} is registered as alpaca "
                   f"(columns.prompt: {c.prompt}). hint: set \"formatting\": \"sharegpt\" (and its tags), or keep "
                   "alpaca and sharegpt rows in separate files")
    messages = []
    system = _text(d.get(c.system), c.system) if c.system else ""
    if system:
        messages.append({"role": "system", "content": system})
    history = d.get(c.history) if c.history else None
    for i, turn in enumerate(history or []):
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2):
            raise _Bad(f"{c.history}[{i}] should be a [prompt, answer] pair, got {turn!r:.60}")
        messages += [{"role": "user", "content": _text(turn[0], f"{c.history}[{i}][0]")},
                     {"role": "assistant", "content": _text(turn[1], f"{c.history}[{i}][1]")}]
    prompt = _text(d.get(c.prompt), c.prompt) if c.prompt else ""
    query = _text(d.get(c.query), c.query) if c.query else ""
    messages.append({"role": "user", "content": "\n".join(p for p in (prompt, query) if p)})
    example = Example(row.where, messages, tools=_tools(d, c.tools))
    if spec.ranking:
        example.chosen = _text(d.get(c.chosen), c.chosen)
        example.rejected = _text(d.get(c.rejected), c.rejected)
    elif c.response and c.response in d:
        messages.append({"role": "assistant", "content": _text(d.get(c.response), c.response)})
    if c.kto_tag:
        example.kto_tag = _kto(d.get(c.kto_tag), c.kto_tag)
    return example


def _convert_sharegpt(spec: DatasetSpec, row: RawRow) -> Example:
    c, t, d = spec.columns, spec.tags, row.data
    turns = d.get(c.messages)
    if turns is None and c.messages not in d and spec.columns.prompt in d:
        raise _Bad(f"this row is in alpaca form ({spec.columns.prompt!r}) but data set {spec.name!r} is registered as "
                   f"sharegpt (columns.messages: {c.messages}). hint: register it without \"formatting\": "
                   "\"sharegpt\", or keep alpaca and sharegpt rows in separate files")
    if not isinstance(turns, list):
        raise _Bad(f"{c.messages} should be a list of messages, got {type(turns).__name__}")
    role_map = {t.user_tag: "user", t.observation_tag: "tool", t.assistant_tag: "assistant",
                t.function_tag: "assistant", t.system_tag: "system"}
    messages = []
    system = _text(d.get(c.system), c.system) if c.system else ""
    for i, turn in enumerate(turns):
        if isinstance(turn, dict) and spec.formatting == "openai" and turn.get("tool_calls"):
            turn = {**turn, t.content_tag: _openai_calls(turn["tool_calls"], f"{c.messages}[{i}].tool_calls")}
        if not isinstance(turn, dict) or t.role_tag not in turn or t.content_tag not in turn:
            raise _Bad(f"{c.messages}[{i}] should be an object with {t.role_tag!r} and {t.content_tag!r}, "
                       f"got {turn!r:.80}. hint: set tags.role_tag/content_tag in dataset_info.json")
        raw_role, content = turn[t.role_tag], _text(turn[t.content_tag], f"{c.messages}[{i}].{t.content_tag}")
        role = role_map.get(raw_role)
        if role is None:
            raise _Bad(f"{c.messages}[{i}].{t.role_tag} is {raw_role!r}; expected "
                       f"{'|'.join(dict.fromkeys(role_map))}. hint: {_role_hint(raw_role, t)}")
        if role == "system":
            if i != 0:
                raise _Bad(f"{c.messages}[{i}] is a system message; only the first message may be one")
            system = content
            continue
        expected = ("user", "tool") if len(messages) % 2 == 0 else ("assistant",)
        if role not in expected:
            raise _Bad(f"{c.messages}[{i}].{t.role_tag} is {raw_role!r} but turns must alternate: "
                       f"{t.user_tag}/{t.observation_tag} then {t.assistant_tag}/{t.function_tag}")
        messages.append({"role": role, "content": content})
    if system:
        messages.insert(0, {"role": "system", "content": system})
    example = Example(row.where, messages, tools=_tools(d, c.tools))
    if spec.ranking:
        example.chosen = _pick_answer(d, c.chosen, t)
        example.rejected = _pick_answer(d, c.rejected, t)
    if c.kto_tag:
        example.kto_tag = _kto(d.get(c.kto_tag), c.kto_tag)
    return example


def _openai_calls(calls: Any, where: str) -> str:
    """An OpenAI assistant message's tool_calls as the answer text of the tool format."""
    if not isinstance(calls, list):
        raise _Bad(f"{where} should be a list of calls")
    parsed = []
    for k, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _Bad(f"{where}[{k}] should be {{\"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                raise _Bad(f"{where}[{k}].function.arguments is not JSON") from None
        parsed.append({"name": function["name"], "arguments": arguments})
    return format_tool_calls(parsed)


def _role_hint(raw_role: Any, t) -> str:
    if raw_role in ("user", "assistant", "tool") and t.user_tag == "human":
        return "these are OpenAI roles: add tags role_tag: role, content_tag: content, user_tag: user, assistant_tag: assistant"
    if raw_role in ("human", "gpt") and t.user_tag == "user":
        return "these are sharegpt roles: remove the tags from dataset_info.json so the from/value defaults apply"
    return "map it with tags.user_tag / assistant_tag / observation_tag / function_tag in dataset_info.json"


def _pick_answer(d: dict, column: str | None, t) -> str:
    value = d.get(column) if column else None
    if isinstance(value, dict):
        return _text(value.get(t.content_tag), f"{column}.{t.content_tag}")
    return _text(value, column or "chosen/rejected")


def _tools(d: dict, column: str | None) -> str | None:
    if not column or d.get(column) in (None, ""):
        return None
    value = d[column]
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _kto(value: Any, column: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise _Bad(f"{column} should be true or false, got {value!r:.40}")


def _empty_reason(example: Example) -> str | None:
    if example.chosen is not None or example.rejected is not None:
        if not example.chosen or not example.rejected:
            return "empty chosen or rejected answer"
    users = [m for m in example.messages if m["role"] in ("user", "tool")]
    if not users or not any(m["content"].strip() for m in users):
        return "empty prompt"
    answers = [m for m in example.messages if m["role"] == "assistant"]
    if answers and not answers[-1]["content"].strip():
        return "empty answer"
    return None


_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def _fill_placeholders(example: Example, values: dict[str, str]) -> None:
    def fill(text: str | None) -> str | None:
        return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), text) if text else text

    for m in example.messages:
        m["content"] = fill(m["content"])
    example.chosen, example.rejected = fill(example.chosen), fill(example.rejected)
