"""model.new_special_tokens: the vocabulary grows, the new rows train, and the run reloads (and merges) to the
model that was trained."""

import pytest
import torch

from tuneforge.config import load_config
from tuneforge.export.merge import merged_model
from tuneforge.infer.engine import Engine
from tuneforge.rundir import prepare_run_dir
from tuneforge.train.prepare import build_model, count_trainable, prepare
from tuneforge.train.run import build_trainer, save_weights

NEW = ["<think>", "</think>"]


def _setup(tiny_config, adapter: dict):
    tiny_config["model"]["new_special_tokens"] = ",".join(NEW)
    tiny_config["method"]["adapter"] = adapter
    tiny_config["train"].update(max_steps=2, learning_rate=1e-2, lr_scheduler="constant")
    cfg = load_config(tiny_config)
    prepared = prepare(cfg)
    return cfg, prepared


def test_new_tokens_are_single_special_tokens(tiny_config, tokenizer):
    _, prepared = _setup(tiny_config, {"type": "lora", "rank": 2})
    tok = prepared.tokenizer
    assert len(tok) == len(tokenizer) + 2
    ids = tok("<think>a</think>", add_special_tokens=False).input_ids
    assert ids[0] == tok.convert_tokens_to_ids("<think>") == len(tokenizer) and ids[-1] == len(tokenizer) + 1
    assert tok.decode(ids, skip_special_tokens=True) == "a"


@pytest.mark.parametrize("adapter", [{"type": "lora", "rank": 2}, {"type": "freeze", "trainable_layers": 1}])
def test_new_rows_train_and_the_run_reloads(tiny_config, tokenizer, adapter):
    cfg, prepared = _setup(tiny_config, adapter)
    run, _ = prepare_run_dir(cfg)
    model = build_model(cfg, prepared.source, prepared.tokenizer)
    matrices = {n: p.shape[0] for n, p in model.named_parameters() if "embed_tokens" in n and p.ndim == 2}
    assert len(tokenizer) + 2 in matrices.values() and len(tokenizer) not in matrices.values()
    params = count_trainable(cfg, prepared.source, prepared.tokenizer)
    assert params.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # the training rows do not contain the new tokens; put them in a row so that their rows get gradients
    prepared.data.train.columns["input_ids"][0][:2] = [len(tokenizer), len(tokenizer) + 1]
    trainer, _ = build_trainer(cfg, model, prepared, run)
    ids = torch.tensor([[5, len(tokenizer), 7, len(tokenizer) + 1, 9]])
    trainer.train()
    save_weights(trainer, prepared, run, cfg)
    model.eval()
    with torch.no_grad():
        trained = model(ids).logits
        engine = Engine.from_run(run.path)
        assert len(engine.tokenizer) == len(tokenizer) + 2
        torch.testing.assert_close(engine.model(ids).logits, trained, atol=1e-5, rtol=0)
        merged, _, _ = merged_model(run.path)
        torch.testing.assert_close(merged(ids).logits, trained, atol=1e-5, rtol=0)
    rows = merged.get_input_embeddings().weight[len(tokenizer):]
    old_mean = merged.get_input_embeddings().weight[:len(tokenizer)].mean(0)
    assert (rows - old_mean).abs().max() > 1e-4  # the new rows moved away from their mean initialisation


def test_lora_trains_only_the_new_rows(tiny_config, tokenizer):
    cfg, prepared = _setup(tiny_config, {"type": "lora", "rank": 2})
    model = build_model(cfg, prepared.source, prepared.tokenizer)
    token_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad and "trainable_tokens" in n]
    assert token_params and all(p.shape[0] == 2 for _, p in token_params)  # 2 rows, not the whole matrix
