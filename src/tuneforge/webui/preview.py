"""What training will see: the first rows of a data set rendered through the chosen template and tokenized exactly
as for training, each token marked trained (it is in the loss) or masked. This is how a beginner sees what
"loss on answers only" means."""

from __future__ import annotations

from tuneforge.config import TuneForgeConfig
from tuneforge.data.convert import with_system
from tuneforge.data.encode import IGNORE, Unusable, encode_pair, encode_sft, encode_pretrain
from tuneforge.data.pipeline import load_examples
from tuneforge.data.template import resolve_template
from tuneforge.model.loader import add_new_tokens, load_tokenizer, resolve_model

TRAINED, MASKED = "trained", None


def preview_rows(cfg: TuneForgeConfig, dataset: str, rows: int = 3) -> list[tuple[str, str | None]]:
    """(text, TRAINED or None) pieces of the first `rows` rows of `dataset`, consecutive tokens of one kind joined,
    rows separated by a line."""
    source = resolve_model(cfg.model)
    tokenizer = load_tokenizer(source, cfg.model.trust_remote_code)
    add_new_tokens(tokenizer, cfg.model.new_special_tokens)
    template, _ = resolve_template(cfg.model.template, tokenizer)
    _, conversion = load_examples(dataset, cfg.data, max_samples=rows)
    for example in conversion.examples:  # as training converts them
        example.messages = with_system(example.messages, cfg.data.default_system)
    pieces: list[tuple[str, str | None]] = []
    for n, example in enumerate(conversion.examples[:rows]):
        if n:
            pieces.append(("\n\n──────────\n\n", MASKED))
        try:
            ids, labels = _encode(example, tokenizer, template, cfg)
        except Unusable as why:
            pieces.append((f"[{example.where}: left out of training: {why}]", MASKED))
            continue
        runs: list[tuple[list[int], str | None]] = []  # consecutive tokens of one kind, decoded together
        for token, label in zip(ids, labels):
            kind = TRAINED if label != IGNORE else MASKED
            if runs and runs[-1][1] == kind:
                runs[-1][0].append(token)
            else:
                runs.append(([token], kind))
        pieces += [(tokenizer.decode(tokens, skip_special_tokens=False), kind) for tokens, kind in runs]
    return pieces


def _encode(example, tokenizer, template, cfg: TuneForgeConfig) -> tuple[list[int], list[int]]:
    stage, data = cfg.method.stage, cfg.data
    if stage == "pt":
        blocks, _ = encode_pretrain([example.text], tokenizer, data.cutoff_len)
        return blocks[0], blocks[0]
    if example.chosen is not None:  # preference pairs: the chosen answer
        pair = encode_pair(example, tokenizer, template, data.cutoff_len, data.overlong)
        return pair.chosen.input_ids, pair.chosen.labels
    encoded = encode_sft(example, tokenizer, template, data.cutoff_len, train_on_prompt=data.train_on_prompt,
                         mask_history=data.mask_history, overlong=data.overlong)
    return encoded.input_ids, encoded.labels
