"""Contamination-free packing for SFT: rows end to end, positions restarting, no attention across rows."""

import json

import pytest
import torch

from tests.conftest import build_tiny_model
from tuneforge.config import load_config
from tuneforge.data.collate import PackedCollator, PadCollator
from tuneforge.errors import ConfigError
from tuneforge.train.run import train

ROWS = [
    {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, -100, 8, 9]},
    {"input_ids": [10, 11, 12], "labels": [-100, 11, 12]},
    {"input_ids": [13, 14, 15, 16, 17, 18, 19], "labels": [13, -100, -100, -100, 17, 18, 19]},
]


def test_packed_batch_is_one_row_with_restarting_positions_and_no_padding():
    batch = PackedCollator()(ROWS)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5, 6]]
    # a row's first token is never a target: it would be predicted from the end of the previous row
    assert batch["labels"].tolist() == [[-100, -100, -100, 8, 9, -100, 11, 12, -100, -100, -100, -100, 17, 18, 19]]
    assert "attention_mask" not in batch


def test_each_packed_row_gets_exactly_the_logits_it_gets_alone():
    model = build_tiny_model(32).eval()
    packed = PackedCollator()(ROWS)
    with torch.no_grad():
        together = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        start = 0
        for row in ROWS:
            n = len(row["input_ids"])
            alone = model(input_ids=torch.tensor([row["input_ids"]]), use_cache=False).logits
            torch.testing.assert_close(together[:, start:start + n], alone, rtol=1e-5, atol=1e-5)
            start += n
        # and the packing is what makes that true: without restarting positions rows would see each other
        plain = model(input_ids=packed["input_ids"], use_cache=False).logits
        assert (plain[:, 5:8] - model(input_ids=torch.tensor([ROWS[1]["input_ids"]])).logits).abs().max() > 1e-3


def test_packed_training_has_the_loss_of_padded_training(tiny_config):
    losses = {}
    for packing in (False, True):
        config = json.loads(json.dumps(tiny_config))
        config["data"]["packing"] = packing
        config["train"].update(max_steps=2)
        config["output"]["run_dir"] += f"-packing-{packing}"
        run = train(config).run_dir
        losses[packing] = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                           if '"loss"' in line]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_padded_batches_carry_pad_that_packing_removes():
    padded, packed = PadCollator(0)(ROWS), PackedCollator()(ROWS)
    assert padded["input_ids"].numel() == 21 and packed["input_ids"].numel() == 15


def test_packing_is_for_sft(tiny_config):
    tiny_config["data"]["packing"] = True
    tiny_config["method"]["stage"] = "pt"
    with pytest.raises(ConfigError, match="data.packing applies to stage sft"):
        load_config(tiny_config)
