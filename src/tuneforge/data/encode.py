"""Examples -> token ids and labels.

SFT: the conversation is rendered by the chat template and tokenized once (as `apply_chat_template` does);
tokens whose characters fall inside an answer span get labels, all others -100.

Truncation policy (cutoff_len): the template's own tokens and the answers are never cut. Prompt-side
contents (system, user, tool) are shortened first, longest first (water-filling: the longest shrink to a
common length until the conversation fits), keeping their beginning. If the answers alone do not fit,
the row is dropped (`overlong: drop`, counted), or with `overlong: truncate_answer` answers are shortened
the same way, together with the prompts. `overlong: split` cuts the tokens as LLaMA-Factory does (see
`_split_turns`).
"""

from __future__ import annotations

from dataclasses import dataclass

from tuneforge.data.convert import Example
from tuneforge.data.template import ChatTemplate, parse_tools, render_with_spans

IGNORE = -100
PROMPT_ROLES = ("system", "user", "tool")


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


class Unusable(Exception):
    """The row cannot be trained on by this stage (counted as a policy drop with the reason)."""


class Overlong(Unusable):
    """The row cannot fit cutoff_len under the chosen policy."""


def encode_sft(example: Example, tokenizer, template: ChatTemplate, cutoff_len: int, *,
               train_on_prompt: bool = False, mask_history: bool = False, overlong: str = "drop") -> Encoded:
    if not example.messages or example.messages[-1]["role"] != "assistant":
        raise Unusable("the conversation does not end with an answer")
    _, encoded = _fit(example.messages, parse_tools(example.tools), tokenizer, template, cutoff_len,
                      train_on_prompt, mask_history, overlong)
    return encoded


@dataclass
class EncodedPair:
    chosen: Encoded
    rejected: Encoded


def encode_pair(example: Example, tokenizer, template: ChatTemplate, cutoff_len: int,
                overlong: str = "drop") -> EncodedPair:
    """A preference pair: the same prompt with the chosen and with the rejected answer; loss masks cover the
    final answer only. The prompt is shortened once, for the longer answer, and shared by both."""
    if not example.messages or example.messages[-1]["role"] == "assistant":
        raise Unusable("a preference row needs a prompt that ends with a user turn")
    tools = parse_tools(example.tools)
    answers = {"chosen": example.chosen, "rejected": example.rejected}
    if overlong == "split":
        return _split_pair(example.messages, answers, tools, tokenizer, template, cutoff_len)
    tokens = {k: tokenizer(a, add_special_tokens=False)["input_ids"] for k, a in answers.items()}
    longer = max(answers, key=lambda k: len(tokens[k]))
    shorter = "rejected" if longer == "chosen" else "chosen"
    fitted, long_enc = _fit(example.messages + [{"role": "assistant", "content": answers[longer]}], tools,
                            tokenizer, template, cutoff_len, False, True, overlong)
    short_answer = answers[shorter]
    if long_enc.truncated and overlong == "truncate_answer":  # the longer answer was cut: cut the other as far
        cap = len(tokenizer(fitted[-1]["content"], add_special_tokens=False)["input_ids"])
        if len(tokens[shorter]) > cap:
            short_answer = tokenizer.decode(tokens[shorter][:cap], skip_special_tokens=False)
    ids, labels = _tokenize(template, tokenizer, fitted[:-1] + [{"role": "assistant", "content": short_answer}],
                            tools, False, True)
    if len(ids) > cutoff_len:  # re-tokenizing cut text can add a token or two
        raise Overlong("answers longer than cutoff_len")
    short_enc = Encoded(ids, labels, long_enc.truncated or short_answer != answers[shorter])
    return EncodedPair(**{longer: long_enc, shorter: short_enc})


def _prompt_and_answer(messages, tools, tokenizer, template) -> tuple[list[int], list[int]]:
    """The tokens before the final answer (every earlier turn, template tokens included) and from it on."""
    ids, labels = _tokenize(template, tokenizer, messages, tools, False, True)
    start = next((i for i, y in enumerate(labels) if y != IGNORE), len(ids))
    return ids[:start], ids[start:]


def encode_last_answer_split(example: Example, tokenizer, template: ChatTemplate, cutoff_len: int) -> Encoded:
    """`overlong: split` for a row trained on its final answer only (KTO, as LLaMA-Factory's feedback processor
    cuts it): the prompt and the answer share cutoff_len by `infer_seqlen`, each keeping its beginning."""
    prompt, answer = _prompt_and_answer(example.messages, parse_tools(example.tools), tokenizer, template)
    n_source, n_target = infer_seqlen(len(prompt), len(answer), cutoff_len)
    if n_target == 0:
        raise Overlong("no answer tokens left within cutoff_len")
    kept = answer[:n_target]
    return Encoded(prompt[:n_source] + kept, [IGNORE] * n_source + kept,
                   truncated=n_source < len(prompt) or n_target < len(answer))


def _split_pair(messages, answers, tools, tokenizer, template, cutoff_len) -> EncodedPair:
    """`overlong: split` for preference pairs (LLaMA-Factory's pairwise truncation): the prompt (everything before
    the final answer, template tokens included) and the longer answer share cutoff_len by `infer_seqlen`; the prompt
    keeps its beginning and both answers are cut to the answer's share."""
    parts = {key: _prompt_and_answer(messages + [{"role": "assistant", "content": answer}], tools, tokenizer,
                                     template) for key, answer in answers.items()}
    prompt = parts["chosen"][0]
    if parts["rejected"][0] != prompt:  # a tokenizer that merges across the boundary: no shared prompt to cut
        raise Unusable("the chosen and rejected answers change how the prompt is tokenized")
    n_source, n_target = infer_seqlen(len(prompt), max(len(a) for _, a in parts.values()), cutoff_len)
    if n_target == 0:
        raise Overlong("no answer tokens left within cutoff_len")
    out = {}
    for key, (_, answer) in parts.items():
        kept = answer[:n_target]
        out[key] = Encoded(prompt[:n_source] + kept, [IGNORE] * n_source + kept,
                           truncated=n_source < len(prompt) or len(kept) < len(answer))
    return EncodedPair(**out)


def _fit(messages, tools, tokenizer, template, cutoff_len, train_on_prompt, mask_history, overlong):
    """Tokenize, shortening contents by the truncation policy until the sequence fits cutoff_len.
    Returns the (possibly shortened) messages and their encoding."""
    if overlong == "split":
        return messages, _split_turns(template, tokenizer, messages, tools, cutoff_len, train_on_prompt, mask_history)
    messages = [dict(m) for m in messages]
    ids, labels = _tokenize(template, tokenizer, messages, tools, train_on_prompt, mask_history)
    if len(ids) <= cutoff_len:
        return messages, Encoded(ids, labels)
    roles = PROMPT_ROLES + (("assistant",) if overlong == "truncate_answer" else ())
    for _ in range(6):  # re-tokenizing shortened text can differ by a token or two: converge in a few rounds
        excess = len(ids) - cutoff_len
        if excess <= 0 or not _shorten(messages, tokenizer, excess, roles):
            break
        ids, labels = _tokenize(template, tokenizer, messages, tools, train_on_prompt, mask_history)
    if len(ids) <= cutoff_len:
        return messages, Encoded(ids, labels, truncated=True)
    raise Overlong("answers longer than cutoff_len" if overlong == "drop" else "template alone exceeds cutoff_len")


def infer_seqlen(source_len: int, target_len: int, budget: int) -> tuple[int, int]:
    """LLaMA-Factory's split of a token budget between a prompt and its answer (its `infer_seqlen`): a short answer
    keeps all of its tokens, else a short prompt does, else both get a share proportional to their lengths."""
    if 2 * target_len < budget:
        target_cap = budget
    elif 2 * source_len < budget:
        target_cap = budget - source_len
    else:
        target_cap = int(budget * (target_len / (source_len + target_len)))
    new_target = min(target_cap, target_len)
    return min(max(budget - new_target, 0), source_len), new_target


def _split_turns(template, tokenizer, messages, tools, cutoff_len, train_on_prompt, mask_history) -> Encoded:
    """`overlong: split` (LLaMA-Factory's truncation): the rendered tokens are cut turn by turn, each turn's prompt
    part (everything since the previous answer, template tokens included) and answer part sharing what is left of
    cutoff_len by `infer_seqlen`, each keeping its beginning; turns after the budget runs out are left out (with
    mask_history the last turns are served first)."""
    text, spans = render_with_spans(template, tokenizer, messages, tools)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if len(ids) <= cutoff_len:
        return Encoded(*_tokenize(template, tokenizer, messages, tools, train_on_prompt, mask_history))
    bounds, k = [], 0  # token range of each answer
    for start, end in spans:
        first = next(j for j in range(k, len(ids)) if offsets[j][0] >= start or offsets[j][1] > start)
        last = next((j for j in range(first, len(ids)) if offsets[j][0] >= end), len(ids))
        bounds.append((first, last))
        k = last
    bounds[-1] = (bounds[-1][0], len(ids))  # whatever follows the last answer goes with it
    turns = [(ids[(bounds[i - 1][1] if i else 0): a], ids[a: b]) for i, (a, b) in enumerate(bounds)]
    kept, total = {}, 0
    for i in (reversed(range(len(turns))) if mask_history else range(len(turns))):
        if total >= cutoff_len:
            break
        source, target = turns[i]
        n_source, n_target = infer_seqlen(len(source), len(target), cutoff_len - total)
        kept[i] = (source[:n_source], target[:n_target])
        total += n_source + n_target
    out_ids, labels = [], []
    last_kept = max(kept)
    for i in sorted(kept):
        source, target = kept[i]
        supervised = train_on_prompt or not mask_history or i == last_kept
        out_ids += source + target
        taught = list(target)
        if getattr(spans[i], "eos_label", False) and len(target) == len(turns[i][1]):  # see template.Span
            taught[-1] = tokenizer.eos_token_id
        labels += (source if train_on_prompt else [IGNORE] * len(source)) + (taught if supervised else
                                                                               [IGNORE] * len(target))
    if all(label == IGNORE for label in labels):
        raise Overlong("no answer tokens left within cutoff_len")
    return Encoded(out_ids, labels, truncated=True)


def _tokenize(template, tokenizer, messages, tools, train_on_prompt, mask_history):
    text, spans = render_with_spans(template, tokenizer, messages, tools)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if train_on_prompt:
        return ids, list(ids)
    if mask_history:
        spans = spans[-1:]
    labels = [IGNORE] * len(ids)
    k = 0
    for j, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k < len(spans) and spans[k][0] <= start < spans[k][1]:
            labels[j] = ids[j]
            if getattr(spans[k], "eos_label", False) and end == spans[k][1]:  # the next turn's first token
                labels[j] = tokenizer.eos_token_id
    return ids, labels


def _shorten(messages: list[dict], tokenizer, excess: int, roles: tuple[str, ...]) -> bool:
    """Cut `excess` tokens from the longest contents of the given roles; False when nothing is left to cut."""
    pieces = [tokenizer(m["content"], add_special_tokens=False)["input_ids"] if m["role"] in roles else []
              for m in messages]
    lengths = [len(p) for p in pieces]
    if sum(lengths) < excess:
        return False
    cap = _water_level(lengths, excess)
    changed = False
    for m, piece in zip(messages, pieces):
        if len(piece) > cap:
            m["content"] = tokenizer.decode(piece[:cap], skip_special_tokens=False)
            changed = True
    return changed


def _water_level(lengths: list[int], excess: int) -> int:
    """Largest cap such that sum(max(0, L - cap)) >= excess."""
    lo, hi = 0, max(lengths)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(max(0, n - mid) for n in lengths) >= excess:
            lo = mid
        else:
            hi = mid - 1
    return lo


def encode_pretrain(texts: list[str], tokenizer, cutoff_len: int) -> tuple[list[list[int]], int]:
    """Plain-text documents -> blocks of cutoff_len tokens (documents joined by eos; nothing dropped).

    Returns the blocks and the number of tokens. The last block may be shorter.
    """
    stream: list[int] = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=True)["input_ids"] + eos
    blocks = [stream[i: i + cutoff_len] for i in range(0, len(stream), cutoff_len)]
    return blocks, len(stream)
