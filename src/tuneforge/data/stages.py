"""Tokenization per training stage: examples -> TokenizedData columns, plus counts of what was dropped.

sft: `input_ids`, `labels`. pt: blocks of `input_ids` (= `labels`). rm/dpo: chosen/rejected pairs sharing one
prompt. kto: answers with a desirable flag and a mismatched answer for the KL estimate. ppo: prompts only.
"""

from __future__ import annotations

from collections import Counter

from tuneforge.config.schema import DataConfig
from tuneforge.data.convert import Example
from tuneforge.data.encode import (Overlong, Unusable, encode_last_answer_split, encode_pair, encode_pretrain,
                                    encode_sft)
from tuneforge.data.template import ChatTemplate, parse_tools
from tuneforge.data.tokenized import TokenizedData


def _dropped(why: Unusable, cfg: DataConfig) -> str:
    """The reason a row is left out; only rows too long for cutoff_len get the hint about length."""
    if isinstance(why, Overlong):
        return f"{why} (cutoff_len={cfg.cutoff_len}; raise it or set data.overlong)"
    return str(why)


def tokenize_sft(examples: list[Example], tokenizer, template: ChatTemplate, cfg: DataConfig):
    ids, labels, dropped, truncated = [], [], Counter(), 0
    for example in examples:
        try:
            enc = encode_sft(example, tokenizer, template, cfg.cutoff_len, train_on_prompt=cfg.train_on_prompt,
                             mask_history=cfg.mask_history, overlong=cfg.overlong)
        except Unusable as why:
            dropped[_dropped(why, cfg)] += 1
            continue
        if all(y == -100 for y in enc.labels):
            dropped["no answer tokens left to learn from"] += 1
            continue
        truncated += enc.truncated
        ids.append(enc.input_ids)
        labels.append(enc.labels)
    return TokenizedData.of(input_ids=ids, labels=labels), dropped, truncated


def tokenize_pt(examples: list[Example], tokenizer, template: ChatTemplate, cfg: DataConfig):
    blocks, _ = encode_pretrain([e.text for e in examples], tokenizer, cfg.cutoff_len)
    return TokenizedData.of(input_ids=blocks, labels=blocks), Counter(), 0


def tokenize_pairs(examples: list[Example], tokenizer, template: ChatTemplate, cfg: DataConfig):
    columns = {k: [] for k in ("chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels")}
    dropped, truncated = Counter(), 0
    for example in examples:
        try:
            pair = encode_pair(example, tokenizer, template, cfg.cutoff_len, cfg.overlong)
        except Unusable as why:
            dropped[_dropped(why, cfg)] += 1
            continue
        truncated += pair.chosen.truncated
        columns["chosen_ids"].append(pair.chosen.input_ids)
        columns["chosen_labels"].append(pair.chosen.labels)
        columns["rejected_ids"].append(pair.rejected.input_ids)
        columns["rejected_labels"].append(pair.rejected.labels)
    return TokenizedData.of(**columns), dropped, truncated


def tokenize_kto(examples: list[Example], tokenizer, template: ChatTemplate, cfg: DataConfig):
    columns = {k: [] for k in ("ids", "labels", "kl_ids", "kl_labels", "desirable")}
    dropped, truncated = Counter(), 0
    for i, example in enumerate(examples):
        other = examples[i - 1]  # a mismatched answer, the previous row's (as TRL and LLaMA-Factory pair them)
        mismatched = Example(example.where, example.messages[:-1] + [other.messages[-1]], example.tools)
        try:
            if cfg.overlong == "split":  # LLaMA-Factory's feedback processor: prompt and answer share cutoff_len
                enc = encode_last_answer_split(example, tokenizer, template, cfg.cutoff_len)
                kl = encode_last_answer_split(mismatched, tokenizer, template, cfg.cutoff_len)
            else:
                enc = encode_sft(example, tokenizer, template, cfg.cutoff_len, mask_history=True,
                                 overlong=cfg.overlong)
                kl = encode_sft(mismatched, tokenizer, template, cfg.cutoff_len, mask_history=True,
                                overlong="truncate_answer")
        except Unusable as why:
            dropped[_dropped(why, cfg)] += 1
            continue
        truncated += enc.truncated
        columns["ids"].append(enc.input_ids)
        columns["labels"].append(enc.labels)
        columns["kl_ids"].append(kl.input_ids)
        columns["kl_labels"].append(kl.labels)
        columns["desirable"].append([int(bool(example.kto_tag))])
    return TokenizedData.of(**columns), dropped, truncated


def tokenize_prompts(examples: list[Example], tokenizer, template: ChatTemplate, cfg: DataConfig):
    """PPO: the conversation up to its last user turn, with the generation prompt, shortened to half the cutoff
    (the other half is for the answer)."""
    prompts, dropped = [], Counter()
    for example in examples:
        messages = example.messages[:-1] if example.messages[-1]["role"] == "assistant" else example.messages
        text = template.render(tokenizer, messages, parse_tools(example.tools), add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > cfg.cutoff_len // 2:
            dropped[f"prompt longer than cutoff_len / 2 (cutoff_len={cfg.cutoff_len})"] += 1
            continue
        prompts.append(ids)
    return TokenizedData.of(prompt_ids=prompts), dropped, 0


STAGE_TOKENIZERS = {"sft": tokenize_sft, "pt": tokenize_pt, "rm": tokenize_pairs, "dpo": tokenize_pairs,
                    "kto": tokenize_kto, "ppo": tokenize_prompts}
