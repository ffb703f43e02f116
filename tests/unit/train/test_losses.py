import math

import torch

from tests.conftest import build_tiny_model
from tuneforge.train.losses import causal_lm_loss_sum, next_token_mask, next_token_targets


def test_mask_and_targets_are_shifted_by_one():
    labels = torch.tensor([[-100, -100, 7, 8], [-100, 5, -100, -100]])
    keep = next_token_mask(labels)
    assert keep.tolist() == [[False, True, True, False], [True, False, False, False]]
    assert next_token_targets(labels, keep).tolist() == [7, 8, 5]


def test_loss_sum_against_hand_computed_values():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # p(target) = 1/2 and 3/4
    targets = torch.tensor([1, 0])
    expected = -math.log(0.5) - math.log(0.75)
    assert abs(causal_lm_loss_sum(logits, targets).item() - expected) < 1e-6


def test_logits_only_at_supervised_positions_equal_the_full_model_loss():
    torch.manual_seed(0)
    model = build_tiny_model(50)
    ids = torch.randint(4, 50, (3, 12))
    labels = ids.clone()
    labels[:, :5] = -100
    labels[2, 9:] = -100
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    reference = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    keep = next_token_mask(labels)
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
    assert logits.shape == (int(keep.sum()), 50)
    ours = causal_lm_loss_sum(logits, next_token_targets(labels, keep)) / keep.sum()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
