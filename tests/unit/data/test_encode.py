import pytest

from tuneforge.data.convert import Example
from tuneforge.data.encode import IGNORE, Overlong, _water_level, encode_pretrain, encode_sft
from tuneforge.data.template import ChatTemplate, resolve_template


def example(*turns, system=None):
    messages = ([{"role": "system", "content": system}] if system else [])
    roles = ["user", "assistant"]
    messages += [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]
    return Example("test row 1", messages)


def supervised_text(tokenizer, enc):
    return tokenizer.decode([y for y in enc.labels if y != IGNORE])


def test_tokens_equal_apply_chat_template_and_labels_cover_answers_only(tokenizer):
    template, _ = resolve_template("auto", tokenizer)
    ex = example("Hello world", "Hi there", "More?", "Yes.")
    enc = encode_sft(ex, tokenizer, template, 512)
    assert enc.input_ids == tokenizer.apply_chat_template(ex.messages, tokenize=True, return_dict=False)
    assert supervised_text(tokenizer, enc) == "Hi there<|im_end|>\nYes.<|im_end|>\n"
    # exact mask: prompt positions are -100, answer positions carry their own ids
    prompt_len = len(tokenizer.apply_chat_template(ex.messages[:1], add_generation_prompt=True, return_dict=False))
    answer_len = len(tokenizer("Hi there<|im_end|>\n", add_special_tokens=False)["input_ids"])
    assert enc.labels[:prompt_len] == [IGNORE] * prompt_len
    assert enc.labels[prompt_len:prompt_len + answer_len] == enc.input_ids[prompt_len:prompt_len + answer_len]
    assert enc.labels[prompt_len + answer_len] == IGNORE


def test_mask_history_and_train_on_prompt(tokenizer):
    template, _ = resolve_template("chatml", tokenizer)
    ex = example("Hello world", "Hi there", "More?", "Yes.")
    last_only = encode_sft(ex, tokenizer, template, 512, mask_history=True)
    assert supervised_text(tokenizer, last_only) == "Yes.<|im_end|>\n"
    everything = encode_sft(ex, tokenizer, template, 512, train_on_prompt=True)
    assert everything.labels == everything.input_ids


def test_long_prompts_are_shortened_and_the_answer_and_header_survive(tokenizer):
    template, _ = resolve_template("chatml", tokenizer)
    long_review = "This product is good but the delivery was very slow and the box was damaged. " * 20
    ex = example(long_review, "0")
    full = encode_sft(ex, tokenizer, template, 4096)
    enc = encode_sft(ex, tokenizer, template, 64)
    assert len(full.input_ids) > 64 >= len(enc.input_ids) >= 60 and enc.truncated
    text = tokenizer.decode(enc.input_ids)
    assert text.startswith("<|im_start|>user\nThis product is good")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n0<|im_end|>\n")
    assert supervised_text(tokenizer, enc) == "0<|im_end|>\n"


def test_longest_prompt_content_shrinks_first(tokenizer):
    template, _ = resolve_template("chatml", tokenizer)
    short_system, long_user = "Answer with a number.", "word " * 200
    enc = encode_sft(example(long_user, "1", system=short_system), tokenizer, template, 96)
    text = tokenizer.decode(enc.input_ids)
    assert "<|im_start|>system\nAnswer with a number.<|im_end|>" in text  # the short one is untouched
    assert len(enc.input_ids) <= 96


def test_answers_that_cannot_fit_are_dropped_or_cut_by_policy(tokenizer):
    template, _ = resolve_template("chatml", tokenizer)
    ex = example("Tell me a story.", "Once upon a time there was a tokenizer. " * 30)
    with pytest.raises(Overlong, match="answers longer than cutoff_len"):
        encode_sft(ex, tokenizer, template, 48)
    cut = encode_sft(ex, tokenizer, template, 48, overlong="truncate_answer")
    assert len(cut.input_ids) <= 48 and cut.truncated
    assert tokenizer.decode(cut.input_ids).endswith("<|im_end|>\n")


def test_water_level():
    assert _water_level([10, 50, 100], 60) == 45  # 100->45 (55) and 50->45 (5)
    assert _water_level([10, 10], 5) == 7
    assert _water_level([3], 3) == 0


def test_pretraining_joins_documents_with_eos_and_cuts_blocks(tokenizer):
    docs = ["first document here", "second one", "third"]
    blocks, n_tokens = encode_pretrain(docs, tokenizer, 4)
    stream = [t for b in blocks for t in b]
    assert n_tokens == len(stream) and all(len(b) == 4 for b in blocks[:-1]) and 0 < len(blocks[-1]) <= 4
    assert stream.count(tokenizer.eos_token_id) == 3
    assert tokenizer.decode(stream) == "first document here<|im_end|>second one<|im_end|>third<|im_end|>"


def test_preference_pair_shares_one_prompt_and_masks_only_the_final_answer(tokenizer):
    from tuneforge.data.encode import encode_pair

    template, _ = resolve_template("chatml", tokenizer)
    ex = Example("row", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                         {"role": "user", "content": "Rate this " + "very " * 60 + "long text."}],
                 chosen="Good answer.", rejected="A much longer and worse answer that rambles on and on.")
    pair = encode_pair(ex, tokenizer, template, 64)
    assert supervised_text(tokenizer, pair.chosen) == "Good answer.<|im_end|>\n"
    assert supervised_text(tokenizer, pair.rejected) == "A much longer and worse answer that rambles on and on.<|im_end|>\n"
    first_answer = lambda enc: [i for i, y in enumerate(enc.labels) if y != IGNORE][0]  # noqa: E731
    assert pair.chosen.input_ids[:first_answer(pair.chosen)] == pair.rejected.input_ids[:first_answer(pair.rejected)]
    assert len(pair.rejected.input_ids) <= 64 and pair.chosen.truncated and pair.rejected.truncated


def test_cut_answers_of_a_pair_both_fit_cutoff_len(tokenizer):
    """With answer truncation the longer answer is cut; the other one, if it is now the longer, is cut as far."""
    from tuneforge.data.encode import encode_pair

    template, _ = resolve_template("chatml", tokenizer)
    ex = Example("row", [{"role": "user", "content": "Write something."}],
                 chosen="word " * 120, rejected="other " * 90)
    pair = encode_pair(ex, tokenizer, template, 64, overlong="truncate_answer")
    assert len(pair.chosen.input_ids) <= 64 and len(pair.rejected.input_ids) <= 64
    assert pair.chosen.truncated and pair.rejected.truncated
    first_answer = lambda enc: [i for i, y in enumerate(enc.labels) if y != IGNORE][0]  # noqa: E731
    assert pair.chosen.input_ids[:first_answer(pair.chosen)] == pair.rejected.input_ids[:first_answer(pair.rejected)]


def test_only_rows_that_are_too_long_get_the_cutoff_hint(tokenizer):
    from tuneforge.config import DataConfig
    from tuneforge.data.stages import tokenize_pairs, tokenize_sft

    template, _ = resolve_template("chatml", tokenizer)
    cfg = DataConfig(dataset="x", cutoff_len=32)
    no_answer = Example("row 1", [{"role": "user", "content": "Only a question"}])
    too_long = example("Question", "answer " * 100)
    _, dropped, _ = tokenize_sft([no_answer, too_long], tokenizer, template, cfg)
    assert dropped == {"the conversation does not end with an answer": 1,
                       "answers longer than cutoff_len (cutoff_len=32; raise it or set data.overlong)": 1}
    answered = Example("row 2", example("q", "a").messages, chosen="yes", rejected="no")
    _, dropped, _ = tokenize_pairs([answered], tokenizer, template, cfg)
    assert dropped == {"a preference row needs a prompt that ends with a user turn": 1}


def test_split_truncation_follows_llamafactorys_infer_seqlen(tokenizer):
    """overlong: split. infer_seqlen against the values LLaMA-Factory 0.9.5's own `infer_seqlen` printed for
    budgets 2048 and 256, then a long two-turn conversation: each turn's prompt and answer tokens are cut by that
    rule from what is left."""
    from tuneforge.data.encode import infer_seqlen

    reference = {(3000, 500): [(1548, 500), (220, 36)], (500, 3000): [(500, 1548), (37, 219)],
                 (1500, 1500): [(1024, 1024), (128, 128)], (1500, 1100): [(1182, 866), (148, 108)],
                 (100, 200): [(100, 200), (100, 156)], (4000, 4000): [(1024, 1024), (128, 128)],
                 (250, 20): [(250, 20), (236, 20)], (10, 400): [(10, 400), (10, 246)],
                 (301, 255): [(301, 255), (139, 117)]}
    for (s, t), expected in reference.items():
        assert [infer_seqlen(s, t, 2048), infer_seqlen(s, t, 256)] == expected
    template = ChatTemplate("own", tokenizer.chat_template)
    long_q, long_a = "word " * 300, "answer " * 200
    messages = [{"role": "user", "content": long_q}, {"role": "assistant", "content": long_a},
                {"role": "user", "content": "short"}, {"role": "assistant", "content": "ok"}]
    full = encode_sft(Example("r", messages), tokenizer, template, 10_000)
    cut = encode_sft(Example("r", messages), tokenizer, template, 256, overlong="split")
    assert cut.truncated and len(cut.input_ids) <= 256
    # by hand: the first turn's prompt (up to the first answer) and answer, split by the rule over 256 tokens
    first_answer = full.labels.index(next(x for x in full.labels if x != -100))
    answer_end = next(j for j in range(first_answer, len(full.labels)) if full.labels[j] == -100)
    n_source, n_target = infer_seqlen(first_answer, answer_end - first_answer, 256)
    assert cut.input_ids[:n_source] == full.input_ids[:n_source]
    assert cut.input_ids[n_source: n_source + n_target] == full.input_ids[first_answer: first_answer + n_target]
    assert cut.labels[:n_source] == [-100] * n_source and -100 not in cut.labels[n_source: n_source + n_target]
    assert len(cut.input_ids) == n_source + n_target == 256  # nothing left for the second turn
