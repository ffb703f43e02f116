"""Compare src/tuneforge/data/templates_llamafactory.yaml with LLaMA-Factory's renderings in references.json.

Run with TuneForge's environment (needs only transformers and PyYAML):

    .venv/bin/python tests/assets/llamafactory_templates/check_templates.py [TEMPLATE ...]

For every template and case it renders the conversation with tokenizer.apply_chat_template (the call TuneForge's
ChatTemplate.render makes; `enable_thinking=False` is passed for the cases recorded with it), tokenizes the string
with add_special_tokens=False and compares the ids with LLaMA-Factory's, for the training sequence and for the
generation prompt. It also reports whether the renderings grow by appending turns (what TuneForge needs to place
answer spans) and, where they do, whether the answer tokens TuneForge would train on are the tokens LLaMA-Factory
labels. Exit status 1 when any id comparison fails.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
YAML_PATH = REPO / "src" / "tuneforge" / "data" / "templates_llamafactory.yaml"
IGNORE = -100


def load():
    from transformers import AutoTokenizer

    refs = json.loads((HERE / "references.json").read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(str(HERE / refs["tokenizer"]["path"]))
    if len(tokenizer) != refs["tokenizer"]["vocab_size"]:
        raise SystemExit(f"tokenizer has {len(tokenizer)} tokens, references were made with "
                         f"{refs['tokenizer']['vocab_size']}")
    table = yaml.safe_load(YAML_PATH.read_text(encoding="utf-8"))
    return refs, tokenizer, table


def render(tokenizer, jinja, messages, add_generation_prompt, extra):
    return tokenizer.apply_chat_template(messages, tools=None, chat_template=jinja,
                                         add_generation_prompt=add_generation_prompt, tokenize=False, **extra)


def answer_labels(tokenizer, jinja, messages, extra):
    """TuneForge's labels (as data/encode.py makes them): answer spans from prefix differences, mapped to tokens by
    offsets. None when the renderings do not grow by appending turns."""
    full = render(tokenizer, jinja, messages, False, extra)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, jinja, messages[:i], True, extra)
        through = render(tokenizer, jinja, messages[: i + 1], False, extra)
        if not (through.startswith(before) and full.startswith(through)):
            return None
        spans.append((len(before), len(through)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    labels, k = [IGNORE] * len(enc["input_ids"]), 0
    for j, (start, _end) in enumerate(enc["offset_mapping"]):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k < len(spans) and spans[k][0] <= start < spans[k][1]:
            labels[j] = enc["input_ids"][j]
    return labels


def first_difference(a: list, b: list) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def check(names: list[str]) -> int:
    refs, tokenizer, table = load()
    lf = refs["llamafactory"]
    print(f"references: llamafactory {lf['version']} ({lf['source']}), tokenizer of {len(tokenizer)} tokens")
    if refs["absent"]:
        print(f"not in this LLaMA-Factory: {', '.join(refs['absent'])}")
    failures, summary = 0, []
    for name, ref in refs["templates"].items():
        if names and name not in names:
            continue
        if name not in table:
            print(f"{name}: MISSING from {YAML_PATH.name}")
            failures += 1
            continue
        entry = table[name]
        jinja = entry["jinja"]
        if entry.get("stop", []) != ref["stop_words"]:
            print(f"{name}: stop {entry.get('stop')} but LLaMA-Factory's stop words are {ref['stop_words']}")
            failures += 1
        bad, not_appending, label_diffs = [], [], []
        for key, case in ref["cases"].items():
            extra = {} if case.get("enable_thinking", True) else {"enable_thinking": False}
            messages = case["messages"]
            for part, msgs, gen in (("train", messages, False), ("generation", messages[:-1], True)):
                want = case[part]
                try:
                    text = render(tokenizer, jinja, msgs, gen, extra)
                except Exception as exc:  # the template raised
                    bad.append(f"{key}/{part}: render failed: {exc}")
                    continue
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                if ids != want["ids"]:
                    at = first_difference(ids, want["ids"])
                    bad.append(f"{key}/{part}: ids differ at token {at}\n      got  {text!r}\n"
                               f"      want {want['text']!r}")
            labels = answer_labels(tokenizer, jinja, messages, extra)
            if labels is None:
                not_appending.append(key)
            elif labels != case["train"]["labels"]:
                label_diffs.append(key)
        failures += len(bad)
        status = "OK" if not bad else f"{len(bad)} MISMATCH"
        notes = []
        if not_appending:
            notes.append(f"turns do not append in {', '.join(not_appending)}")
        if label_diffs:
            notes.append(f"answer tokens differ from LLaMA-Factory's labels in {', '.join(label_diffs)}")
        print(f"{name}: {status} ({len(ref['cases'])} cases)" + (f"; {'; '.join(notes)}" if notes else ""))
        for line in bad:
            print("    " + line)
        summary.append((name, not bad))
    exact = [n for n, ok in summary if ok]
    print(f"\n{len(exact)}/{len(summary)} templates match every case")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(check(sys.argv[1:]))
