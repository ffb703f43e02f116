"""Each preference loss against values computed by hand on small tensors."""

import math

import pytest
import torch

from tuneforge.train.preference import dpo_loss, kto_loss, orpo_loss, pairwise_reward_loss, simpo_loss


def sig(x):
    return 1 / (1 + math.exp(-x))


PC, PR, RC, RR = torch.tensor([-5.0, -3.0]), torch.tensor([-6.0, -2.0]), torch.tensor([-5.5, -3.0]), torch.tensor([-5.5, -2.5])
# margins h = (pc - rc) - (pr - rr): row 0: 0.5 - (-0.5) = 1.0; row 1: 0 - 0.5 = -0.5
H = [1.0, -0.5]


def test_dpo_sigmoid():
    got = dpo_loss(PC, PR, RC, RR, beta=0.1)
    assert got.tolist() == pytest.approx([-math.log(sig(0.1 * h)) for h in H], rel=1e-6)


def test_dpo_label_smoothing():
    got = dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.2)
    expected = [-0.8 * math.log(sig(0.5 * h)) - 0.2 * math.log(sig(-0.5 * h)) for h in H]
    assert got.tolist() == pytest.approx(expected, rel=1e-6)


def test_hinge_and_ipo():
    assert dpo_loss(PC, PR, RC, RR, beta=2.0, kind="hinge").tolist() == pytest.approx([0.0, 2.0])
    assert dpo_loss(PC, PR, RC, RR, beta=0.25, kind="ipo").tolist() == pytest.approx([(1.0 - 2.0) ** 2, (-0.5 - 2.0) ** 2])
    with pytest.raises(ValueError, match="unknown DPO loss"):
        dpo_loss(PC, PR, RC, RR, beta=0.1, kind="nope")


def test_simpo():
    got = simpo_loss(torch.tensor([-0.5]), torch.tensor([-1.5]), beta=2.0, gamma=0.5)
    assert got.item() == pytest.approx(-math.log(sig(2.0 * 1.0 - 0.5)), rel=1e-6)


def test_orpo():
    c, r = -0.5, -1.0  # average log-probabilities
    log_odds = (c - math.log(1 - math.exp(c))) - (r - math.log(1 - math.exp(r)))
    got = orpo_loss(torch.tensor([c]), torch.tensor([r]), chosen_nll=torch.tensor([0.7]), beta=0.1)
    assert got.item() == pytest.approx(0.7 - 0.1 * math.log(sig(log_odds)), rel=1e-6)


def test_kto_weights_and_reference_point():
    policy, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])  # rewards +0.5 and -1.0
    got = kto_loss(policy, ref, torch.tensor([True, False]), kl=torch.tensor(0.2), beta=0.5,
                   desirable_weight=1.0, undesirable_weight=1.5)
    expected = [1 - sig(0.5 * (0.5 - 0.2)), 1.5 * (1 - sig(0.5 * (0.2 - (-1.0))))]
    assert got.tolist() == pytest.approx(expected, rel=1e-6)
    negative_kl = kto_loss(policy, ref, torch.tensor([True, False]), kl=torch.tensor(-3.0), beta=0.5)
    assert negative_kl.tolist() == pytest.approx([1 - sig(0.25), 1 - sig(0.5)], rel=1e-6)  # kl clamped at 0


def test_pairwise_reward():
    got = pairwise_reward_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
    assert got.tolist() == pytest.approx([-math.log(sig(1.0)), -math.log(sig(-1.0))], rel=1e-6)
