"""LLaMA-Factory's templates, rendered as LLaMA-Factory renders them: token ids and loss labels from TuneForge's own
encoder equal those LLaMA-Factory 0.9.5's code produced (tests/assets/llamafactory_templates/references.json,
made by make_references.py with its own template and supervised-data code, on a tokenizer saved next to it)."""

from __future__ import annotations

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
# in prompts, or no end token after earlier answers): one-turn rows match, multi-turn rows are refused clearly
NOT_APPENDING = {"qwen3", "deepseekr1", "gpt_oss", "glm4", "chatglm3"}
CASES = [(name, case) for name, entry in REFERENCES["templates"].items() for case in entry["cases"]
         if "/nothink" not in case]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(ASSETS / "tokenizer"))
    assert len(loaded) == REFERENCES["tokenizer"]["vocab_size"]
    return loaded


def test_every_llamafactory_template_asked_for_is_there():
    names = set(REFERENCES["templates"])
    assert len(names) == 29 and REFERENCES["absent"] == ["qwen2_5"]  # LLaMA-Factory has no qwen2_5 (qwen covers it)
    table = builtin_templates()
    assert all(LLAMAFACTORY_PREFIX + n in table for n in names)
    assert table["qwen3"] is table[LLAMAFACTORY_PREFIX + "qwen3"]  # new names are usable bare
    assert table["qwen"] is not table[LLAMAFACTORY_PREFIX + "qwen"]  # TuneForge's own keep their names


@pytest.mark.parametrize("name,case", CASES)
def test_training_ids_and_labels_equal_llamafactorys(tokenizer, name, case):
    ref = REFERENCES["templates"][name]["cases"][case]
    template, _ = resolve_template(LLAMAFACTORY_PREFIX + name, tokenizer)
    example = Example("ref", ref["messages"])
    turns = sum(m["role"] == "assistant" for m in ref["messages"])
    if name in NOT_APPENDING and turns > 1:
        with pytest.raises(DataError, match="rewrites earlier turns when a turn is added"):
            encode_sft(example, tokenizer, template, 100_000)
        return
    encoded = encode_sft(example, tokenizer, template, 100_000)
    assert encoded.input_ids == ref["train"]["ids"]
    assert encoded.labels == ref["train"]["labels"]


@pytest.mark.parametrize("name,case", CASES)
def test_generation_prompts_equal_llamafactorys(tokenizer, name, case):
    ref = REFERENCES["templates"][name]["cases"][case]
    template, _ = resolve_template(LLAMAFACTORY_PREFIX + name, tokenizer)
    text = template.render(tokenizer, ref["messages"][:-1], add_generation_prompt=True)
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ref["generation"]["ids"]
    stop = REFERENCES["templates"][name]["stop_words"]
    assert set(stop) <= set(template.stop)
