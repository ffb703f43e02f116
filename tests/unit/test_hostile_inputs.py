"""Hostile but realistic input, through the real CLI: every case exits with code 2, prints no traceback, names the
file / row / key / flag and a fix, and leaves no run directory behind that a later command would take for a run.

Each case builds its input in a fresh folder and returns the command line; `expected` is a regular expression
the error must match.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

from tests.conftest import REPO
from tuneforge.cli import main


@dataclass
class Case:
    name: str
    build: Callable  # (folder, tiny_model_dir, tiny_run) -> argv
    expected: str


def config(folder: Path, tiny: Path, **sections) -> Path:
    """A valid tiny training config with some sections replaced or extended, written to folder/cfg.yaml."""
    cfg = {"model": {"name_or_path": str(tiny), "cache_dir": str(folder / "cache")},
           "data": {"dataset": "identity", "dataset_dir": str(REPO / "data"), "cutoff_len": 128, "max_samples": 8,
                    "placeholders": {"name": "Tiny", "author": "Tests"}},
           "method": {"stage": "sft", "adapter": {"type": "lora", "rank": 4}},
           "train": {"max_steps": 2, "batch_size": 4},
           "output": {"run_dir": str(folder / "run")}}
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values} if isinstance(values, dict) else values
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return path


def data(folder: Path, model: Path, rows, entry: dict | None = None, name: str = "d.json", **sections) -> list[str]:
    """`check` on a registered data set `mine` holding `rows` (a list to dump as JSON, or raw bytes)."""
    (folder / "data").mkdir(exist_ok=True)
    target = folder / "data" / name
    target.write_bytes(rows if isinstance(rows, bytes) else json.dumps(rows, ensure_ascii=False).encode())
    (folder / "data" / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": name, **(entry or {})}}))
    section = {"dataset": "mine", "dataset_dir": str(folder / "data"), **sections.pop("data", {})}
    return ["check", str(config(folder, model, data=section, **sections))]


def model_folder(folder: Path, model: Path, damage: Callable[[Path], None]) -> list[str]:
    copy = shutil.copytree(model, folder / "model")
    damage(copy)
    return ["check", str(config(folder, model, model={"name_or_path": str(copy)}))]


def truncate(path: Path, keep: float = 0.5) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])


def gguf_file(folder: Path, model: Path, content: Callable[[Path], None]) -> list[str]:
    path = folder / "m.gguf"
    content(path)
    return ["check", str(config(folder, model, model={"name_or_path": str(path)}))]


def write_real_gguf(path: Path) -> None:
    from tests.conftest import build_tiny_model, build_tokenizer
    from tuneforge.export.gguf_writer import write_gguf

    tokenizer = build_tokenizer()
    write_gguf(build_tiny_model(len(tokenizer)), tokenizer, path, qtype="f32", pre_tokenizer="gpt-2")


def run_copy(folder: Path, run: Path, damage: Callable[[Path], None] | None = None) -> Path:
    copy = shutil.copytree(run, folder / "run-copy")
    if damage:
        damage(copy)
    return copy


def existing_run(folder: Path, model: Path, **meta) -> Path:
    """A finished-looking run directory (as `train` leaves it) for the run-folder cases."""
    run = folder / "run"
    run.mkdir()
    (run / "config.yaml").write_text(config(folder, model).read_text())
    (run / "run.json").write_text(json.dumps({"status": "completed", **meta}))
    return run


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))

CASES = [
    # --- config files and overrides
    Case("config is a folder", lambda f, m, r: ["check", str(f)], r"is a folder; give the YAML config file itself"),
    Case("config missing", lambda f, m, r: ["train", str(f / "nope.yaml")], r"nope.yaml: no such config file"),
    Case("config not UTF-8", lambda f, m, r: ["check", str(_write(f / "c.yaml", "model:\n  name_or_path: 模型\n".encode("gbk")))],
         r"c.yaml: not UTF-8 text \(byte 0x.. at position \d+\). hint: save the file as UTF-8"),
    Case("config not YAML", lambda f, m, r: ["check", str(_write(f / "c.yaml", b"model: [unclosed\n"))],
         r"c.yaml line \d+: not valid YAML"),
    Case("duplicate YAML key", lambda f, m, r: ["check", str(_write(f / "c.yaml", b"train:\n  batch_size: 4\ntrain:\n  batch_size: 8\n"))],
         r"line 3: not valid YAML \(key 'train' appears twice \(first on line 1\)\)"),
    Case("YAML alias bomb", lambda f, m, r: ["check", str(_write(f / "c.yaml", BOMB.encode()))],
         r"c.yaml: uses YAML aliases \(\*name\), which configs do not need"),
    Case("config is a list", lambda f, m, r: ["check", str(_write(f / "c.yaml", b"- a\n- b\n"))],
         r"expected a mapping of sections"),
    Case("unknown key", lambda f, m, r: ["check", str(config(f, m, train={"lerning_rate": 1e-4}))],
         r"train.lerning_rate: unknown key; did you mean 'learning_rate'\?"),
    Case("wrong type", lambda f, m, r: ["check", str(config(f, m, train={"batch_size": "four"}))],
         r"train.batch_size: Input should be a valid integer.*given 'four'"),
    Case("infinite learning rate", lambda f, m, r: ["train", str(config(f, m)), "train.learning_rate=inf"],
         r"override 'train.learning_rate=inf': train.learning_rate: Input should be a finite number"),
    Case("NaN learning rate", lambda f, m, r: ["train", str(config(f, m, train={"learning_rate": float("nan")}))],
         r"train.learning_rate: Input should be a finite number"),
    Case("unknown optimizer", lambda f, m, r: ["train", str(config(f, m)), "train.optim=adamw_troch"],
         r"train.optim: unknown optimizer 'adamw_troch'; did you mean adamw_torch"),
    Case("override without =", lambda f, m, r: ["check", str(config(f, m)), "train.batch_size"],
         r"override 'train.batch_size': expected key=value"),
    Case("unknown stage", lambda f, m, r: ["check", str(config(f, m, method={"stage": "stf"}))],
         r"method.stage: 'stf' is not one of sft \| pt \| rm \| dpo \| kto \| ppo"),
    Case("flat LLaMA-Factory config without a data set", lambda f, m, r: ["check", str(_write(f / "c.yaml", b"model_name_or_path: x\nstage: sft\n"))],
         r"c.yaml: dataset: required: the data set names from dataset_info.json"),
    Case("LLaMA-Factory key TuneForge cannot honour", lambda f, m, r: ["check", str(_write(f / "c.yaml", b"model_name_or_path: x\ndataset: identity\nrope_scaling: linear\n"))],
         r"c.yaml: rope_scaling: .linear.: RoPE scaling for longer contexts is not supported yet"),
    # --- data
    Case("data set not registered", lambda f, m, r: ["check", str(config(f, m, data={"dataset": "identiti"}))],
         r"data set 'identiti' is not in .*dataset_info.json. did you mean identity\?"),
    Case("registry not JSON", lambda f, m, r: _registry(f, m, b"{ not json"), r"dataset_info.json line 1: not valid JSON"),
    Case("malformed registry entry used", lambda f, m, r: _registry(f, m, json.dumps({"mine": {"file_name": "x.json", "formating": "sharegpt"}}).encode()),
         r"dataset_info.json: mine.formating: Extra inputs are not permitted"),
    Case("data file missing", lambda f, m, r: _registry(f, m, json.dumps({"mine": {"file_name": "gone.json"}}).encode()),
         r"data set 'mine': file .*gone.json does not exist"),
    Case("data not UTF-8", lambda f, m, r: data(f, m, '{"instruction": "你好", "output": "好"}\n'.encode("gbk"), name="d.jsonl"),
         r"d.jsonl: not UTF-8 text \(byte 0x.. at line 1\). hint: save it as UTF-8"),
    Case("broken JSON line", lambda f, m, r: data(f, m, b'{"instruction": "a", "output": "b"}\n{"instruction": \n', name="d.jsonl"),
         r"d.jsonl line 2 column \d+: not valid JSON"),
    Case("JSON not rows", lambda f, m, r: data(f, m, b"42"), r"d.json: expected a JSON array of row objects"),
    Case("unknown role", lambda f, m, r: data(f, m, [{"messages": [{"role": "human", "content": "q"}, {"role": "gpt", "content": "a"}]}],
                                              {"formatting": "sharegpt", "columns": {"messages": "messages"},
                                               "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}),
         r"d.json row 1: messages\[0\].role is 'human'; expected .* hint: these are sharegpt roles"),
    Case("sharegpt row in alpaca data", lambda f, m, r: data(f, m, [{"instruction": "q", "output": "a"}, {"conversations": [{"from": "human", "value": "q"}]}]),
         r"d.json row 2: this row is a conversation \('conversations'\) but data set 'mine' is registered as alpaca"),
    Case("empty data file", lambda f, m, r: data(f, m, []), r"no training rows are left after loading; what happened to each data set:\n\s+mine: 0 rows read"),
    Case("every row too long", lambda f, m, r: data(f, m, [{"instruction": "q", "output": "word " * 400}] * 3, data={"cutoff_len": 32}),
         r"no training rows are left.*\n\s+mine: 3 rows read, 0 used\n\s+dropped 3: answers longer than cutoff_len \(cutoff_len=32; raise it or set data.overlong\)"),
    Case("KTO tag not a boolean", lambda f, m, r: data(f, m, [{"instruction": "q", "output": "a", "label": "maybe"}], {"columns": {"kto_tag": "label"}},
                                                        method={"stage": "kto", "adapter": {"type": "lora"}}),
         r"d.json row 1: label should be true or false, got 'maybe'"),
    Case("pairs for sft", lambda f, m, r: data(f, m, [{"instruction": "q", "chosen": "a", "rejected": "b"}], {"ranking": True, "columns": {"chosen": "chosen", "rejected": "rejected"}}),
         r"data set 'mine' holds preference pairs \(ranking: true\); stage 'sft' needs conversations"),
    Case("symlink out of the data folder (strict)", lambda f, m, r: _symlinked(f, m), r"is a symlink out of the data folder .* data.strict_paths is on"),
    Case("dot-dot path (strict)", lambda f, m, r: _registry(f, m, json.dumps({"mine": {"file_name": "../outside.json"}}).encode(), strict=True, outside=True),
         r"outside.json is outside the data folder .* data.strict_paths is on"),
    # --- model files
    Case("model path missing", lambda f, m, r: ["check", str(config(f, m, model={"name_or_path": "./no_such_model"}))],
         r"cannot find model './no_such_model'.* local path: .*no_such_model does not exist"),
    Case("missing run folder is not looked up on the hub", lambda f, m, r: (_mkdir(f / "runs"), ["chat", "runs/nope", "--prompt", "hi"])[1],
         r"cannot find model 'runs/nope'. tried: .* local path: .*runs/nope does not exist\. hint"),
    Case("folder without config.json", lambda f, m, r: model_folder(f, m, lambda p: (p / "config.json").unlink()),
         r"folder .*model holds no config.json and no .gguf file"),
    Case("truncated safetensors", lambda f, m, r: model_folder(f, m, lambda p: truncate(p / "model.safetensors")),
         r"model.safetensors: truncated: tensor '.*' ends at byte \d+ of the data, which has only \d+"),
    Case("fake safetensors", lambda f, m, r: model_folder(f, m, lambda p: (p / "model.safetensors").write_bytes(os.urandom(4096))),
         r"model.safetensors: truncated or not a safetensors file"),
    Case("truncated GGUF", lambda f, m, r: gguf_file(f, m, lambda p: (write_real_gguf(p), truncate(p, 0.6))),
         r"m.gguf: truncated"),
    Case("text file named .gguf", lambda f, m, r: gguf_file(f, m, lambda p: p.write_text("not a model")),
         r"m.gguf: truncated or not a GGUF file"),
    # --- run folders
    Case("run folder holds a finished run", lambda f, m, r: (existing_run(f, m), ["train", str(config(f, m))])[1],
         r"already holds a run \(status: completed\). hint: start again with output.overwrite=true"),
    Case("overwrite over foreign files", lambda f, m, r: (_write(existing_run(f, m) / "notes.txt", b"mine"), ["train", str(config(f, m)), "output.overwrite=true"])[1],
         r"also holds files TuneForge did not write \(notes.txt\)"),
    Case("resume with nothing to resume", lambda f, m, r: (existing_run(f, m), ["train", str(config(f, m)), "train.resume_from_checkpoint=auto"])[1],
         r"has no complete checkpoint. hint: start again with output.overwrite=true"),
    Case("resume from a missing folder", lambda f, m, r: ["train", str(config(f, m)), f"train.resume_from_checkpoint={f / 'ckpt'}"],
         r"ckpt cannot be resumed from exactly \(it is not a folder\)"),
    Case("run folder is a file", lambda f, m, r: (_write(f / "run", b"x"), ["train", str(config(f, m))])[1],
         r"output.run_dir: .*run is a file, not a folder"),
    Case("chat on a folder that is not a run", lambda f, m, r: ["chat", str(_write(_mkdir(f / "x") / "run.json", b"{}").parent), "--prompt", "hi"],
         r"not a TuneForge run directory"),
    Case("chat with a truncated adapter", lambda f, m, r: ["chat", str(run_copy(f, r, lambda p: truncate(p / "adapter" / "adapter_model.safetensors"))), "--prompt", "hi"],
         r"adapter_model.safetensors: truncated"),
    Case("export a folder that is not a run", lambda f, m, r: ["export", str(f), "--out", str(f / "out")], r"not a TuneForge run directory"),
    # --- command-line flags
    Case("chat --max-new-tokens 0", lambda f, m, r: ["chat", str(r), "--prompt", "hi", "--max-new-tokens", "0"], r"--max-new-tokens: must be at least 1, got 0"),
    Case("chat --temperature -1", lambda f, m, r: ["chat", str(r), "--prompt", "hi", "--temperature", "-1"],
         r"--temperature: Input should be greater than or equal to 0 \(given -1.0\)"),
    Case("chat --top-p 2", lambda f, m, r: ["chat", str(r), "--prompt", "hi", "--top-p", "2"], r"--top-p: Input should be less than or equal to 1"),
    Case("predict --batch-size 0", lambda f, m, r: ["predict", str(r), "--data", "identity", "--batch-size", "0"], r"--batch-size: must be at least 1, got 0"),
    Case("predict --max-samples 0", lambda f, m, r: ["predict", str(r), "--data", "identity", "--max-samples", "0"], r"--max-samples: must be at least 1, got 0"),
    Case("predict --out a file", lambda f, m, r: ["predict", str(r), "--data", "identity", "--out", str(_write(f / "o.txt", b""))],
         r"--out .*o.txt is a file; give a folder"),
    Case("export --out a file", lambda f, m, r: ["export", str(r), "--out", str(_write(f / "o.txt", b""))], r"--out .*o.txt is a file; give a new folder"),
    Case("export --max-shard-size banana", lambda f, m, r: ["export", str(r), "--out", str(f / "out"), "--max-shard-size", "banana"],
         r"--max-shard-size 'banana': expected a size such as 2GB"),
    Case("export --gguf-type q3_k", lambda f, m, r: ["export", str(r), "--out", str(f / "out"), "--format", "gguf", "--gguf-type", "q3_k"],
         r"--gguf-type 'q3_k': expected one of f32, f16"),
    Case("check --measure -1", lambda f, m, r: ["check", str(config(f, m)), "--measure", "-1"], r"--measure: must be at least 0, got -1"),
]


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _registry(folder: Path, model: Path, info: bytes, strict: bool = False, outside: bool = False) -> list[str]:
    _mkdir(folder / "data")
    (folder / "data" / "dataset_info.json").write_bytes(info)
    if outside:
        (folder / "outside.json").write_text(json.dumps([{"instruction": "q", "output": "a"}]))
    section = {"dataset": "mine", "dataset_dir": str(folder / "data"), "strict_paths": strict}
    return ["check", str(config(folder, model, data=section))]


def _symlinked(folder: Path, model: Path) -> list[str]:
    secret = _write(folder / "secret.txt", b"a line that is not data\n")
    _mkdir(folder / "data")
    (folder / "data" / "notes.txt").symlink_to(secret)
    (folder / "data" / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "notes.txt", "columns": {"prompt": "text"}}}))
    section = {"dataset": "mine", "dataset_dir": str(folder / "data"), "strict_paths": True}
    return ["check", str(config(folder, model, data=section, method={"stage": "pt", "adapter": {"type": "lora"}}))]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input_gets_a_clear_error(case, tmp_path, tiny_model_dir, tiny_run, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = case.build(tmp_path, tiny_model_dir, tiny_run)
    had_run = (tmp_path / "run").exists()
    before = sorted(p.name for p in (tmp_path / "run").iterdir()) if (tmp_path / "run").is_dir() else None
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's own usage errors
        code = stop.code
    out = capsys.readouterr()
    text = out.out + out.err
    assert code == 2, text[-2000:]
    assert "Traceback" not in text
    assert re.search(case.expected, text, re.DOTALL), text[-2000:]
    if not had_run:  # no partial run directory that a later command would take for a run
        assert not (tmp_path / "run").exists()
    elif before is not None:
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 40


def test_bom_and_crlf_data_and_huge_rows_are_read(tmp_path, tiny_model_dir, capsys):
    """Not errors: a byte-order mark, Windows line ends and a 2 MB row are ordinary input."""
    rows = '\ufeff{"instruction": "q1", "output": "a1"}\r\n{"instruction": "q2", "output": "a2"}\r\n'
    rows += json.dumps({"instruction": "long " * 400_000, "output": "short"}) + "\r\n"
    assert main(data(tmp_path, tiny_model_dir, rows.encode("utf-8"), name="d.jsonl")) == 0
    out = capsys.readouterr().out
    assert "mine: 3 rows read, 3 used" in out and "truncated 1" in out
