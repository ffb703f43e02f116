"""LLaMA-Factory's templates, rendered as LLaMA-Factory renders them: token ids and loss labels from TuneForge's own
encoder equal those LLaMA-Factory 0.9.5's code produced (tests/assets/llamafactory_templates/references.json,
made by make_references.py with its own template and supervised-data code, on a tokenizer saved next to it)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tests.conftest import REPO
from tuneforge.data.convert import Example
from tuneforge.data.encode import encode_sft
from tuneforge.data.template import LLAMAFACTORY_PREFIX, builtin_templates, resolve_template
from tuneforge.errors import DataError

ASSETS = REPO / "tests" / "assets" / "llamafactory_templates"
REFERENCES = json.loads((ASSETS / "references.json").read_text(encoding="utf-8"))
# LLaMA-Factory's own renderings of these do not grow by appending turns (empty thought blocks in training but none
# in prompts, or no end token after earlier answers): their multi-turn rows are encoded turn by turn, as there
NOT_APPENDING = {"qwen3", "deepseekr1", "gpt_oss", "glm4", "chatglm3"}
CASES = [(name, case) for name, entry in REFERENCES["templates"].items() for case in entry["cases"]]


@pytest.fixture(scope="module")
def lf_tokenizer():
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(ASSETS / "tokenizer"))
    assert len(loaded) == REFERENCES["tokenizer"]["vocab_size"]
    return loaded


def test_every_llamafactory_template_asked_for_is_there():
    names = set(REFERENCES["templates"])
    assert len(names) == 59 and REFERENCES["absent"] == ["qwen2_5"]  # LLaMA-Factory has no qwen2_5 (qwen covers it)
    table = builtin_templates()
    assert all(LLAMAFACTORY_PREFIX + n in table for n in names)
    assert table["qwen3"] is table[LLAMAFACTORY_PREFIX + "qwen3"]  # new names are usable bare
    assert table["qwen"] is not table[LLAMAFACTORY_PREFIX + "qwen"]  # TuneForge's own keep their names


ROLES = {"function": "assistant", "observation": "tool"}  # LLaMA-Factory's tool roles, as TuneForge reads them


def tuneforge_messages(messages: list[dict]) -> list[dict]:
    return [{"role": ROLES.get(m["role"], m["role"]), "content": m["content"]} for m in messages]


def freeze_date(monkeypatch, ref: dict) -> None:
    """Llama 3's tool text carries the day it is rendered ("Today Date: 29 Nov 2026" in the reference): rendering
    happens on that day here too (transformers' strftime_now reads the module's datetime)."""
    import datetime as real
    import re

    import transformers.utils.chat_template_utils as chat

    found = re.search(r"Today Date: (\d\d \w{3} \d{4})", ref.get("train", {}).get("text", ""))
    if found:
        day = real.datetime.strptime(found.group(1), "%d %b %Y")
        monkeypatch.setattr(chat, "datetime", type("Frozen", (), {"now": staticmethod(lambda: day)}))


def has_tool_format(name: str) -> bool:
    return bool(builtin_templates()[LLAMAFACTORY_PREFIX + name].get("tool_format"))


@pytest.mark.parametrize("name,case", CASES)
def test_training_ids_and_labels_equal_llamafactorys(lf_tokenizer, name, case, monkeypatch):
    tokenizer = lf_tokenizer
    ref = REFERENCES["templates"][name]["cases"][case]
    freeze_date(monkeypatch, ref)
    template, _ = resolve_template(LLAMAFACTORY_PREFIX + name, tokenizer)
    template = dataclasses.replace(template, thinking=ref.get("enable_thinking", True))
    example = Example("ref", tuneforge_messages(ref["messages"]), tools=json.dumps(ref["tools"]) if "tools" in ref
                      else None)
    if "tools" in ref and not (has_tool_format(name) and "refused" not in ref):
        with pytest.raises(DataError):  # said clearly, never trained in another format than LLaMA-Factory's
            encode_sft(example, tokenizer, template, 100_000)
        return
    encoded = encode_sft(example, tokenizer, template, 100_000)
    assert encoded.input_ids == ref["train"]["ids"]
    assert encoded.labels == ref["train"]["labels"]


@pytest.mark.parametrize("name,case", CASES)
def test_generation_prompts_equal_llamafactorys(lf_tokenizer, name, case, monkeypatch):
    tokenizer = lf_tokenizer
    ref = REFERENCES["templates"][name]["cases"][case]
    freeze_date(monkeypatch, ref)
    template, _ = resolve_template(LLAMAFACTORY_PREFIX + name, tokenizer)
    template = dataclasses.replace(template, thinking=ref.get("enable_thinking", True))
    if "tools" in ref and not (has_tool_format(name) and "refused" not in ref):
        return  # refused in training (above)
    text = template.render(tokenizer, tuneforge_messages(ref["messages"][:-1]), ref.get("tools"),
                           add_generation_prompt=True)
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ref["generation"]["ids"]
    stop = REFERENCES["templates"][name]["stop_words"]
    assert set(stop) <= set(template.stop)


def test_templates_that_rewrite_earlier_turns_are_compared_on_multi_turn_rows():
    for name in NOT_APPENDING:
        turns = [sum(m["role"] == "assistant" for m in REFERENCES["templates"][name]["cases"][case]["messages"])
                 for n, case in CASES if n == name]
        assert max(turns) >= 3, name


def test_thinking_turned_off_is_trained_and_saved_with_the_run(tiny_config):
    """data.enable_thinking: false (LLaMA-Factory's key): rows get the empty thought in the prompt, not in the
    answer, and the chat template saved with the run keeps answering without thoughts."""
    from tuneforge.config import load_config
    from tuneforge.train.prepare import prepare

    raw = {**tiny_config, "model": {**tiny_config["model"], "template": "llamafactory:qwen3"},
           "data": {**tiny_config["data"], "enable_thinking": False}}
    prepared = prepare(load_config(raw))
    tokenizer = prepared.tokenizer
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                           tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    row = prepared.data.train[0]
    ids, labels = row["input_ids"], row["labels"]
    answer = tokenizer.decode([i for i, label in zip(ids, labels) if label != -100])
    assert "<think>" not in answer and "<think>" in tokenizer.decode(ids)
    thinking = prepare(load_config({**raw, "data": {**raw["data"], "enable_thinking": True}}))
    row = thinking.data.train[0]
    assert "<think>" in thinking.tokenizer.decode([i for i, label in zip(row["input_ids"], row["labels"])
                                                   if label != -100])  # supervised, as LLaMA-Factory does


@pytest.mark.parametrize("key", sorted(REFERENCES["pairs"]))
def test_preference_pairs_are_cut_as_llamafactory_cuts_them(lf_tokenizer, key):
    """data.overlong: split on rm/dpo rows: the prompt and the longer answer share cutoff_len by infer_seqlen, as
    LLaMA-Factory's PairwiseDatasetProcessor does (the 400-token case is not cut at all)."""
    from tuneforge.data.encode import encode_pair

    ref = REFERENCES["pairs"][key]
    template, _ = resolve_template(LLAMAFACTORY_PREFIX + key.split("/")[0], lf_tokenizer)
    example = Example("ref", ref["messages"], chosen=ref["chosen"], rejected=ref["rejected"])
    pair = encode_pair(example, lf_tokenizer, template, ref["cutoff_len"], overlong="split")
    assert pair.chosen.input_ids == ref["chosen_ids"] and pair.chosen.labels == ref["chosen_labels"]
    assert pair.rejected.input_ids == ref["rejected_ids"] and pair.rejected.labels == ref["rejected_labels"]
    assert pair.chosen.truncated == (ref["cutoff_len"] < 400)


@pytest.mark.parametrize("key", sorted(REFERENCES["feedback"]))
def test_kto_rows_are_cut_as_llamafactory_cuts_them(lf_tokenizer, key):
    """data.overlong: split on KTO rows: the answer and the mismatched (KL) answer, each with the prompt, cut by
    infer_seqlen as LLaMA-Factory's FeedbackDatasetProcessor does."""
    from tuneforge.data.encode import encode_last_answer_split

    ref = REFERENCES["feedback"][key]
    template, _ = resolve_template(LLAMAFACTORY_PREFIX + key.split("/")[0], lf_tokenizer)
    for answer, ids, labels in ((ref["answer"], "ids", "labels"), (ref["kl_answer"], "kl_ids", "kl_labels")):
        example = Example("ref", ref["messages"] + [{"role": "assistant", "content": answer}])
        encoded = encode_last_answer_split(example, lf_tokenizer, template, ref["cutoff_len"])
        assert encoded.input_ids == ref[ids] and encoded.labels == ref[labels]


def test_reasoning_templates_refuse_mask_history_rather_than_differ(tiny_config):
    """LLaMA-Factory drops earlier thoughts under mask_history; until TuneForge does too, the combination is refused."""
    from tuneforge.config import load_config
    from tuneforge.errors import ConfigError
    from tuneforge.train.prepare import prepare

    raw = {**tiny_config, "model": {**tiny_config["model"], "template": "llamafactory:qwen3"},
           "data": {**tiny_config["data"], "mask_history": True}}
    with pytest.raises(ConfigError, match="data.mask_history with template llamafactory:qwen3"):
        prepare(load_config(raw))
