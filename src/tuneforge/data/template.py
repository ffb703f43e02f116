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

from tuneforge.data.tools import calls_as_tool_calls, tools_into_system, uses_tools
from tuneforge.errors import ConfigError, DataError


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    jinja: str
    stop: tuple[str, ...] = field(default=())
    thinking: bool = True  # False: reasoning templates render without thoughts (data.enable_thinking)
    reasoning: bool = False  # one of LLaMA-Factory's reasoning templates (qwen3, deepseekr1, gpt_oss)
    eos_ends_earlier_answers: bool = False  # the token after an earlier answer learns end-of-text (see Span)

    @property
    def saved_jinja(self) -> str:
        """The template a run saves with its tokenizer: with thinking off, the setting is written into it, so that
        chat, the API and exports answer as the run was trained."""
        return self.jinja if self.thinking else "{%- set enable_thinking = false -%}\n" + self.jinja

    def render(self, tokenizer, messages: list[dict], tools: list | None = None,
               add_generation_prompt: bool = False) -> str:
        if tools and not uses_tools(self.jinja):  # the tool format's fallback: tools in the system message
            messages, tools = tools_into_system(messages, tools), None
        elif tools:  # the template writes tools and calls itself: calls go to it as tool_calls
            messages = calls_as_tool_calls(messages, tools)
        extra = {} if self.thinking else {"enable_thinking": False}  # the variable Qwen3-style templates read
        return tokenizer.apply_chat_template(messages, tools=tools or None, chat_template=self.jinja,
                                             add_generation_prompt=add_generation_prompt, tokenize=False, **extra)


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
    formats = theirs.pop("_tool_formats")
    for name, entry in theirs.items():
        if entry.get("tool_format"):  # its tool format's macros go in front (see the file's _tool_formats)
            entry = {**entry, "jinja": formats[entry["tool_format"]] + _tools_into_system(entry) + entry["jinja"]}
        table[LLAMAFACTORY_PREFIX + name] = entry
        table.setdefault(name, entry)
    return table


def _tools_into_system(entry: dict) -> str:
    """Jinja that, when tools are given, writes the tool format's text after the system prompt (the template's
    default one when the conversation has none), as LLaMA-Factory does; the template then renders that system."""
    default = json.dumps(entry.get("default_system", ""), ensure_ascii=False)
    return ("{%- if tools -%}{%- set tool_system = ((messages[0]['content'] if messages[0]['role'] == 'system' else '')"
            f" or {default}) + tool_text(tools) -%}}{{%- set messages = [{{'role': 'system', 'content': tool_system}}] + "
            "(messages[1:] if messages[0]['role'] == 'system' else messages) -%}{%- endif -%}")


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
    return ChatTemplate(name, entry["jinja"], tuple(dict.fromkeys(stop)),
                        eos_ends_earlier_answers=entry.get("eos_ends_earlier_answers", False),
                        reasoning=entry.get("reasoning", False)), note


class Span(tuple):
    """(start, end) characters of an answer. `eos_label`: its last token is the next turn's first token, which is
    trained to predict end-of-text instead of itself (templates that end only the last answer with it)."""

    eos_label = False

    @classmethod
    def ending_in_eos(cls, start: int, end: int) -> "Span":
        span = cls((start, end))
        span.eos_label = True
        return span


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
                return full, _turnwise_spans(template, tokenizer, messages, tools, full)
            spans.append((len(before), len(through)))
    except DataError:
        raise
    except Exception as exc:  # the template itself raised (e.g. it rejects a role)
        raise DataError(f"template {template.name!r} failed on this conversation: {exc}. hint: templates differ "
                        "in the roles they accept; try model.template: chatml") from None
    return full, spans


def _turnwise_spans(template: ChatTemplate, tokenizer, messages: list[dict], tools, full: str) -> list[tuple[int, int]]:
    """Answers of a template whose prompt rewrites earlier turns (Qwen3-style templates drop earlier thoughts from
    the prompt, and add an empty thought to answers without one when training). The row is the conversation as
    rendered for training, as LLaMA-Factory encodes it turn by turn: answer i runs from the training rendering of
    the turns before it plus the assistant header (what the generation prompt adds to the first turn) to the
    training rendering through it. Templates that end only the last answer with the end-of-text token (GLM's,
    gpt-oss's) let the next turn's first token end an earlier answer, which is then supervised in its place, as
    LLaMA-Factory does."""
    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    plain = template.render(tokenizer, messages[:first], tools)
    prompt = template.render(tokenizer, messages[:first], tools, add_generation_prompt=True)
    header = prompt[len(plain):] if prompt.startswith(plain) else None
    eos = tokenizer.eos_token or ""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = template.render(tokenizer, messages[:i], tools) + (header or "")
        through = template.render(tokenizer, messages[: i + 1], tools)
        relabel = False
        if eos and through.endswith(eos) and not full.startswith(through) and full.startswith(through[:-len(eos)]):
            cut = len(through) - len(eos)  # an earlier answer, ended by the next turn's first token
            through = full[:cut + _first_token_length(tokenizer, full, cut)]
            relabel = template.eos_ends_earlier_answers
        if header is None or not (through.startswith(before) and full.startswith(through)):
            raise DataError(
                f"template {template.name!r} rewrites earlier turns when a turn is added, so answers cannot "
                "be located for the loss mask. hint: set model.template to a built-in template (e.g. chatml)"
            )
        spans.append(Span.ending_in_eos(len(before), len(through)) if relabel else (len(before), len(through)))
    return spans


def _first_token_length(tokenizer, text: str, start: int) -> int:
    """Characters of the first token of `text[start:]`."""
    offsets = tokenizer(text[start:], add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return offsets[0][1] if offsets else 0
