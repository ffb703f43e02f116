import json

import pytest

from tuneforge.data.readers import read_file, read_rows
from tuneforge.data.registry import DatasetSpec
from tuneforge.errors import DataError

ROWS = [{"instruction": "a", "output": "1"}, {"instruction": "b", "output": "2"}]


def test_json_jsonl_csv_parquet_and_txt_read_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "r.json").write_text(json.dumps(ROWS))
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    (tmp_path / "r.csv").write_text("instruction,output\na,1\nb,2\n")
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "r.parquet")
    for name in ("r.json", "r.jsonl", "r.csv", "r.parquet"):
        rows = read_file(tmp_path / name)
        assert [r.data for r in rows] == ROWS, name
        assert [r.number for r in rows] == [1, 2]
    (tmp_path / "r.txt").write_text("first line\nsecond line\n")
    assert [r.data for r in read_file(tmp_path / "r.txt")] == [{"text": "first line"}, {"text": "second line"}]


def test_json_lines_saved_as_json_are_accepted(tmp_path):
    (tmp_path / "r.json").write_text("\n".join(json.dumps(r) for r in ROWS))
    assert [r.data for r in read_file(tmp_path / "r.json")] == ROWS


def test_a_folder_reads_all_its_files_in_order(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.jsonl").write_text(json.dumps(ROWS[1]) + "\n")
    (tmp_path / "d" / "a.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    spec = DatasetSpec(name="x", base_dir=str(tmp_path), file_name="d")
    assert [r.data for r in read_rows(spec)] == ROWS


def test_broken_jsonl_names_the_line(tmp_path):
    (tmp_path / "r.jsonl").write_text(json.dumps(ROWS[0]) + "\n{broken\n")
    with pytest.raises(DataError, match=r"r.jsonl line 2 column 2: not valid JSON"):
        read_file(tmp_path / "r.jsonl")


def test_broken_json_names_the_line(tmp_path):
    (tmp_path / "r.json").write_text('[\n {"a": 1},\n {"a": }\n]')
    with pytest.raises(DataError, match=r"r.json line 3 column 8: not valid JSON"):
        read_file(tmp_path / "r.json")


def test_unsupported_suffix(tmp_path):
    (tmp_path / "r.xml").write_text("<a/>")
    with pytest.raises(DataError, match="unsupported file type '.xml'"):
        read_file(tmp_path / "r.xml")


def test_hub_data_without_network_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = DatasetSpec(name="remote", hf_hub_url="tuneforge-tests/does-not-exist")
    with pytest.raises(DataError, match="could not load 'tuneforge-tests/does-not-exist' from the Hugging Face hub"):
        read_rows(spec)
