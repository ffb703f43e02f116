import json

import numpy as np
import pytest

from tests.conftest import REPO
from tuneforge.config import DataConfig
from tuneforge.data.collate import PadCollator
from tuneforge.data.pipeline import load_data
from tuneforge.data.template import resolve_template
from tuneforge.errors import DataError


def data_cfg(**kw):
    return DataConfig(**{"dataset": "identity", "dataset_dir": str(REPO / "data"), "cutoff_len": 512,
                         "placeholders": {"name": "Tiny", "author": "Tests"}, **kw})


def load(tokenizer, cfg, tmp_path, stage="sft"):
    template, _ = resolve_template("auto", tokenizer)
    return load_data(cfg, stage, tokenizer, template, tmp_path / "cache")


def test_second_load_comes_from_the_cache_and_is_identical(tokenizer, tmp_path):
    first = load(tokenizer, data_cfg(), tmp_path)
    second = load(tokenizer, data_cfg(), tmp_path)
    assert not first.reports[0].from_cache and second.reports[0].from_cache
    assert len(first.train) == len(second.train) == 91
    for a, b in zip(first.train.labels, second.train.labels):
        np.testing.assert_array_equal(a, b)
    assert first.reports[0].stats == second.reports[0].stats


def test_cache_key_follows_content_and_settings(tokenizer, tmp_path):
    load(tokenizer, data_cfg(), tmp_path)
    other_name = load(tokenizer, data_cfg(placeholders={"name": "Other", "author": "Tests"}), tmp_path)
    other_cutoff = load(tokenizer, data_cfg(cutoff_len=64), tmp_path)
    assert not other_name.reports[0].from_cache and not other_cutoff.reports[0].from_cache


def test_mixing_max_samples_and_val_size(tokenizer, tmp_path):
    bundle = load(tokenizer, data_cfg(dataset="identity,alpaca_en_demo", max_samples=50, val_size=0.1), tmp_path)
    assert [r.rows_read for r in bundle.reports] == [50, 50]
    total = 100 - sum(sum(r.dropped.values()) for r in bundle.reports)
    assert len(bundle.train) + len(bundle.eval) == total
    assert len(bundle.eval) == round(0.1 * total)


def test_overlong_rows_are_counted_with_the_switch_that_changes_it(tokenizer, tmp_path):
    bundle = load(tokenizer, data_cfg(dataset="alpaca_en_demo", max_samples=40, cutoff_len=32), tmp_path)
    report = bundle.reports[0]
    (reason, n), = report.dropped.items()
    assert "answers longer than cutoff_len (cutoff_len=32; raise it or set data.overlong)" == reason
    assert n + report.rows_used == 40 and all(len(x) <= 32 for x in bundle.train.input_ids)


def _write(tmp_path, rows):
    (tmp_path / "d").mkdir(exist_ok=True)
    (tmp_path / "d" / "rows.json").write_text(json.dumps(rows))
    (tmp_path / "d" / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "rows.json"}}))
    return str(tmp_path / "d")


def test_bad_rows_stop_with_every_row_listed_or_are_skipped_and_counted(tokenizer, tmp_path):
    rows = [{"instruction": "q", "output": "a"}, {"instruction": ["x"], "output": "a"},
            {"instruction": "q", "output": {"no": 1}}]
    dataset_dir = _write(tmp_path, rows)
    with pytest.raises(DataError) as info:
        load(tokenizer, data_cfg(dataset="mine", dataset_dir=dataset_dir), tmp_path)
    assert info.value.problems[:2] == [f"{dataset_dir}/rows.json row 2: instruction should be text, got list ['x']",
                                       f"{dataset_dir}/rows.json row 3: output should be text, got dict {{'no': 1}}"]
    assert "data.on_bad_row: skip" in info.value.problems[-1]
    bundle = load(tokenizer, data_cfg(dataset="mine", dataset_dir=dataset_dir, on_bad_row="skip"), tmp_path)
    assert bundle.reports[0].skipped_bad_rows == 2 and len(bundle.train) == 1


def test_stage_mismatches_are_explained(tokenizer, tmp_path):
    with pytest.raises(DataError, match="is plain text .* use method.stage: pt"):
        load(tokenizer, data_cfg(dataset="c4_demo"), tmp_path)


def test_pretraining_blocks(tokenizer, tmp_path):
    bundle = load(tokenizer, data_cfg(dataset="wiki_demo", cutoff_len=64), tmp_path, stage="pt")
    assert bundle.reports[0].rows_used == 30
    assert all(len(x) == 64 for x in bundle.train.input_ids[:-1])
    assert all((x == y).all() for x, y in zip(bundle.train.input_ids, bundle.train.labels))


def test_preference_stages_get_their_columns(tokenizer, tmp_path):
    from tests.conftest import LLAMAFACTORY_DATA

    cfg = data_cfg(dataset="dpo_en_demo", dataset_dir=str(LLAMAFACTORY_DATA), max_samples=20, cutoff_len=256)
    pairs = load(tokenizer, cfg, tmp_path, stage="dpo").train
    assert set(pairs.columns) == {"chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels"}
    assert len(pairs) + sum(sum(r.dropped.values()) for r in load(tokenizer, cfg, tmp_path, "dpo").reports) == 20
    kto = load(tokenizer, data_cfg(dataset="kto_en_demo", dataset_dir=str(LLAMAFACTORY_DATA), max_samples=20,
                                   cutoff_len=512), tmp_path, stage="kto").train
    assert set(kto.columns) == {"ids", "labels", "kl_ids", "kl_labels", "desirable"}
    assert {int(d[0]) for d in kto.columns["desirable"]} == {0, 1}
    prompts = load(tokenizer, data_cfg(max_samples=5), tmp_path, stage="ppo").train
    assert tokenizer.decode(prompts.columns["prompt_ids"][0]).endswith("<|im_start|>assistant\n")


def test_stages_refuse_data_of_the_wrong_kind(tokenizer, tmp_path):
    from tests.conftest import LLAMAFACTORY_DATA

    with pytest.raises(DataError, match="stage 'dpo' needs preference pairs, and data set 'identity' has none"):
        load(tokenizer, data_cfg(), tmp_path, stage="dpo")
    with pytest.raises(DataError, match="stage 'kto' needs a desirable/undesirable flag"):
        load(tokenizer, data_cfg(), tmp_path, stage="kto")
    with pytest.raises(DataError, match="holds preference pairs .* stage 'sft'"):
        load(tokenizer, data_cfg(dataset="dpo_en_demo", dataset_dir=str(LLAMAFACTORY_DATA)), tmp_path)


def test_collator_pads_right_with_ignored_labels():
    batch = PadCollator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                         {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert PadCollator(0, pad_to_multiple_of=8)([{"input_ids": [1], "labels": [1]}])["input_ids"].shape == (1, 8)


def test_edited_preference_file_is_tokenized_again(tokenizer, tmp_path):
    """Swapping chosen/rejected or flipping a KTO tag in place must not reuse the stale tokenized cache."""
    from tests.conftest import write_preference_data

    folder = write_preference_data(tmp_path / "data", ["Is the sky blue?", "Is fire cold?"], "Yes.", "No.")
    cfg = data_cfg(dataset="pairs", dataset_dir=str(folder), cutoff_len=128)
    first = load(tokenizer, cfg, tmp_path, stage="dpo").train
    rows = json.loads((folder / "pairs.json").read_text())
    for row in rows:
        row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
    (folder / "pairs.json").write_text(json.dumps(rows))
    second = load(tokenizer, cfg, tmp_path, stage="dpo")
    assert not second.reports[0].from_cache
    for a, b in zip(first.columns["chosen_ids"], second.train.columns["rejected_ids"]):
        np.testing.assert_array_equal(a, b)
    answer = lambda ids, labels: tokenizer.decode([t for t, y in zip(ids, labels) if y != -100])  # noqa: E731
    assert answer(second.train.columns["chosen_ids"][0], second.train.columns["chosen_labels"][0]).startswith("No.")

    kto_cfg = data_cfg(dataset="kto", dataset_dir=str(folder), cutoff_len=128)
    tags = [int(d[0]) for d in load(tokenizer, kto_cfg, tmp_path, stage="kto").train.columns["desirable"]]
    rows = json.loads((folder / "kto.json").read_text())
    rows[0]["label"] = not rows[0]["label"]
    (folder / "kto.json").write_text(json.dumps(rows))
    flipped = load(tokenizer, kto_cfg, tmp_path, stage="kto")
    assert not flipped.reports[0].from_cache
    assert [int(d[0]) for d in flipped.train.columns["desirable"]] == [1 - tags[0]] + tags[1:]


def test_left_padding_ends_every_row_in_the_last_column():
    from tuneforge.data.collate import pad_left

    ids, mask = pad_left([[5, 6, 7], [8]], 0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_a_damaged_tokenized_cache_is_rebuilt_not_fatal(tokenizer, tmp_path):
    first = load(tokenizer, data_cfg(), tmp_path)
    (cached,) = (tmp_path / "cache" / "tokenized").glob("*.npz")
    cached.write_bytes(cached.read_bytes()[:100])  # cut short, as by a full disk or a kill
    again = load(tokenizer, data_cfg(), tmp_path)
    assert not again.reports[0].from_cache and len(again.train) == len(first.train)
    assert any("unreadable" in note and "tokenized again" in note for note in again.reports[0].notes)
    assert load(tokenizer, data_cfg(), tmp_path).reports[0].from_cache  # and the rebuilt one is used next time


def test_the_truncation_report_says_whether_answers_were_cut(tokenizer, tmp_path):
    rows = [{"instruction": "question " * 50, "output": "answer " * 60}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "short.json").write_text(json.dumps([{"instruction": "question " * 50, "output": "answer " * 5}]))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"long": {"file_name": "d.json"},
                                                            "short": {"file_name": "short.json"}}))
    cut = load(tokenizer, data_cfg(dataset="long", dataset_dir=str(tmp_path), cutoff_len=48,
                                   overlong="truncate_answer"), tmp_path)
    assert "answers where needed, shortened to fit cutoff_len (data.overlong: truncate_answer)" in "\n".join(
        cut.reports[0].lines())
    kept = load(tokenizer, data_cfg(dataset="short", dataset_dir=str(tmp_path), cutoff_len=48), tmp_path)
    assert "prompts shortened to fit cutoff_len (answers kept whole)" in "\n".join(kept.reports[0].lines())


def test_files_outside_the_data_folder_are_read_with_a_warning_unless_strict(tokenizer, tmp_path):
    (tmp_path / "outside.json").write_text(json.dumps([{"instruction": "q", "output": "a"}]))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps({"x": {"file_name": "../outside.json"}}))
    bundle = load(tokenizer, data_cfg(dataset="x", dataset_dir=str(tmp_path / "data")), tmp_path)
    assert any(n.startswith("warning:") and "outside the data folder" in n for n in bundle.reports[0].notes)
    with pytest.raises(DataError, match="outside the data folder .* data.strict_paths is on"):
        load(tokenizer, data_cfg(dataset="x", dataset_dir=str(tmp_path / "data"), strict_paths=True), tmp_path)


@pytest.mark.parametrize("strategy,stopping", [("interleave_under", "first_exhausted"),
                                               ("interleave_over", "all_exhausted"),
                                               ("interleave_once", "all_exhausted_without_replacement")])
def test_interleaving_follows_hugging_face_datasets_as_llamafactory_does(tokenizer, tmp_path, strategy, stopping):
    """LLaMA-Factory mixes with datasets.interleave_datasets(probabilities, seed, stopping_strategy) on its rows;
    the rows TuneForge trains on come in the order that call gives for the same rows."""
    from datasets import Dataset, interleave_datasets

    folder = tmp_path / "data"
    folder.mkdir()
    sets = {"a": [f"a{i}" for i in range(12)], "b": [f"b{i}" for i in range(5)]}
    for name, answers in sets.items():
        (folder / f"{name}.json").write_text(json.dumps([{"instruction": "q", "output": x} for x in answers]))
    (folder / "dataset_info.json").write_text(json.dumps({n: {"file_name": f"{n}.json"} for n in sets}))
    cfg = DataConfig(dataset=["a", "b"], dataset_dir=str(folder), mix_strategy=strategy, interleave_probs=[0.7, 0.3])
    bundle = load(tokenizer, cfg, tmp_path)
    got = [tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != -100],
                            skip_special_tokens=True).strip() for row in (bundle.train[i] for i in range(len(bundle.train)))]
    reference = interleave_datasets([Dataset.from_dict({"answer": v}) for v in sets.values()],
                                    probabilities=[0.7, 0.3], seed=42, stopping_strategy=stopping)["answer"]
    assert got == reference and len(set(got)) > 5
    with pytest.raises(Exception, match="interleave_probs: 2 non-negative numbers adding up to 1"):
        DataConfig(dataset=["a", "b"], mix_strategy=strategy, interleave_probs=[0.7, 0.7])


@pytest.mark.parametrize("stage,name", [("sft", "alpaca_en_demo"), ("dpo", "dpo_en_demo")])
def test_parallel_tokenization_gives_the_same_rows(tokenizer, tmp_path, stage, name):
    from tests.conftest import LLAMAFACTORY_DATA

    one = load(tokenizer, DataConfig(dataset=name, dataset_dir=str(LLAMAFACTORY_DATA), max_samples=300), tmp_path / "1",
               stage)
    two = load(tokenizer, DataConfig(dataset=name, dataset_dir=str(LLAMAFACTORY_DATA), max_samples=300,
                                     preprocessing_num_workers=2), tmp_path / "2", stage)
    assert one.train.columns.keys() == two.train.columns.keys() and len(one.train) == len(two.train) > 100
    assert all(np.array_equal(a, b) for k in one.train.columns for a, b in zip(one.train.columns[k],
                                                                             two.train.columns[k]))
    assert one.reports[0].dropped == two.reports[0].dropped


def test_tokenized_path_saves_then_loads_without_reading_the_data(tokenizer, tmp_path):
    saved = tmp_path / "tok"
    first = load(tokenizer, data_cfg(tokenized_path=str(saved), val_size=0.1), tmp_path)
    assert (saved / "train.npz").is_file() and (saved / "eval.npz").is_file()
    registry = tmp_path / "elsewhere"  # the data sets are not read again: a registry that is gone does not matter
    again = load(tokenizer, data_cfg(tokenized_path=str(saved), dataset_dir=str(registry)), tmp_path)
    assert all(np.array_equal(a, b) for a, b in zip(first.train.columns["input_ids"], again.train.columns["input_ids"]))
    assert len(again.eval) == len(first.eval) and again.reports[0].from_cache
    with pytest.raises(DataError, match="holds data tokenized for stage sft, not pt"):
        load(tokenizer, data_cfg(tokenized_path=str(saved)), tmp_path, stage="pt")
