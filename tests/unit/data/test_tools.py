"""The tool format: tools reach the prompt whether or not the template has a tools slot, the same way in training
and in serving, and calls written in it are read back."""

from __future__ import annotations

import json

from tuneforge.data.template import ChatTemplate, builtin_templates, render_with_spans
from tuneforge.data.tools import TOOLS_HEADER, format_tool_calls, parse_tool_calls, uses_tools
from tuneforge.infer.engine import Engine

TOOL = {"name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def test_a_template_without_a_tools_slot_gets_the_tools_in_its_system_message(tokenizer):
    template = ChatTemplate("own", tokenizer.chat_template)
    assert not uses_tools(template.jinja)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": format_tool_calls([{"name": "get_weather",
                                                                      "arguments": {"city": "Paris"}}])}]
    text, spans = render_with_spans(template, tokenizer, messages, [TOOL])
    expected_system = "Be brief.\n\n" + TOOLS_HEADER + json.dumps([TOOL], ensure_ascii=False)
    assert text.startswith(f"<|im_start|>system\n{expected_system}<|im_end|>\n")
    assert text[spans[0][0]: spans[0][1]].startswith('{"name": "get_weather", "arguments": {"city": "Paris"}}')
    # no system message: one is added; no tools: nothing changes
    alone = template.render(tokenizer, messages[1:], [TOOL])
    assert alone.startswith(f"<|im_start|>system\n{TOOLS_HEADER}")
    assert template.render(tokenizer, messages[1:]) == tokenizer.apply_chat_template(messages[1:], tokenize=False)


def test_serving_writes_the_prompt_training_wrote(tokenizer):
    """Engine.prompt_ids (the API) with tools equals the training rendering of the same conversation's prompt."""
    from tests.conftest import build_tiny_model

    engine = Engine(build_tiny_model(len(tokenizer)), tokenizer, ["<|im_end|>"])
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    training = ChatTemplate("own", tokenizer.chat_template).render(tokenizer, messages, [TOOL],
                                                                   add_generation_prompt=True)
    assert engine.prompt_ids(messages, [TOOL]) == tokenizer(training, add_special_tokens=False)["input_ids"]


def test_templates_with_their_own_tools_slot_keep_it(tokenizer):
    entry = next(e for e in builtin_templates().values() if uses_tools(e["jinja"]))
    template = ChatTemplate("builtin", entry["jinja"])
    text = template.render(tokenizer, [{"role": "user", "content": "hi"}], [TOOL])
    assert text.count('"get_weather"') == 1  # written once, by the template


def test_calls_are_read_back_in_the_forms_models_write_them():
    one = {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert parse_tool_calls(format_tool_calls([one])) == [one]
    two = [one, {"name": "get_weather", "arguments": {"city": "Oslo"}}]
    assert parse_tool_calls(format_tool_calls(two)) == two
    assert parse_tool_calls('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>') == [one]
    assert parse_tool_calls('```json\n{"name": "get_weather", "parameters": {"city": "Paris"}}\n```') == [one]
    assert parse_tool_calls('{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}') == [one]
    # ordinary answers stay answers
    assert parse_tool_calls("It is sunny.") is None
    assert parse_tool_calls('{"answer": 42}') is None
    assert parse_tool_calls('{"name": "other_tool", "arguments": {}}', {"get_weather"}) is None
    assert parse_tool_calls('{"name": "get_weather", "arguments": {') is None


def test_a_template_with_its_own_tool_format_is_served_as_trained(tokenizer):
    """LLaMA-Factory's qwen tool format: a call in the history (as the API passes it, the tool format's JSON)
    is written as Qwen's <tool_call> block by both training and serving, and several such blocks read back."""
    import copy

    from tests.conftest import build_tiny_model
    from tuneforge.data.template import LLAMAFACTORY_PREFIX, resolve_template

    tokenizer = copy.deepcopy(tokenizer)  # its chat template is replaced below
    template, _ = resolve_template(LLAMAFACTORY_PREFIX + "qwen", tokenizer)
    call = format_tool_calls([{"name": "get_weather", "arguments": {"city": "Paris"}}])
    messages = [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": call},
                {"role": "tool", "content": '{"sky": "sunny"}'}]
    training = template.render(tokenizer, messages, [TOOL], add_generation_prompt=True)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>' in training
    assert "<tool_response>\n{\"sky\": \"sunny\"}\n</tool_response>" in training
    tokenizer.chat_template = template.saved_jinja  # as a run saves it
    engine = Engine(build_tiny_model(len(tokenizer)), tokenizer, ["<|im_end|>"])
    assert engine.prompt_ids(messages, [TOOL]) == tokenizer(training, add_special_tokens=False)["input_ids"]
    two = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
           '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>')
    assert [c["arguments"]["city"] for c in parse_tool_calls(two, {"get_weather"})] == ["Paris", "Oslo"]
