import pytest

from tuneforge.data.convert import convert_rows
from tuneforge.data.readers import RawRow
from tuneforge.data.registry import OPENAI_TAGS, DatasetSpec
from tuneforge.errors import DataError


def rows(*dicts):
    return [RawRow("data/chat.json", i, d) for i, d in enumerate(dicts, 1)]


def test_alpaca_with_system_history_and_input():
    spec = DatasetSpec(name="a", columns={"system": "system", "history": "history"})
    row = {"instruction": "Translate", "input": "hello", "output": "bonjour", "system": "Be brief.",
           "history": [["hi", "salut"]]}
    (example,) = convert_rows(spec, rows(row)).examples
    assert example.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "salut"},
        {"role": "user", "content": "Translate\nhello"}, {"role": "assistant", "content": "bonjour"}]
    assert example.where == "data/chat.json row 1"


def test_numeric_labels_become_text():
    (example,) = convert_rows(DatasetSpec(name="a"), rows({"instruction": "review", "output": 1})).examples
    assert example.messages[-1] == {"role": "assistant", "content": "1"}


def test_sharegpt_maps_roles_and_takes_the_leading_system_message():
    spec = DatasetSpec(name="s", formatting="sharegpt")
    turns = [{"from": "system", "value": "S"}, {"from": "human", "value": "q"}, {"from": "function_call", "value": "{}"},
             {"from": "observation", "value": "r"}, {"from": "gpt", "value": "a"}]
    (example,) = convert_rows(spec, rows({"conversations": turns})).examples
    assert [m["role"] for m in example.messages] == ["system", "user", "assistant", "tool", "assistant"]


def test_wrong_role_names_row_field_and_fix():
    spec = DatasetSpec(name="s", formatting="sharegpt", columns={"messages": "messages"}, tags=OPENAI_TAGS)
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                        {"role": "user", "content": "q"}, {"role": "gpt", "content": "a"}]}
    conversion = convert_rows(spec, rows({"messages": [{"role": "user", "content": "ok"}]}, bad))
    assert conversion.bad_rows == [
        "data/chat.json row 2: messages[3].role is 'gpt'; expected user|tool|assistant|function_call|system. "
        "hint: these are sharegpt roles: remove the tags from dataset_info.json so the from/value defaults apply"]


def test_turns_must_alternate():
    spec = DatasetSpec(name="s", formatting="sharegpt")
    turns = [{"from": "human", "value": "q"}, {"from": "human", "value": "q2"}]
    (bad,) = convert_rows(spec, rows({"conversations": turns})).bad_rows
    assert bad.startswith("data/chat.json row 1: conversations[1].from is 'human' but turns must alternate")


def test_a_column_missing_from_every_row_is_a_registry_error():
    spec = DatasetSpec(name="reviews", columns={"prompt": "text", "response": "label"})
    with pytest.raises(DataError, match=r"column 'label' \(columns.response\) is in none of the rows; "
                                        r"their keys are \['review', 'text'\]"):
        convert_rows(spec, rows({"text": "good", "review": 1}))


def test_empty_answers_and_prompts_are_counted_not_silently_dropped():
    conversion = convert_rows(DatasetSpec(name="a"), rows(
        {"instruction": "q", "output": ""}, {"instruction": "", "output": "a"}, {"instruction": "q", "output": "a"}))
    assert len(conversion.examples) == 1
    assert conversion.dropped == {"empty answer": 1, "empty prompt": 1}


def test_placeholders_and_default_system_fill_every_row():
    conversion = convert_rows(DatasetSpec(name="identity"),
                              rows({"instruction": "who", "output": "I am {{name}} by {{ author }}, {{other}}."}),
                              placeholders={"name": "Tiny", "author": "Tests"}, default_system="Be kind.")
    assert conversion.examples[0].messages == [
        {"role": "system", "content": "Be kind."}, {"role": "user", "content": "who"},
        {"role": "assistant", "content": "I am Tiny by Tests, {{other}}."}]


def test_kto_tags_must_be_booleans():
    spec = DatasetSpec(name="k", columns={"kto_tag": "label"})
    conversion = convert_rows(spec, rows({"instruction": "q", "output": "a", "label": "yes"}))
    assert conversion.bad_rows == ["data/chat.json row 1: label should be true or false, got 'yes'"]


def test_wrong_types_are_bad_rows():
    conversion = convert_rows(DatasetSpec(name="a"), rows({"instruction": ["q"], "output": "a"}, ["not", "a", "row"]))
    assert conversion.bad_rows == [
        "data/chat.json row 1: instruction should be text, got list ['q']",
        "data/chat.json row 2: expected an object with named columns, got ['not', 'a', 'row']"]


def test_openai_formatting_reads_messages_tool_calls_and_tool_results():
    """`"formatting": "openai"` (LLaMA-Factory's name): OpenAI messages; an assistant's tool_calls become the answer
    in the tool format, exactly what the same conversation in glaive_toolcall's sharegpt layout gives."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}
    openai_row = {"messages": [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Weather in Paris?"},
                               {"role": "assistant", "content": None, "tool_calls": [call]},
                               {"role": "tool", "content": "{\"temperature\": 22}"},
                               {"role": "assistant", "content": "It is 22 degrees."}],
                  "tools": "[{\"name\": \"get_weather\"}]"}
    spec = DatasetSpec.model_validate({"name": "o", "formatting": "openai", "columns": {"tools": "tools"}})
    assert spec.columns.messages == "messages" and spec.tags.role_tag == "role"
    got = convert_rows(spec, rows(openai_row)).examples[0]
    sharegpt = DatasetSpec.model_validate({"name": "g", "formatting": "sharegpt",
                                           "columns": {"messages": "conversations", "system": "system", "tools": "tools"}})
    glaive = convert_rows(sharegpt, rows({
        "conversations": [{"from": "human", "value": "Weather in Paris?"},
                          {"from": "function_call", "value": "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}"},
                          {"from": "observation", "value": "{\"temperature\": 22}"},
                          {"from": "gpt", "value": "It is 22 degrees."}],
        "system": "Be brief.", "tools": "[{\"name\": \"get_weather\"}]"})).examples[0]
    assert got.messages == glaive.messages and got.tools == glaive.tools
    bad = dict(openai_row, messages=openai_row["messages"][:2] + [{"role": "assistant", "tool_calls": [{"function": {}}]}])
    problems = convert_rows(spec, rows(bad)).bad_rows
    assert len(problems) == 1 and "data/chat.json row 1: messages[2].tool_calls[0] should be" in problems[0]
