"""The tool format: how tool descriptions, tool calls and tool results are written for the model, the same in
training (tool-call data such as glaive_toolcall: a `tools` column and `function_call` / `observation` turns) and in
serving (OpenAI `tools`, `tool_calls` and `tool` messages in API requests).

- Tools go to the template's `tools` variable; a template without one gets them at the end of the system message,
  as "You can call these tools:" followed by their JSON schemas (the text the built-in templates write).
- A call is the assistant's whole answer: `{"name": ..., "arguments": {...}}` as JSON (several calls: a JSON list),
  which is how glaive_toolcall and LLaMA-Factory's sharegpt data write `function_call` turns.
- A tool result is a message of role `tool`.
"""

from __future__ import annotations

import json
import re

TOOLS_HEADER = "You can call these tools:\n"


def uses_tools(jinja: str) -> bool:
    """Whether a chat template renders the `tools` variable itself."""
    return re.search(r"\btools\b", jinja or "") is not None


def tools_into_system(messages: list[dict], tools: list) -> list[dict]:
    """The conversation with the tool descriptions appended to its system message (one is added when missing)."""
    text = TOOLS_HEADER + json.dumps(tools, ensure_ascii=False)
    if messages and messages[0]["role"] == "system":
        first = dict(messages[0])
        first["content"] = (first["content"] + "\n\n" + text) if first["content"] else text
        return [first] + list(messages[1:])
    return [{"role": "system", "content": text}] + list(messages)


def format_tool_calls(calls: list[dict]) -> str:
    """The answer text of one or more calls, each {"name": str, "arguments": dict}."""
    body = [{"name": c["name"], "arguments": c["arguments"]} for c in calls]
    return json.dumps(body[0] if len(body) == 1 else body, ensure_ascii=False)


_WRAPPERS = (re.compile(r"^<tool_call>\s*(.*?)\s*</tool_call>$", re.S), re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S))


def parse_tool_calls(text: str, names: set[str] | None = None) -> list[dict] | None:
    """The calls an answer makes, or None when it is an ordinary answer. `names`: the tools offered (a JSON answer
    naming no offered tool is an ordinary answer)."""
    body = text.strip()
    blocks = re.findall(r"<tool_call>\s*(.*?)\s*</tool_call>", body, re.S)
    if len(blocks) > 1 and not re.sub(r"<tool_call>.*?</tool_call>", "", body, flags=re.S).strip():
        body = "[" + ",".join(blocks) + "]"  # several calls, one block each (Qwen's format)
    for wrapper in _WRAPPERS:
        match = wrapper.match(body)
        if match:
            body = match.group(1)
    if not body.startswith(("{", "[")):
        return None
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    items = parsed if isinstance(parsed, list) else [parsed]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict) or (names is not None and item["name"] not in names):
            return None
        calls.append({"name": item["name"], "arguments": arguments})
    return calls or None


def calls_as_tool_calls(messages: list[dict], tools: list) -> list[dict]:
    """The conversation for a template that writes calls itself: each assistant answer that is a call of an offered
    tool (the tool format's JSON answer) becomes an assistant message with OpenAI / transformers `tool_calls`
    (arguments as an object), which such templates render in their own words."""
    names = {(t.get("function") or t).get("name") for t in tools if isinstance(t, dict)}
    out = []
    for m in messages:
        calls = parse_tool_calls(m["content"], names) if m["role"] == "assistant" and not m.get("tool_calls") else None
        if calls:
            m = {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]}
        out.append(m)
    return out
