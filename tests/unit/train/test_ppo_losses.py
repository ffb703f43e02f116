import math

import pytest
import torch

from tuneforge.train.ppo_losses import gae, ppo_policy_loss, ppo_value_loss, token_rewards, whiten


def test_token_rewards_put_the_score_on_the_last_real_token():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = token_rewards(torch.tensor([2.0, -1.0]), logp, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 2.0 + 0.1], [0.0, -1.0 - 0.1, 0.0]]))
    def k3(log_ratio):  # ref/pi - 1 - log(ref/pi)
        return math.exp(-log_ratio) - 1 + log_ratio

    # the log-ratios 0.5, 0, -1 and 0, 1 would sum to -0.5 for the first row: a negative "KL" in the logs
    assert kl.tolist() == pytest.approx([k3(0.5) + k3(-1.0), k3(1.0)])
    assert (kl > 0).all()


def test_gae_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 0.2, 0.1]])
    mask = torch.ones(1, 3)
    gamma, lam = 0.9, 0.8
    d2 = 2.0 - 0.1
    d1 = 0.0 + gamma * 0.1 - 0.2
    d0 = 1.0 + gamma * 0.2 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    adv, ret = gae(rewards, values, mask, gamma, lam)
    assert adv.tolist()[0] == pytest.approx([a0, a1, a2])
    assert ret.tolist()[0] == pytest.approx([a0 + 0.5, a1 + 0.2, a2 + 0.1])


def test_gae_ignores_padding():
    adv, _ = gae(torch.tensor([[1.0, 5.0]]), torch.tensor([[0.0, 9.0]]), torch.tensor([[1.0, 0.0]]), 1.0, 1.0)
    assert adv.tolist() == [[1.0, 0.0]]


def test_clipped_policy_loss():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 0.5]]))  # ratios 1.5 and 0.5
    adv = torch.tensor([[1.0, -1.0]])
    got = ppo_policy_loss(new, old, adv, torch.ones(1, 2), clip=0.2)
    # token 0: max(-1.5, -1.2) = -1.2; token 1: max(0.5, 0.8) = 0.8
    assert got.item() == pytest.approx((-1.2 + 0.8) / 2)


def test_clipped_value_loss_and_whiten():
    got = ppo_value_loss(torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[2.0]]), torch.ones(1, 1), 0.5)
    assert got.item() == pytest.approx(0.5 * max((1 - 2) ** 2, (0.5 - 2) ** 2))
    w = whiten(torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert w[0, :3].mean().item() == pytest.approx(0.0, abs=1e-6) and w[0, 3].item() == 0.0


def test_whitening_over_shards_equals_whitening_the_whole_batch():
    """With several processes each holds a shard; `total` sums the statistics over them (here: by hand)."""
    torch.manual_seed(0)
    x, mask = torch.randn(4, 5), (torch.rand(4, 5) > 0.3).float()
    shards = [(x[:2], mask[:2]), (x[2:], mask[2:])]
    partial = {0: [], 1: []}  # each call's per-shard lists, summed element-wise across both shards

    def total_of(index):
        def total(values):
            partial[index].append(values)
            other = 1 - index
            mine = len(partial[index]) - 1
            xs, ms = shards[other]
            peer = ([float(ms.sum()), float((xs * ms).sum())] if mine == 0 else
                    [float((((xs - mean_of_both) * ms) ** 2).sum())])
            return [a + b for a, b in zip(values, peer)]
        return total

    mean_of_both = float((x * mask).sum() / mask.sum())
    got = torch.cat([whiten(*shards[0], total=total_of(0)), whiten(*shards[1], total=total_of(1))])
    torch.testing.assert_close(got, whiten(x, mask), rtol=1e-5, atol=1e-6)
