"""Make references.json: conversations rendered by LLaMA-Factory's own template code.

Run with the separate LLaMA-Factory environment (not TuneForge's), from any directory:

    .lfenv/bin/python tests/assets/llamafactory_templates/make_references.py

It builds a small synthetic byte-level BPE tokenizer (the same recipe as `build_tokenizer` in tests/conftest.py,
plus every special token the templates below write), saves it to tokenizer/ beside this file, and for every
template asks LLaMA-Factory for
  - the training sequence: `SupervisedDatasetProcessor._encode_data_example` (prompt + answer ids of every turn,
    with the final eos of `efficient_eos` templates), the same call LLaMA-Factory's SFT data pipeline makes;
  - the generation prompt: `Template.encode_oneturn(messages + [empty assistant])`, as its chat engine does.
The ids are decoded back to text with skip_special_tokens=False. tests/unit/data/test_llamafactory_templates.py
(TuneForge's environment) encodes the same cases with TuneForge and compares ids and labels.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import re
import sys
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
TOKENIZER_DIR = HERE / "tokenizer"
OUT = HERE / "references.json"

NAMES = ["qwen", "qwen2_5", "qwen3", "qwen3_nothink", "llama2", "llama3", "llama4", "mistral", "ministral", "gemma",
         "gemma3", "glm4", "chatglm3", "deepseek", "deepseek3", "deepseekr1", "yi", "phi", "phi4", "phi4_mini",
         "smollm2", "intern2", "cpm4", "zephyr", "vicuna", "alpaca", "default", "empty", "chatml", "gpt_oss",
         # the plain text templates ported afterwards from their formatter slots
         "bailing", "chatml_de", "cohere", "dbrx", "deepseekcoder", "ernie", "exaone",
         "falcon", "falcon_h1", "gemma2", "granite3", "granite4", "hunyuan", "hunyuan_small", "index", "llama2_zh",
         "moonlight", "olmo", "openchat", "openchat-3.6", "opencoder", "phi_small", "sailor", "seed_coder", "smollm",
         "solar", "starchat", "telechat2", "xuanyuan", "yuan"]

SYSTEM = "You are a helpful assistant."
# Each case: (system or None, [(user, assistant), ...]).
CASES = {
    "a": (None, [("Hi there", "Hello! How can I help?")]),
    "b": (SYSTEM, [("Hi there", "Hello! How can I help?")]),
    "c": (SYSTEM, [("What is the capital of France?", "The capital of France is Paris."),
                   ("请用中文打个招呼。", "你好！很高兴认识你。"),
                   ("Write two lines:\nroses and violets", "Roses are red,\nviolets are blue.")]),
}
# Reasoning templates only: answers that carry their own thoughts, written with the template's thought words
# (THINK_OPEN / THINK_CLOSE are replaced by them).
THINK_CASES = {
    "d": (None, [("Hi there", "THINK_OPENThe user greets me.THINK_CLOSEHello! How can I help?"),
                 ("Thanks", "THINK_OPENA polite reply.THINK_CLOSEYou are welcome.")]),
}

# Tool-call cases (every template): LLaMA-Factory's roles `function` (the call, JSON as in glaive_toolcall) and
# `observation` (the tool's answer), with the tools given as the JSON text of a data set's `tools` column.
TOOLS = [{"name": "get_weather", "description": "Current weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"},
                                                          "unit": {"type": "string", "enum": ["C", "F"]}},
                         "required": ["city"]}},
         {"name": "get_time", "description": "Local time of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                         "required": ["city"]}}]
TOOL_CASES = {
    "t1": (None, [("user", "What is the weather in Paris?"),
                  ("function", '{"name": "get_weather", "arguments": {"city": "Paris"}}'),
                  ("observation", '{"temperature": 21, "sky": "sunny"}'),
                  ("assistant", "It is sunny and 21 °C in Paris.")]),
    "t2": (SYSTEM, [("user", "Weather and time in 东京?"),
                    ("function", '[{"name": "get_weather", "arguments": {"city": "东京", "unit": "C"}}, '
                                 '{"name": "get_time", "arguments": {"city": "东京"}}]'),
                    ("observation", '{"weather": "rain, 18 C", "time": "21:05"}'),
                    ("assistant", "东京: rain, 18 °C; it is 21:05."),
                    ("user", "Thanks!"), ("assistant", "You are welcome.")]),
}

# Special tokens written by the templates (and their tool formats), added to the synthetic tokenizer so that each
# is one token, as in the real models' tokenizers.
EXTRA_SPECIALS = [
    "<|endoftext|>", "<|im_sep|>",
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
    "<|header_start|>", "<|header_end|>", "<|eot|>", "<|eom|>",
    "[INST]", "[/INST]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "<start_of_turn>", "<end_of_turn>",
    "[gMASK]", "<sop>", "sop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<|end|>", "<|tool|>", "<|/tool|>",
    "<think>", "</think>", "<tool_call>", "</tool_call>",
    "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
    "<|start|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>",
    # added with the ported templates (tokens LLaMA-Factory adds as eos or stop words)
    "<eod>", "<eos>", "<|end_of_sentence|>", "<|end_of_text|>", "<|eos|>", "<｜hy_place▁holder▁no▁2｜>", "<sep>",
]


def stub_torchaudio() -> None:
    """llamafactory 0.9.5 imports torchaudio at module level (audio inputs only). The CUDA wheel that pip brings
    cannot load next to the CPU torch, so when it is absent an empty module stands in; templates never use it."""
    if importlib.util.find_spec("torchaudio") is None:
        module = types.ModuleType("torchaudio")
        module.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
        module.__version__ = "0.0.0"
        sys.modules["torchaudio"] = module


# --- the synthetic tokenizer: tests/conftest.py's recipe --------------------------------------------------------
SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>", "<s>", "</s>"]


def _corpus() -> list[str]:
    rows = json.loads((REPO / "data" / "alpaca_en_demo.json").read_text(encoding="utf-8"))[:300]
    zh = json.loads((REPO / "data" / "alpaca_zh_demo.json").read_text(encoding="utf-8"))[:100]
    return [r["instruction"] + " " + r["output"] for r in rows + zh] + ["system user assistant tool\n"] * 20


def build_tokenizer(vocab_size: int = 600):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    tok.add_special_tokens(EXTRA_SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   clean_up_tokenization_spaces=False)
    return fast


# --- rendering with LLaMA-Factory ---------------------------------------------------------------------------------
# The release tag and commit of each PyPI version used so far (the wheel records no commit; its
# llamafactory/data/template.py was compared byte for byte with the file at that tag, see template_py_sha256).
RELEASE_COMMITS = {"0.9.5": ("v0.9.5", "7af909522a951e3ad9f022ea6f88b6755257eaa5")}


def lf_version() -> dict:
    import hashlib
    from importlib.metadata import version

    import llamafactory
    import llamafactory.data.template as lf_template

    tag, commit = RELEASE_COMMITS.get(llamafactory.__version__, (None, None))
    info = {"package": "llamafactory", "version": llamafactory.__version__, "source": "PyPI wheel",
            "git_tag": tag, "commit": commit, "license": "Apache-2.0",
            "template_py_sha256": hashlib.sha256(Path(lf_template.__file__).read_bytes()).hexdigest()}
    for dep in ("transformers", "tokenizers"):
        info[dep] = version(dep)
    return info


def fresh_template(name: str, enable_thinking: bool | None):
    from transformers import AutoTokenizer

    from llamafactory.data.template import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    size = len(tokenizer)
    data_args = DataArguments(template=name, enable_thinking=enable_thinking, cutoff_len=4096)
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    if len(tokenizer) != size:
        raise SystemExit(f"{name}: LLaMA-Factory added tokens to the tokenizer; add them to EXTRA_SPECIALS")
    return template, tokenizer, data_args


def render(name: str, system, turns, enable_thinking, tools=None) -> dict:
    """`turns`: (user, assistant) pairs, or with `tools` (role, content) messages in LLaMA-Factory's roles."""
    from llamafactory.data.mm_plugin import get_mm_plugin
    from llamafactory.data.processor.supervised import SupervisedDatasetProcessor

    template, tokenizer, data_args = fresh_template(name, enable_thinking)
    messages = []
    if tools is None:
        for user, assistant in turns:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    else:
        messages = [{"role": role, "content": content} for role, content in turns]
    # Multimodal templates (gemma3, llama4) insist on a processor even without media; text-only examples pass
    # through the base plugin unchanged, so it stands in for theirs here.
    template.mm_plugin = get_mm_plugin(name="base")
    processor = SupervisedDatasetProcessor(template=template, tokenizer=tokenizer, processor=None, data_args=data_args)
    tool_text = json.dumps(tools, ensure_ascii=False) if tools else None
    ids, labels = processor._encode_data_example(prompt=messages[:-1], response=messages[-1:], system=system,
                                                 tools=tool_text, images=[], videos=[], audios=[])
    # generation prompt: all turns but the last answer, as the chat engine renders it
    gen_ids, _ = template.encode_oneturn(tokenizer, messages[:-1] + [{"role": "assistant", "content": ""}],
                                         system, tool_text)

    def text(x):
        return tokenizer.decode(x, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    return {"messages": ([{"role": "system", "content": system}] if system else []) + messages,
            **({"tools": tools} if tools else {}),
            "train": {"text": text(ids), "ids": ids, "labels": labels},
            "generation": {"text": text(gen_ids), "ids": gen_ids}}


# Preference pairs cut to fit cutoff_len by LLaMA-Factory's PairwiseDatasetProcessor (its infer_seqlen split).
PAIR_TEMPLATES = ["qwen", "llama3", "default"]
PAIR_CUTOFFS = [24, 48, 80, 400]
PAIR = (SYSTEM, [("What is the capital of France?", "The capital of France is Paris."),
                 ("Write two lines about roses and violets, please, in the style of a short poem for a card.", None)],
        "Roses are red, violets are blue, this little card was written for you.", "No.")


def render_pair(name: str, cutoff: int) -> dict:
    from llamafactory.data.mm_plugin import get_mm_plugin
    from llamafactory.data.processor.pairwise import PairwiseDatasetProcessor

    template, tokenizer, data_args = fresh_template(name, True)
    data_args.cutoff_len = cutoff
    template.mm_plugin = get_mm_plugin(name="base")
    system, turns, chosen, rejected = PAIR
    messages = []
    for user, assistant in turns:
        messages.append({"role": "user", "content": user})
        if assistant is not None:
            messages.append({"role": "assistant", "content": assistant})
    processor = PairwiseDatasetProcessor(template=template, tokenizer=tokenizer, processor=None, data_args=data_args)
    c_ids, c_labels, r_ids, r_labels = processor._encode_data_example(
        prompt=messages, response=[{"role": "assistant", "content": chosen}, {"role": "assistant", "content": rejected}],
        system=system, tools=None, images=[], videos=[], audios=[])
    return {"messages": [{"role": "system", "content": system}] + messages, "chosen": chosen, "rejected": rejected,
            "cutoff_len": cutoff, "chosen_ids": c_ids, "chosen_labels": c_labels, "rejected_ids": r_ids,
            "rejected_labels": r_labels}


def render_feedback(name: str, cutoff: int) -> dict:
    """A KTO row (the pair's prompt, its chosen answer as the desired one, the rejected one as the mismatched KL
    answer) cut by LLaMA-Factory's FeedbackDatasetProcessor."""
    from llamafactory.data.mm_plugin import get_mm_plugin
    from llamafactory.data.processor.feedback import FeedbackDatasetProcessor

    template, tokenizer, data_args = fresh_template(name, True)
    data_args.cutoff_len = cutoff
    template.mm_plugin = get_mm_plugin(name="base")
    system, turns, answer, other = PAIR
    messages = []
    for user, assistant in turns:
        messages.append({"role": "user", "content": user})
        if assistant is not None:
            messages.append({"role": "assistant", "content": assistant})
    processor = FeedbackDatasetProcessor(template=template, tokenizer=tokenizer, processor=None, data_args=data_args)
    ids, labels, kl_ids, kl_labels, tag = processor._encode_data_example(
        prompt=messages, response=[{"role": "assistant", "content": answer}, {"role": "assistant", "content": ""}],
        kl_response=[{"role": "assistant", "content": other}, {"role": "assistant", "content": ""}],
        system=system, tools=None, images=[], videos=[], audios=[])
    return {"messages": [{"role": "system", "content": system}] + messages, "answer": answer, "kl_answer": other,
            "cutoff_len": cutoff, "ids": ids, "labels": labels, "kl_ids": kl_ids, "kl_labels": kl_labels}


def main() -> None:
    stub_torchaudio()
    from llamafactory.data.template import TEMPLATES, ReasoningTemplate

    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(str(TOKENIZER_DIR))
    out = {"llamafactory": lf_version(),
           "tokenizer": {"path": "tokenizer", "vocab_size": len(tokenizer), "bos_token": tokenizer.bos_token,
                         "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token},
           "cases": {k: {"system": s, "turns": t} for k, (s, t) in {**CASES, **THINK_CASES, **TOOL_CASES}.items()},
           "tools": TOOLS,
           "absent": [n for n in NAMES if n not in TEMPLATES],
           "templates": {}}
    for name in NAMES:
        if name not in TEMPLATES:
            continue
        template, tok, _ = fresh_template(name, True)
        reasoning = isinstance(template, ReasoningTemplate)
        entry = {"default_system": template.default_system, "stop_words": list(template.stop_words),
                 "efficient_eos": template.efficient_eos, "replace_eos": template.replace_eos,
                 "eos_token_after_fix": tok.eos_token, "reasoning": reasoning,
                 "thought_words": list(template.thought_words) if reasoning else None,
                 "class": type(template).__name__, "cases": {}}
        variants = [(True, ""), (False, "/nothink")] if reasoning else [(True, "")]
        cases = dict(CASES)
        if reasoning:
            for key, (system, turns) in THINK_CASES.items():
                open_, close = template.thought_words
                cases[key] = (system, [(u, a.replace("THINK_OPEN", open_).replace("THINK_CLOSE", close))
                                       for u, a in turns])
        for enable_thinking, suffix in variants:
            for key, (system, turns) in cases.items():
                case = render(name, system, turns, enable_thinking)
                if reasoning:
                    case["enable_thinking"] = enable_thinking
                entry["cases"][key + suffix] = case
            for key, (system, turns) in TOOL_CASES.items():
                try:
                    case = render(name, system, turns, enable_thinking, TOOLS)
                except Exception as exc:  # a template whose tool format refuses the case (e.g. parallel calls)
                    case = {"messages": [{"role": r, "content": c} for r, c in turns], "tools": TOOLS,
                            "refused": f"{type(exc).__name__}: {exc}"}
                if reasoning:
                    case["enable_thinking"] = enable_thinking
                entry["cases"][key + suffix] = case
        out["templates"][name] = entry
        print(f"{name}: {len(entry['cases'])} cases")
    out["pairs"] = {f"{name}/{cutoff}": render_pair(name, cutoff) for name in PAIR_TEMPLATES for cutoff in PAIR_CUTOFFS}
    out["feedback"] = {f"{name}/{cutoff}": render_feedback(name, cutoff) for name in PAIR_TEMPLATES
                       for cutoff in PAIR_CUTOFFS}
    text = json.dumps(out, ensure_ascii=False, indent=1)
    text = re.sub(r"\[\s*(-?\d+(?:,\s*-?\d+)*)\s*\]", lambda m: "[" + re.sub(r"\s+", "", m.group(1)) + "]", text)
    OUT.write_text(text + "\n", encoding="utf-8")  # id lists on one line each
    print(f"wrote {OUT} ({len(out['templates'])} templates; absent: {', '.join(out['absent']) or 'none'})")


if __name__ == "__main__":
    main()
