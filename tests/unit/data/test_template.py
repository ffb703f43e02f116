import pytest

from tuneforge.data.template import ChatTemplate, builtin_templates, render_with_spans, resolve_template
from tuneforge.errors import ConfigError, DataError

CONVERSATION = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "q2"},
                {"role": "assistant", "content": "a2"}]

# Pinned renderings of CONVERSATION (eos_token is <|im_end|>, bos_token is <s> in the test tokenizer).
EXPECTED = {
    "chatml": "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
              "<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\na2<|im_end|>\n",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
              "hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nhello<|eot_id|><|start_header_id|>user"
              "<|end_header_id|>\n\nq2<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\na2<|eot_id|>",
    "gemma": "<s><start_of_turn>user\nS\n\nhi<end_of_turn>\n<start_of_turn>model\nhello<end_of_turn>\n"
             "<start_of_turn>user\nq2<end_of_turn>\n<start_of_turn>model\na2<end_of_turn>\n",
    "mistral": "<s>[INST] S\n\nhi [/INST]hello<|im_end|>[INST] q2 [/INST]a2<|im_end|>",
    "phi": "<|system|>\nS<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\nhello<|end|>\n<|user|>\nq2<|end|>\n"
           "<|assistant|>\na2<|end|>\n",
    "alpaca": "S\n\n### Instruction:\nhi\n\n### Response:\nhello<|im_end|>\n\n### Instruction:\nq2\n\n"
              "### Response:\na2<|im_end|>\n\n",
    "vicuna": "S USER: hi ASSISTANT:hello<|im_end|>USER: q2 ASSISTANT:a2<|im_end|>",
    "default": "S\nHuman: hi\nAssistant:hello<|im_end|>\nHuman: q2\nAssistant:a2<|im_end|>\n",
    "empty": "Shihello<|im_end|>q2a2<|im_end|>",
    "deepseek": "<s>S\n\nUser: hi\n\nAssistant: hello<|im_end|>User: q2\n\nAssistant: a2<|im_end|>",
    "deepseek3": "<s>S<｜User｜>hi<｜Assistant｜>hello<|im_end|><｜User｜>q2<｜Assistant｜>a2<|im_end|>",
    "glm4": "[gMASK]<sop><|system|>\nS<|user|>\nhi<|assistant|>\nhello<|im_end|><|user|>\nq2<|assistant|>\na2<|im_end|>",
    "qwen": "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
            "<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\na2<|im_end|>\n",
    "phi4": "<|im_start|>system<|im_sep|>S<|im_end|><|im_start|>user<|im_sep|>hi<|im_end|><|im_start|>assistant"
            "<|im_sep|>hello<|im_end|><|im_start|>user<|im_sep|>q2<|im_end|><|im_start|>assistant<|im_sep|>a2<|im_end|>",
}


# The tokens each template trains on, decoded: exactly every answer with the template's end-of-answer marker.
SUPERVISED = {
    "alpaca": ["hello<|im_end|>\n\n", "a2<|im_end|>\n\n"],
    "chatml": ["hello<|im_end|>\n", "a2<|im_end|>\n"],
    "deepseek": [" hello<|im_end|>", " a2<|im_end|>"],
    "deepseek3": ["hello<|im_end|>", "a2<|im_end|>"],
    "default": ["hello<|im_end|>\n", "a2<|im_end|>\n"],
    "empty": ["hello<|im_end|>", "a2<|im_end|>"],
    "gemma": ["hello<end_of_turn>\n", "a2<end_of_turn>\n"],
    "glm4": ["\nhello<|im_end|>", "\na2<|im_end|>"],
    "llama3": ["hello<|eot_id|>", "a2<|eot_id|>"],
    "mistral": ["hello<|im_end|>", "a2<|im_end|>"],
    "phi": ["hello<|end|>\n", "a2<|end|>\n"],
    "phi4": ["hello<|im_end|>", "a2<|im_end|>"],
    "qwen": ["hello<|im_end|>\n", "a2<|im_end|>\n"],
    "vicuna": ["hello<|im_end|>", "a2<|im_end|>"],
}


def supervised_runs(tokenizer, enc) -> list[str]:
    """The supervised stretches of an encoded row, decoded."""
    runs, current = [], []
    for token, label in zip(enc.input_ids, enc.labels):
        if label != -100:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return [tokenizer.decode(r) for r in runs + ([current] if current else [])]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_token_level_masks_of_every_builtin_template(tokenizer, name):
    from tuneforge.data.convert import Example
    from tuneforge.data.encode import encode_sft

    template, _ = resolve_template(name, tokenizer)
    row = Example("row", CONVERSATION)
    enc = encode_sft(row, tokenizer, template, 512)
    assert tokenizer.decode(enc.input_ids) == EXPECTED[name]
    assert supervised_runs(tokenizer, enc) == SUPERVISED[name]
    last_only = encode_sft(row, tokenizer, template, 512, mask_history=True)
    assert last_only.input_ids == enc.input_ids and supervised_runs(tokenizer, last_only) == SUPERVISED[name][-1:]
    everything = encode_sft(row, tokenizer, template, 512, train_on_prompt=True)
    assert everything.labels == everything.input_ids


def test_every_builtin_template_has_pinned_masks():
    assert set(SUPERVISED) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_template_renders_the_family_format(tokenizer, name):
    template, _ = resolve_template(name, tokenizer)
    text, spans = render_with_spans(template, tokenizer, CONVERSATION)
    assert text == EXPECTED[name]
    answers = [text[a:b] for a, b in spans]
    assert [a.lstrip(" \n").startswith(x) for a, x in zip(answers, ["hello", "a2"])] == [True, True]


def test_every_builtin_template_is_pinned():
    """TuneForge's own templates here; LLaMA-Factory's (llamafactory:NAME, and the names TuneForge lacks) are pinned
    against LLaMA-Factory's own renderings in test_llamafactory_templates.py."""
    from tuneforge.data.template import LLAMAFACTORY_PREFIX

    theirs = {n[len(LLAMAFACTORY_PREFIX):] for n in builtin_templates() if n.startswith(LLAMAFACTORY_PREFIX)}
    own = {n for n, entry in builtin_templates().items()
           if not n.startswith(LLAMAFACTORY_PREFIX) and entry is not builtin_templates().get(LLAMAFACTORY_PREFIX + n)}
    assert set(EXPECTED) | {"qwen2", "qwen2.5", "llama3.1", "llama3.2", "gemma2", "gemma3", "phi3", "smollm"} == own
    assert len(theirs) == 59  # the 29 asked for and 30 ported later (tests/assets/llamafactory_templates)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_generation_prompt_is_a_prefix_of_the_answered_conversation(tokenizer, name):
    template, _ = resolve_template(name, tokenizer)
    prompt = template.render(tokenizer, CONVERSATION[:2], add_generation_prompt=True)
    assert template.render(tokenizer, CONVERSATION[:3]).startswith(prompt)


def test_answer_spans_cover_answer_and_end_of_turn(tokenizer):
    template, _ = resolve_template("chatml", tokenizer)
    text, spans = render_with_spans(template, tokenizer, CONVERSATION)
    assert [text[a:b] for a, b in spans] == ["hello<|im_end|>\n", "a2<|im_end|>\n"]


def test_auto_uses_the_tokenizers_own_template_and_finds_its_stop_token(tokenizer):
    template, note = resolve_template("auto", tokenizer)
    assert note is None and template.jinja == tokenizer.chat_template
    assert template.stop == ("<|im_end|>",)


def test_auto_without_a_tokenizer_template_falls_back_to_empty_with_a_note(tokenizer):
    copy = __import__("copy").deepcopy(tokenizer)
    copy.chat_template = None
    template, note = resolve_template("auto", copy)
    assert template.name == "empty" and "has no chat template" in note


def test_tools_are_rendered_into_the_system_turn(tokenizer):
    template, _ = resolve_template("chatml", tokenizer)
    text = template.render(tokenizer, CONVERSATION[1:3], tools=[{"name": "add"}])
    assert text.startswith('<|im_start|>system\nYou can call these tools:\n[{"name": "add"}]<|im_end|>\n<|im_start|>user')


def test_unknown_template_name():
    with pytest.raises(ConfigError, match="unknown template 'chatlm'. did you mean .*chatml"):
        resolve_template("chatlm", None)


def test_template_that_rewrites_history_is_refused(tokenizer):
    # Drops all but the last answer (as some reasoning templates do with earlier thoughts): no prefix property.
    jinja = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}{{ m['role'] + ':' + m['content'] + '\\n' }}"
             "{% endif %}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    with pytest.raises(DataError, match="rewrites earlier turns"):
        render_with_spans(ChatTemplate("odd", jinja), tokenizer, CONVERSATION)
