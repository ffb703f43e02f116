"""Config -> tokenized train/eval data plus a report of what was loaded, dropped and truncated.

Tokenized data are cached under `<cache_dir>/tokenized/`, keyed by the converted rows, the tokenizer,
the template and every setting that changes the tokens, so a second run does not re-tokenize.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


from tuneforge.config.schema import DataConfig
from tuneforge.data.convert import Conversion, convert_rows
from tuneforge.data.readers import read_rows
from tuneforge.data.registry import DatasetSpec, outside_reason, resolve_dataset
from tuneforge.data.stages import STAGE_TOKENIZERS
from tuneforge.data.template import ChatTemplate
from tuneforge.data.tokenized import TokenizedData, load_npz, save_npz
from tuneforge.errors import DataError

ENCODING_VERSION = 5  # bump when encode.py or the cache key changes, to invalidate caches
MAX_LISTED_BAD_ROWS = 20


@dataclass
class DatasetReport:
    name: str
    rows_read: int = 0
    rows_used: int = 0
    dropped: Counter = field(default_factory=Counter)
    truncated: int = 0
    skipped_bad_rows: int = 0
    notes: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    from_cache: bool = False
    overlong: str = "drop"  # data.overlong: whether truncation may cut answers

    def lines(self) -> list[str]:
        """The report of this data set: rows read and used, each drop with its reason, truncation, notes, lengths."""
        cached = " (tokenized copy from cache)" if self.from_cache else ""
        lines = [f"{self.name}: {self.rows_read} rows read, {self.rows_used} used{cached}"]
        lines += [f"  dropped {n}: {reason}" for reason, n in sorted(self.dropped.items())]
        if self.skipped_bad_rows:
            lines.append(f"  skipped {self.skipped_bad_rows} malformed rows (data.on_bad_row: skip)")
        if self.truncated:
            how = ("prompts shortened to fit cutoff_len (answers kept whole)" if self.overlong == "drop" else
                   "prompts, and answers where needed, shortened to fit cutoff_len (data.overlong: truncate_answer)")
            lines.append(f"  truncated {self.truncated}: {how}")
        lines += [f"  note: {note}" for note in self.notes]
        s = self.stats
        if s.get("sequences"):
            lines.append(f"  tokens per sequence: min {s['min']}, median {s['median']}, p90 {s['p90']}, "
                         f"max {s['max']}; {s['tokens']:,} tokens, {s['supervised_tokens']:,} supervised")
        return lines


@dataclass
class DataBundle:
    train: TokenizedData
    eval: TokenizedData | None
    reports: list[DatasetReport]


def load_data(cfg: DataConfig, stage: str, tokenizer, template: ChatTemplate, cache_dir: Path,
              seed: int = 42, hub: str = "huggingface") -> DataBundle:
    """Read, convert, check and tokenize every configured data set; split off the evaluation part.
    data.tokenized_path: the result is saved there, and a later run with the same path loads it instead."""
    if cfg.streaming:
        return _load_streamed(cfg, stage, tokenizer, template, cache_dir, seed, hub)
    saved = Path(cfg.tokenized_path) if cfg.tokenized_path else None
    if saved is not None and (saved / "train.npz").is_file():
        return _load_tokenized(saved, stage, tokenizer)
    bundle = _load_data(cfg, stage, tokenizer, template, cache_dir, seed, hub)
    if saved is not None:
        meta = {"stage": stage, "tokenizer": tokenizer_fingerprint(tokenizer), "datasets": list(cfg.dataset),
                "reports": [r.lines() for r in bundle.reports]}
        if bundle.eval is not None:
            save_npz(saved / "eval.npz", bundle.eval, meta)
        save_npz(saved / "train.npz", bundle.train, meta)  # last: its presence means the folder is complete
    return bundle


def _load_streamed(cfg: DataConfig, stage: str, tokenizer, template: ChatTemplate, cache_dir: Path, seed: int,
                   hub: str) -> DataBundle:
    """data.streaming: the training data sets are checked now and read while training (streaming.py); evaluation
    data sets are loaded as usual."""
    from tuneforge.data.streaming import StreamedData

    specs = []
    for name in cfg.dataset:
        spec = resolve_dataset(name, cfg.dataset_dir)
        _check_containment(spec, cfg)
        _check_stage(spec, stage)
        specs.append(spec)
    train = StreamedData(specs, cfg, stage, tokenizer, template, seed, hub)
    sample = train.sample()
    if len(sample) == 0:
        raise DataError(f"no training rows come out of the first rows of {', '.join(cfg.dataset)} (streamed); "
                        "check the data with data.streaming: false to see what happens to each row")
    report = DatasetReport(f"{', '.join(cfg.dataset)} (streamed)", rows_read=len(sample), rows_used=len(sample),
                           overlong=cfg.overlong)
    report.notes.append(f"data.streaming: read while training, shuffled through {cfg.buffer_size:,} rows; the "
                        f"lengths below are those of the first {len(sample)} rows")
    report.stats = sample.stats()
    reports, evaluation = [report], None
    if cfg.eval_dataset:
        eval_cfg = cfg.model_copy(update={"dataset": cfg.eval_dataset, "eval_dataset": [], "streaming": False})
        loaded = _load_data(eval_cfg, stage, tokenizer, template, cache_dir, seed, hub)
        evaluation, reports = loaded.train, reports + loaded.reports
    return DataBundle(train, evaluation, reports)


def _load_tokenized(saved: Path, stage: str, tokenizer) -> DataBundle:
    train, meta = load_npz(saved / "train.npz")
    if meta.get("stage") != stage:
        raise DataError(f"data.tokenized_path {saved}: holds data tokenized for stage {meta.get('stage')}, not "
                        f"{stage}; give another folder (or delete this one to tokenize again)")
    if meta.get("tokenizer") != tokenizer_fingerprint(tokenizer):
        raise DataError(f"data.tokenized_path {saved}: was tokenized with another tokenizer; give another folder "
                        "(or delete this one to tokenize again)")
    evaluation = load_npz(saved / "eval.npz")[0] if (saved / "eval.npz").is_file() else None
    report = DatasetReport(f"tokenized data in {saved} ({', '.join(meta.get('datasets', []))})",
                           rows_read=len(train), rows_used=len(train), from_cache=True)
    report.notes.append("loaded as saved by an earlier run (data.tokenized_path); the data sets were not read again")
    report.stats = train.stats()
    return DataBundle(train, evaluation, [report])


def _load_data(cfg: DataConfig, stage: str, tokenizer, template: ChatTemplate, cache_dir: Path, seed: int,
               hub: str) -> DataBundle:
    conversions = [_load_converted(name, cfg, stage, seed, hub) for name in cfg.dataset]
    eval_conversions = [_load_converted(name, cfg, stage, seed, hub) for name in cfg.eval_dataset]
    _raise_bad_rows(cfg, conversions + eval_conversions)
    reports, parts = [], []
    for spec, conversion, n_read in conversions + eval_conversions:
        report = DatasetReport(spec.name, rows_read=n_read, dropped=Counter(conversion.dropped),
                               skipped_bad_rows=len(conversion.bad_rows), overlong=cfg.overlong)
        report.notes += _ignored_column_notes(spec)
        outside = _outside(spec, cfg)
        if outside:
            report.notes.append(f"warning: {outside}; it was read (data.strict_paths: true refuses such files)")
        data = _tokenize_cached(conversion, stage, tokenizer, template, cfg, cache_dir, report)
        report.stats = data.stats()
        reports.append(report)
        parts.append(data)
    train = _mix(parts[: len(conversions)], cfg, seed)
    evaluation = _concat(parts[len(conversions):]) if eval_conversions else None
    if evaluation is None and cfg.val_size > 0:
        train, evaluation = _split(train, cfg.val_size, seed)
    if len(train) == 0:
        report = "\n  ".join(line for r in reports for line in r.lines())
        raise DataError(f"no training rows are left after loading; what happened to each data set:\n  {report}")
    return DataBundle(train, evaluation, reports)


def load_examples(name: str, cfg: DataConfig, max_samples: int | None = None, hub: str = "huggingface"):
    """Converted rows of one data set (no tokenization), for prediction and evaluation; bad rows raise."""
    spec = resolve_dataset(name, cfg.dataset_dir)
    _check_containment(spec, cfg)
    rows = read_rows(spec, hub)
    rows = rows if max_samples is None else rows[:max_samples]
    conversion = convert_rows(spec, rows, cfg.placeholders)
    if conversion.bad_rows:
        raise DataError(*conversion.bad_rows[:MAX_LISTED_BAD_ROWS])
    return spec, conversion


def _load_converted(name: str, cfg: DataConfig, stage: str, seed: int, hub: str):
    spec = resolve_dataset(name, cfg.dataset_dir)
    _check_containment(spec, cfg)
    _check_stage(spec, stage)
    rows = read_rows(spec, hub)
    if spec.num_samples:
        rows = _sample(rows, spec.num_samples, seed)
    if cfg.max_samples:
        rows = rows[: cfg.max_samples]
    return spec, convert_rows(spec, rows, cfg.placeholders, cfg.default_system), len(rows)


def _outside(spec: DatasetSpec, cfg: DataConfig) -> str | None:
    if spec.name == str(spec.path):  # a bare file named in data.dataset: it must lie in the data folder
        root, resolved = Path(cfg.dataset_dir).resolve(), spec.path.resolve()
        return None if root in resolved.parents else f"{spec.path} is outside the data folder {root}"
    return outside_reason(spec)


def _check_containment(spec: DatasetSpec, cfg: DataConfig) -> None:
    """With data.strict_paths (the web UI and API set it) nothing outside the data folder is read."""
    problem = _outside(spec, cfg) if cfg.strict_paths else None
    if problem:
        raise DataError(f"data set {spec.name!r}: {problem}; data.strict_paths is on, so only files inside the data "
                        "folder are read. hint: copy the data into the data folder")


def _check_stage(spec: DatasetSpec, stage: str) -> None:
    if spec.ranking and stage in ("sft", "pt", "kto"):
        raise DataError(f"data set {spec.name!r} holds preference pairs (ranking: true); stage {stage!r} "
                        "needs conversations with one answer. hint: use it with a preference stage (rm, dpo)")
    if stage in ("rm", "dpo") and not spec.ranking:
        raise DataError(f"stage {stage!r} needs preference pairs, and data set {spec.name!r} has none. hint: register "
                        "it with \"ranking\": true and columns chosen/rejected (see dpo_en_demo in LLaMA-Factory's data)")
    if stage == "kto" and not spec.columns.kto_tag:
        raise DataError(f"stage 'kto' needs a desirable/undesirable flag per row, and data set {spec.name!r} has none. "
                        "hint: map columns.kto_tag in dataset_info.json (see kto_en_demo)")
    if stage in ("sft", "rm", "dpo", "kto", "ppo") and spec.is_text_only:
        raise DataError(f"data set {spec.name!r} is plain text (columns.prompt: text) with no answers. "
                        "hint: use method.stage: pt for continued pre-training on it")


def _sample(rows: list, n: int, seed: int) -> list:
    """num_samples from the registry: a seeded sample, repeating the data when it asks for more rows."""
    rng = random.Random(seed)
    if n <= len(rows):
        return [rows[i] for i in sorted(rng.sample(range(len(rows)), n))]
    return rows * (n // len(rows)) + [rows[i] for i in sorted(rng.sample(range(len(rows)), n % len(rows)))]


def _raise_bad_rows(cfg: DataConfig, conversions) -> None:
    bad = [line for _, conversion, _ in conversions for line in conversion.bad_rows]
    if bad and cfg.on_bad_row == "error":
        listed = bad[:MAX_LISTED_BAD_ROWS]
        if len(bad) > len(listed):
            listed.append(f"... and {len(bad) - len(listed)} more malformed rows")
        listed.append("hint: fix the rows, or set data.on_bad_row: skip to leave them out (they are counted)")
        raise DataError(*listed)


def _ignored_column_notes(spec: DatasetSpec) -> list[str]:
    return [f"columns.{c} is ignored: TuneForge trains text-only models" for c in ("images", "videos", "audios")
            if getattr(spec.columns, c)]


def _tokenize_cached(conversion: Conversion, stage: str, tokenizer, template: ChatTemplate, cfg: DataConfig,
                     cache_dir: Path, report: DatasetReport) -> TokenizedData:
    key = _cache_key(conversion, stage, tokenizer, template, cfg)
    path = Path(cache_dir) / "tokenized" / f"{key}.npz"
    loaded = _load_cache(path, report) if path.is_file() and not cfg.overwrite_cache else None
    if loaded is not None:
        data, meta = loaded
        report.from_cache = True
    else:
        data, meta = _tokenize(conversion, stage, tokenizer, template, cfg)
        save_npz(path, data, meta)
    report.dropped.update(meta["dropped"])
    report.truncated = meta["truncated"]
    report.rows_used = meta["rows_used"]
    return data


def _load_cache(path: Path, report: DatasetReport):
    """A cached tokenization, or None (with a note) when the file is damaged: it is then rebuilt."""
    try:
        return load_npz(path)
    except Exception as exc:  # a cut or corrupt cache file is never worth a failed run
        report.notes.append(f"the tokenized cache {path.name} was unreadable ({type(exc).__name__}); tokenized again")
        return None


def _tokenize(conversion: Conversion, stage: str, tokenizer, template: ChatTemplate, cfg: DataConfig):
    workers = min(cfg.preprocessing_num_workers or 1, max(1, len(conversion.examples) // 64))
    if workers > 1 and stage not in ("pt", "kto"):  # rows encoded independently: chunks in order, same result
        data, dropped, truncated = _tokenize_in_workers(conversion.examples, stage, tokenizer, template, cfg, workers)
    else:  # pre-training joins documents into blocks across rows, KTO pairs rows for its KL term: one pass
        data, dropped, truncated = STAGE_TOKENIZERS[stage](conversion.examples, tokenizer, template, cfg)
    rows_used = len(conversion.examples) - sum(dropped.values())
    return data, {"dropped": dict(dropped), "truncated": truncated, "rows_used": rows_used}


_WORK: tuple = ()  # what forked workers tokenize (inherited, never pickled)


def _tokenize_chunk(bounds: tuple[int, int]):
    examples, stage, tokenizer, template, cfg = _WORK
    return STAGE_TOKENIZERS[stage](examples[bounds[0]: bounds[1]], tokenizer, template, cfg)


def _tokenize_in_workers(examples, stage, tokenizer, template, cfg, workers: int):
    """data.preprocessing_num_workers processes (forked), each encoding a contiguous chunk; joined in order."""
    import multiprocessing
    import os

    global _WORK
    size = -(-len(examples) // workers)
    chunks = [(start, min(start + size, len(examples))) for start in range(0, len(examples), size)]
    _WORK = (examples, stage, tokenizer, template, cfg)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker process
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            results = pool.map(_tokenize_chunk, chunks)
    finally:
        _WORK = ()
    data, dropped, truncated = TokenizedData({}), Counter(), 0
    for part, part_dropped, part_truncated in results:
        data, truncated = data + part, truncated + part_truncated
        dropped.update(part_dropped)
    return data, dropped, truncated


def _cache_key(conversion: Conversion, stage, tokenizer, template: ChatTemplate, cfg: DataConfig) -> str:
    h = hashlib.sha256()
    settings = {"v": ENCODING_VERSION, "stage": stage, "template": template.jinja, "cutoff": cfg.cutoff_len,
                "train_on_prompt": cfg.train_on_prompt, "mask_history": cfg.mask_history,
                "overlong": cfg.overlong, "tokenizer": tokenizer_fingerprint(tokenizer)}
    if not template.thinking:
        settings["thinking"] = False
    h.update(json.dumps(settings, sort_keys=True).encode())
    for e in conversion.examples:  # every field that reaches the tokens: a swapped pair or flipped KTO tag counts
        fields = {k: v for k, v in dataclasses.asdict(e).items() if k != "where"}
        h.update(json.dumps(fields, ensure_ascii=False, sort_keys=True).encode())
    return h.hexdigest()[:24]


def tokenizer_fingerprint(tokenizer) -> str:
    cached = getattr(tokenizer, "_tuneforge_fingerprint", None)
    if cached:
        return cached
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    body += json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    fingerprint = hashlib.sha256(body.encode()).hexdigest()[:16]
    tokenizer._tuneforge_fingerprint = fingerprint
    return fingerprint


STOPPING = {"interleave_under": "first_exhausted", "interleave_over": "all_exhausted",
            "interleave_once": "all_exhausted_without_replacement"}


def _mix(parts: list[TokenizedData], cfg: DataConfig, seed: int) -> TokenizedData:
    """The training rows of several data sets: one after another, or interleaved as LLaMA-Factory does it (Hugging
    Face datasets' interleave_datasets with the same probabilities, seed and stopping strategy), on row indices."""
    whole = _concat(parts)
    if cfg.mix_strategy == "concat" or len(parts) < 2:
        return whole
    from datasets import Dataset, interleave_datasets

    sets, start = [], 0
    for part in parts:
        sets.append(Dataset.from_dict({"i": list(range(start, start + len(part)))}))
        start += len(part)
    if any(len(s) == 0 for s in sets):
        raise DataError(f"data.mix_strategy {cfg.mix_strategy}: a data set has no rows left to interleave")
    mixed = interleave_datasets(sets, probabilities=cfg.interleave_probs, seed=seed,
                                stopping_strategy=STOPPING[cfg.mix_strategy])
    return whole.subset(mixed["i"])


def _concat(parts: list[TokenizedData]) -> TokenizedData:
    out = TokenizedData({})
    for p in parts:
        out = out + p
    return out


def _split(data: TokenizedData, val_size: float, seed: int) -> tuple[TokenizedData, TokenizedData]:
    n_val = int(val_size) if val_size >= 1 else max(1, round(len(data) * val_size))
    if n_val >= len(data):
        raise DataError(f"data.val_size={val_size} leaves no training rows out of {len(data)}; use a smaller value")
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    return data.subset(sorted(order[n_val:])), data.subset(sorted(order[:n_val]))
