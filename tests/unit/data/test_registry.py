import json

import pytest

from tests.conftest import LLAMAFACTORY_DATA as LLAMAFACTORY, REPO
from tuneforge.data.convert import convert_rows
from tuneforge.data.readers import read_rows
from tuneforge.data.registry import load_registry, resolve_dataset, spec_for_file
from tuneforge.errors import DataError


# Rows in each demo file of LLaMA-Factory's data/ folder (counted with json.load / wc -l).
EXPECTED_ROWS = {"identity": 91, "alpaca_en_demo": 999, "alpaca_zh_demo": 1000, "glaive_toolcall_en_demo": 300,
                 "glaive_toolcall_zh_demo": 300, "dpo_en_demo": 300, "dpo_zh_demo": 300, "kto_en_demo": 300,
                 "wiki_demo": 30, "c4_demo": 300}


@pytest.mark.parametrize("name", sorted(EXPECTED_ROWS))
def test_every_llamafactory_demo_set_loads_with_its_row_count(name):
    spec = load_registry(LLAMAFACTORY)[name]
    conversion = convert_rows(spec, read_rows(spec))
    assert len(conversion.examples) == EXPECTED_ROWS[name]
    assert not conversion.bad_rows and not conversion.dropped


def test_llamafactory_registry_parses_every_entry_including_hub_ones():
    registry = load_registry(LLAMAFACTORY)
    assert len(registry) == len(json.loads((LLAMAFACTORY / "dataset_info.json").read_text()))
    assert registry["alpaca_en"].hf_hub_url == "llamafactory/alpaca_en"
    assert registry["kto_en_demo"].columns.kto_tag == "label"


def test_registered_file_that_is_missing_says_where_it_looked():
    spec = load_registry(LLAMAFACTORY)["mllm_demo"]
    with pytest.raises(DataError, match=r"data set 'mllm_demo': file .*mllm_demo.json does not exist"):
        read_rows(spec)


def test_demo_contents_convert_to_the_expected_conversations():
    reg = load_registry(LLAMAFACTORY)
    glaive = convert_rows(reg["glaive_toolcall_en_demo"], read_rows(reg["glaive_toolcall_en_demo"])).examples[0]
    assert [m["role"] for m in glaive.messages][:4] == ["user", "assistant", "user", "assistant"]
    assert glaive.tools and json.loads(glaive.tools)
    dpo = convert_rows(reg["dpo_en_demo"], read_rows(reg["dpo_en_demo"])).examples[0]
    assert dpo.chosen.startswith("That sounds like a fun") and dpo.rejected
    kto = convert_rows(reg["kto_en_demo"], read_rows(reg["kto_en_demo"])).examples
    assert {e.kto_tag for e in kto} == {True, False}


def test_project_registry_ships_identity_and_alpaca():
    registry = load_registry(REPO / "data")
    assert {"identity", "alpaca_en_demo", "alpaca_zh_demo", "c4_demo", "wiki_demo"} <= set(registry)


def test_unknown_name_suggests_close_names():
    with pytest.raises(DataError, match="did you mean identity"):
        resolve_dataset("identiti", REPO / "data")


def test_missing_registry_explains_dataset_dir(tmp_path):
    with pytest.raises(DataError, match="no dataset_info.json here. hint: set data.dataset_dir"):
        load_registry(tmp_path)


def test_a_malformed_registry_entry_is_reported_only_where_it_is_used(tmp_path):
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "a": {"file_name": "a.json", "formating": "sharegpt", "ranking": "maybe"},
        "good": {"file_name": "good.json"}, "odd": "not an object"}))
    registry = load_registry(tmp_path)
    assert registry["good"].file_name == "good.json"  # the broken neighbours do not block it
    with pytest.raises(DataError) as info:
        resolve_dataset("a", tmp_path)
    assert len(info.value.problems) == 2  # every problem of the entry at once
    assert any("a.formating: Extra inputs are not permitted" in p for p in info.value.problems)
    with pytest.raises(DataError, match="odd: expected an object with file_name or hf_hub_url"):
        resolve_dataset("odd", tmp_path)


@pytest.mark.parametrize("rows, formatting, role_tag", [
    ([{"instruction": "q", "output": "a"}], "alpaca", "from"),
    ([{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}], "sharegpt", "from"),
    ([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}], "sharegpt", "role"),
])
def test_a_bare_file_gets_its_format_detected(tmp_path, rows, formatting, role_tag):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    spec = resolve_dataset(str(path), tmp_path / "no-registry-needed")
    assert spec.formatting == formatting and spec.tags.role_tag == role_tag
    examples = convert_rows(spec, read_rows(spec)).examples
    assert examples[0].messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def test_text_with_a_label_column_is_a_labelled_task(tmp_path):
    path = tmp_path / "reviews.jsonl"
    path.write_text('{"text": "很好", "label": 1}\n{"text": "太差", "label": 0}\n')
    spec = resolve_dataset(str(path), tmp_path)
    assert not spec.is_text_only
    assert [e.messages for e in convert_rows(spec, read_rows(spec)).examples][1] == [
        {"role": "user", "content": "太差"}, {"role": "assistant", "content": "0"}]


def test_text_file_is_plain_text(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("one\ntwo\n")
    assert spec_for_file(path).is_text_only
