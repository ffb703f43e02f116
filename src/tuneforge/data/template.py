"""Chat templates: the tokenizer's own, or a built-in one from templates.yaml, always rendered by
`tokenizer.apply_chat_template` so that training text equals what the model sees at inference.

Label spans come from prefix differences: the answer of turn i is what rendering messages[:i+1] adds
to rendering messages[:i] with the generation prompt. That holds for any template whose renderings
grow by appending, which `render_with_spans` checks.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

import yaml

from tuneforge.data.tools import tools_into_system, uses_tools
from tuneforge.errors import ConfigError, DataError


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    jinja: str
    stop: tuple[str, ...] = field(default=())

    def render(self, tokenizer, messages: list[dict], tools: list | None = None,
               add_generation_prompt: bool = False) -> str:
        if tools and not uses_tools(self.jinja):  # the tool format's fallback: tools in the system message
            messages, tools = tools_into_system(messages, tools), None
        return tokenizer.apply_chat_template(messages, tools=tools or None, chat_template=self.jinja,
                                             add_generation_prompt=add_generation_prompt, tokenize=False)


def stop_token_ids(tokenizer, stop) -> list[int]:
    """Ids of the stop strings that are single tokens of this tokenizer (unknown ones left out)."""
    ids = (tokenizer.convert_tokens_to_ids(s) for s in stop)
    return [i for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id]


LLAMAFACTORY_PREFIX = "llamafactory:"


@lru_cache(maxsize=1)
def builtin_templates() -> dict[str, dict]:
    """TuneForge's templates (templates.yaml), and LLaMA-Factory's renderings (templates_llamafactory.yaml) as
    `llamafactory:NAME`, also under the bare NAME where TuneForge has none (a translated LLaMA-Factory config
    uses the `llamafactory:` names, so it renders exactly as there)."""
    files = resources.files("tuneforge.data")
    table = yaml.safe_load(files.joinpath("templates.yaml").read_text(encoding="utf-8"))
    for name, entry in list(table.items()):
        for alias in entry.get("aliases", []):
            table[alias] = entry
    theirs = yaml.safe_load(files.joinpath("templates_llamafactory.yaml").read_text(encoding="utf-8"))
    for name, entry in theirs.items():
        table[LLAMAFACTORY_PREFIX + name] = entry
        table.setdefault(name, entry)
    return table


def resolve_template(name: str, tokenizer) -> tuple[ChatTemplate, str | None]:
    """The template to train with, plus a note for the report when `auto` had to fall back."""
    if name == "auto":
        own = tokenizer.chat_template
        if isinstance(own, dict):  # several named templates: the default one is the chat template
            own = own.get("default")
        if own:
            return ChatTemplate("auto", own, tuple(detect_stop_strings(own, tokenizer))), None
        name, note = "empty", ("the tokenizer has no chat template, so the `empty` template is used; "
                               "set model.template (e.g. gemma, chatml) to train a base model for chat")
    else:
        note = None
    table = builtin_templates()
    if name not in table:
        close = difflib.get_close_matches(name, list(table), n=3)
        hint = f" did you mean {', '.join(close)}?" if close else ""
        names = sorted(n for n in table if not n.startswith(LLAMAFACTORY_PREFIX))
        raise ConfigError(f"model.template: unknown template {name!r}.{hint} expected auto, one of "
                          f"{', '.join(names)}, or {LLAMAFACTORY_PREFIX}NAME for LLaMA-Factory's rendering of NAME")
    entry = table[name]
    stop = list(entry.get("stop", [])) + ([tokenizer.eos_token] if tokenizer.eos_token else [])
    return ChatTemplate(name, entry["jinja"], tuple(dict.fromkeys(stop))), note


def detect_stop_strings(jinja: str, tokenizer) -> list[str]:
    """Special tokens that a template writes right after an answer (e.g. <|im_end|>) end generation."""
    probe = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]
    try:
        text = tokenizer.apply_chat_template(probe, chat_template=jinja, tokenize=False)
    except Exception:
        return [tokenizer.eos_token] if tokenizer.eos_token else []
    tail = text[text.rfind("pong") + 4:]
    specials = [t for t in tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()) if t and t in tail]
    specials.sort(key=tail.find)
    return list(dict.fromkeys(specials[:1] + ([tokenizer.eos_token] if tokenizer.eos_token else [])))


def parse_tools(tools: str | None) -> list | None:
    """Tool descriptions arrive as JSON text; templates want a list of schemas."""
    if not tools:
        return None
    try:
        parsed = json.loads(tools)
    except json.JSONDecodeError:
        return [{"description": tools}]
    return parsed if isinstance(parsed, list) else [parsed]


def render_with_spans(template: ChatTemplate, tokenizer, messages: list[dict],
                      tools: list | None = None) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation; return the text and the (start, end) character span of every answer."""
    try:
        full = template.render(tokenizer, messages, tools)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = template.render(tokenizer, messages[:i], tools, add_generation_prompt=True)
            through = template.render(tokenizer, messages[: i + 1], tools)
            if not (through.startswith(before) and full.startswith(through)):
                raise DataError(
                    f"template {template.name!r} rewrites earlier turns when a turn is added, so answers cannot "
                    "be located for the loss mask. hint: set model.template to a built-in template (e.g. chatml)"
                )
            spans.append((len(before), len(through)))
    except DataError:
        raise
    except Exception as exc:  # the template itself raised (e.g. it rejects a role)
        raise DataError(f"template {template.name!r} failed on this conversation: {exc}. hint: templates differ "
                        "in the roles they accept; try model.template: chatml") from None
    return full, spans
