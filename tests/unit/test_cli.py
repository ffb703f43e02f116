import yaml

from tuneforge.cli import main


def write(tmp_path, config):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_user_errors_exit_2_without_a_traceback(tmp_path, capsys):
    path = write(tmp_path, {"model": {"name_or_path": "x"}, "data": {"dataset": "identity"}, "train": {"lr": 1}})
    assert main(["train", path]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: ") and "train.lr: unknown key" in err and "Traceback" not in err


def test_data_errors_exit_2_too(tiny_config, tmp_path, capsys):
    assert main(["check", write(tmp_path, tiny_config), "data.dataset=identiti"]) == 2
    assert capsys.readouterr().err.startswith("data error: data set 'identiti' is not in")


def test_check_prints_the_report(tiny_config, tmp_path, capsys):
    assert main(["check", write(tmp_path, tiny_config)]) == 0
    out = capsys.readouterr().out
    assert "identity: 16 rows read, 16 used" in out and "tokens per sequence: min" in out
    assert "trainable params" in out and out.rstrip().endswith("check: ok")


def test_train_then_chat_once(tiny_config, tmp_path, capsys):
    assert main(["train", write(tmp_path, tiny_config), "train.max_steps=1"]) == 0
    assert "tuneforge: completed" in capsys.readouterr().out
    assert main(["chat", tiny_config["output"]["run_dir"], "--prompt", "hi", "--max-new-tokens", "4"]) == 0


def test_env_lists_embedded_models(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "gemma3-270m" in out and "torch " in out
