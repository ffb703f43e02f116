"""data.streaming: rows read while training become the same tokens the in-memory pipeline makes, in a seeded
shuffled order that changes per epoch; the file is read lazily; a streamed run trains, and LLaMA-Factory's
`streaming` key turns it on."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO
from tuneforge.config import load_config
from tuneforge.errors import ConfigError

LLAMAFACTORY = REPO / "tests" / "assets" / "llamafactory"


def data_config(tiny_config, **data):
    return {**tiny_config, "data": {**tiny_config["data"], **data}, "train": {**tiny_config["train"], "max_steps": 4}}


def tokens(rows, *columns):
    return sorted(tuple(tuple(int(x) for x in row[c]) for c in columns) for row in rows)


@pytest.mark.parametrize("stage, dataset, columns", [
    ("sft", "alpaca_en_demo", ("input_ids", "labels")),
    ("dpo", "dpo_en_demo", ("chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels")),
])
def test_streamed_rows_are_the_rows_the_in_memory_pipeline_makes(tiny_config, stage, dataset, columns):
    from tuneforge.train.prepare import prepare

    raw = data_config(tiny_config, dataset=dataset, dataset_dir=str(LLAMAFACTORY), max_samples=150, buffer_size=40, cutoff_len=1024,
                      **({"overlong": "truncate_answer"} if stage == "dpo" else {}))
    raw["method"] = {**raw["method"], "stage": stage}
    memory = prepare(load_config(raw)).data.train
    streamed = prepare(load_config({**raw, "data": {**raw["data"], "streaming": True}})).data.train
    first, second = list(streamed), list(streamed)
    assert len(first) == len(memory) > 100
    assert tokens(first, *columns) == tokens(memory, *columns)  # the same rows, tokenized the same way
    assert [r[columns[0]].tolist() for r in first] == [r[columns[0]].tolist() for r in second]  # seeded
    streamed.set_epoch(1)
    assert [r[columns[0]].tolist() for r in list(streamed)] != [r[columns[0]].tolist() for r in first]


def test_a_stream_is_read_lazily(tiny_config, tmp_path):
    """Taking the first rows of a long JSON lines file reads only its beginning: a broken line far down is not met."""
    from tuneforge.train.prepare import prepare

    rows = [{"instruction": f"Say {i}", "output": f"{i}"} for i in range(1000)]
    lines = [json.dumps(r) for r in rows] + ["{broken"]
    (tmp_path / "big.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "dataset_info.json").write_text(json.dumps({"big": {"file_name": "big.jsonl"}}))
    raw = data_config(tiny_config, dataset="big", dataset_dir=str(tmp_path), max_samples=None, streaming=True,
                      buffer_size=8)
    prepared = prepare(load_config(raw))  # the report samples the first 256 rows: fine
    stream = iter(prepared.data.train)
    assert [next(stream) for _ in range(20)]
    with pytest.raises(Exception, match="line 1001"):  # reading on does reach the broken line
        list(prepared.data.train)


def test_a_streamed_run_trains_and_reports(tiny_config, tmp_path):
    from tuneforge.train.run import train

    raw = data_config(tiny_config, streaming=True, buffer_size=16)
    raw["output"] = {"run_dir": str(tmp_path / "streamed")}
    result = train(raw)
    assert result.status == "completed"
    losses = [json.loads(line)["loss"] for line in (tmp_path / "streamed" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 4 and all(loss == loss for loss in losses)


def test_streaming_needs_max_steps_and_refuses_what_a_stream_cannot_do(tiny_config):
    raw = data_config(tiny_config, streaming=True)
    raw["train"] = {**raw["train"], "max_steps": None}
    with pytest.raises(ConfigError, match="data.streaming does not go with train.max_steps"):
        load_config(raw)
    with pytest.raises(ConfigError, match="data.val_size"):
        load_config(data_config(tiny_config, streaming=True, val_size=0.1))


def test_llamafactorys_streaming_keys_translate():
    from tuneforge.config.llamafactory import translate

    out = translate({"model_name_or_path": "m", "dataset": "identity", "streaming": True, "buffer_size": 128,
                     "max_steps": 10}, "lf.yaml").config
    assert out["data"]["streaming"] is True and out["data"]["buffer_size"] == 128
