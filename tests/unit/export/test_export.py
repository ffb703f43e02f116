import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneforge.cli import main
from tuneforge.errors import ConfigError
from tuneforge.export.export import export_run
from tuneforge.export.ollama import template_family
from tuneforge.infer.engine import Engine


def test_merged_model_gives_the_logits_of_base_plus_adapter(tiny_run, tmp_path):
    out = export_run(tiny_run, tmp_path / "hf")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    engine = Engine.load(str(tiny_run))
    ids = torch.tensor([engine.prompt_ids([{"role": "user", "content": "Who are you?"}])])
    with torch.no_grad():
        adapted = engine.model(input_ids=ids).logits
        with engine.model.disable_adapter():
            base = engine.model(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=1e-5, atol=1e-5)
    assert (adapted - base).abs().max() > 1e-4  # the adapter does change something


def test_hf_folder_is_self_contained(tiny_run, tmp_path):
    out = export_run(tiny_run, tmp_path / "hf", max_shard_size="50KB")
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors.index.json" in names and len([n for n in names if n.endswith(".safetensors")]) > 1
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert "<|im_start|>" in tokenizer.chat_template
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    card = (out / "README.md").read_text()
    assert "- data: identity" in card and "method: lora (rank 8" in card and "Be brief." in card


def test_gguf_export_of_a_tokenizer_llama_cpp_does_not_know_is_refused(tiny_run, tmp_path):
    with pytest.raises(ConfigError, match="llama.cpp knows no pre-tokenizer"):
        export_run(tiny_run, tmp_path / "gguf", fmt="gguf", gguf_type="f16")


def test_gguf_export_writes_the_file_and_an_ollama_modelfile(tiny_run, tmp_path, monkeypatch):
    import tuneforge.export.gguf_writer as writer

    monkeypatch.setattr(writer, "detect_pre_tokenizer", lambda tokenizer: "gpt-2")  # the test tokenizer splits as GPT-2
    path = export_run(tiny_run, tmp_path / "gguf", fmt="gguf", gguf_type="f16")
    assert path.name == "run-f16.gguf" and path.stat().st_size > 10_000
    modelfile = (path.parent / "Modelfile").read_text()
    assert "FROM ./run-f16.gguf" in modelfile and 'TEMPLATE """{{ if .System }}<|im_start|>system' in modelfile
    assert 'SYSTEM """Be brief."""' in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    assert loaded.config.num_hidden_layers == 2


def test_template_family_finds_a_builtin_and_the_system_prompt_a_template_inserts(tokenizer):
    import copy

    smol_like = copy.deepcopy(tokenizer)
    smol_like.chat_template = (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are a helpful bot<|im_end|>\\n' }}{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    assert template_family(tokenizer) == ("chatml", None)
    assert template_family(smol_like) == ("chatml", "You are a helpful bot")
    odd = copy.deepcopy(tokenizer)
    odd.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    assert template_family(odd) == (None, None)


def test_export_refuses_to_overwrite(tiny_run, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="is not empty"):
        export_run(tiny_run, tmp_path / "busy")


def test_cli_export(tiny_run, tmp_path, capsys):
    assert main(["export", str(tiny_run), "--out", str(tmp_path / "e")]) == 0
    assert "exported" in capsys.readouterr().out and (tmp_path / "e" / "config.json").is_file()
