"""The preference losses and their logged rewards against TRL's own code on fixed log-probability batches.

TRL 1.16 computes DPO and KTO inside its trainers' `_compute_loss`; those are called here unbound, with a stand-in
trainer whose model returns the fixed per-token log-probabilities (TRL's fused head output) and whose reference
log-probabilities are precomputed. ORPO and SimPO (CPO with loss_type simpo) are TRL methods of their own.
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tuneforge.config.schema import DpoMethod
from tuneforge.train.preference import kto_loss, pair_losses

trl = pytest.importorskip("trl")
TRL_VERSION = trl.__version__  # the numbers below are TRL's at this version (pinned in requirements/constraints.txt)


class Accelerator:
    device = torch.device("cpu")

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x

    def unwrap_model(self, model):
        return model


def stand_in(**attributes):
    base = dict(model=SimpleNamespace(training=True), accelerator=Accelerator(), aux_loss_enabled=False,
                precompute_ref_logps=True, _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0,
                _tp_size=1)
    return SimpleNamespace(**{**base, **attributes})


def fixed_batch(seed: int, pairs: int = 4, width: int = 10):
    """Rows 0..B-1 chosen, B..2B-1 rejected; completions of different lengths; per-token log-probs (2B, T-1)."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * pairs
    completion = torch.zeros(n, width, dtype=torch.long)
    for row in range(n):
        start = int(torch.randint(2, 5, (1,), generator=g))
        end = int(torch.randint(start + 1, width + 1, (1,), generator=g))
        completion[row, start:end] = 1
    per_token = -torch.rand(n, width - 1, generator=g) * 3 * completion[:, 1:]  # zero outside the completion
    return completion, per_token


def fake_model(per_token):
    n, t = per_token.shape
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros(n, t), mean_logits=torch.zeros(n, t),
                              is_top1=torch.zeros(n, t, dtype=torch.bool))
    return lambda **kwargs: outputs


@pytest.mark.parametrize("kind, beta", [("sigmoid", 0.1), ("sigmoid", 0.5), ("hinge", 0.3), ("ipo", 0.25)])
@pytest.mark.parametrize("seed", [0, 1])
def test_dpo_family_equals_trl(kind, beta, seed):
    from trl import DPOTrainer

    completion, per_token = fixed_batch(seed)
    g = torch.Generator().manual_seed(seed + 100)
    ref = per_token.sum(1) + torch.randn(per_token.shape[0], generator=g)  # a reference near the policy
    half = per_token.shape[0] // 2
    inputs = {"input_ids": torch.ones_like(completion), "attention_mask": torch.ones_like(completion),
              "completion_mask": completion, "ref_chosen_logps": ref[:half], "ref_rejected_logps": ref[half:]}
    trainer = stand_in(ld_alpha=None, f_divergence_type="reverse_kl", loss_types=[kind], loss_weights=[1.0],
                       beta=beta, label_smoothing=0.0, use_weighting=False)
    trl_loss = DPOTrainer._compute_loss(trainer, fake_model(per_token), inputs, return_outputs=False)
    logged = trainer._metrics["train"]

    logps, counts = per_token.sum(1), completion[:, 1:].sum(1).float()
    method = DpoMethod(pref_loss=kind, beta=beta)
    losses, chosen, rejected = pair_losses(method, logps[:half], logps[half:], counts[:half], counts[half:],
                                           ref[:half], ref[half:])
    assert losses.mean().item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-6)
    assert chosen.mean().item() == pytest.approx(logged["rewards/chosen"][0], rel=1e-5, abs=1e-6)
    assert rejected.mean().item() == pytest.approx(logged["rewards/rejected"][0], rel=1e-5, abs=1e-6)
    assert (chosen - rejected).mean().item() == pytest.approx(logged["rewards/margins"][0], rel=1e-5, abs=1e-6)
    assert (chosen > rejected).float().mean().item() == pytest.approx(logged["rewards/accuracies"][0])


def test_conservative_dpo_equals_trls_label_smoothed_sigmoid():
    """DPO with label smoothing (cDPO, as LLaMA-Factory's dpo_label_smoothing): TRL 1.16's DPO sigmoid no longer
    takes label_smoothing, but its CPO sigmoid loss is the same label-smoothed form; fed the policy/reference
    log-ratios it is cDPO."""
    from trl.experimental.cpo import CPOTrainer

    g = torch.Generator().manual_seed(5)
    chosen, rejected = -torch.rand(6, generator=g) * 30, -torch.rand(6, generator=g) * 30
    ref_chosen, ref_rejected = chosen + torch.randn(6, generator=g), rejected + torch.randn(6, generator=g)
    counts = torch.full((6,), 10.0)
    trainer = stand_in(alpha=0.0, loss_type="sigmoid", beta=0.5, label_smoothing=0.2)
    trl_losses, _, _ = CPOTrainer.cpo_loss(trainer, chosen - ref_chosen, rejected - ref_rejected)
    losses, _, _ = pair_losses(DpoMethod(pref_loss="sigmoid", beta=0.5, label_smoothing=0.2), chosen, rejected,
                               counts, counts, ref_chosen, ref_rejected)
    torch.testing.assert_close(losses, trl_losses, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kto_equals_trl(seed):
    from trl import KTOTrainer

    completion, per_token = fixed_batch(seed, pairs=3)  # six rows, each a single answer
    g = torch.Generator().manual_seed(seed + 7)
    n = per_token.shape[0]
    desirable = torch.tensor([True, False, True, True, False, False])
    ref = per_token.sum(1) + torch.randn(n, generator=g)
    kl_logps, ref_kl_logps = -torch.rand(n, generator=g) * 20, -torch.rand(n, generator=g) * 20
    batch = {"input_ids": torch.ones_like(completion), "attention_mask": torch.ones_like(completion),
             "completion_mask": completion, "label": desirable, "ref_logps": ref, "ref_KL_logps": ref_kl_logps}
    trainer = stand_in(calculate_KL=True, loss_type="kto", beta=0.3, desirable_weight=1.0, undesirable_weight=1.5,
                       _compute_kl_logps=lambda model, b: kl_logps)
    trl_loss = KTOTrainer._compute_loss(trainer, fake_model(per_token), batch, return_outputs=False)
    logged = trainer._metrics["train"]

    logps = per_token.sum(1)
    kl = (kl_logps - ref_kl_logps).mean()  # what our trainer computes from the mismatched rows
    losses = kto_loss(logps, ref, desirable, kl, beta=0.3, desirable_weight=1.0, undesirable_weight=1.5)
    assert losses.mean().item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-6)
    assert logged["kl"][0] == pytest.approx(kl.clamp(min=0).item(), rel=1e-6)
    rewards = 0.3 * (logps - ref)
    assert rewards[desirable].mean().item() == pytest.approx(logged["rewards/chosen"][0], rel=1e-5)
    assert rewards[~desirable].mean().item() == pytest.approx(logged["rewards/rejected"][0], rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_orpo_odds_ratio_term_equals_trl(seed):
    from trl.experimental.orpo import ORPOTrainer

    g = torch.Generator().manual_seed(seed)
    chosen_avg, rejected_avg = -torch.rand(4, generator=g) * 2 - 0.05, -torch.rand(4, generator=g) * 2 - 0.05
    counts = torch.tensor([3.0, 5.0, 2.0, 7.0])
    beta = 0.2
    trl_ratio, trl_chosen, trl_rejected, _, _ = ORPOTrainer.odds_ratio_loss(stand_in(beta=beta), chosen_avg, rejected_avg)
    losses, chosen, rejected = pair_losses(DpoMethod(pref_loss="orpo", beta=beta), chosen_avg * counts,
                                           rejected_avg * counts, counts, counts)
    # ours: NLL of the chosen answer minus the odds-ratio term; TRL returns the term beta * log sigmoid(log odds)
    torch.testing.assert_close(losses, -chosen_avg - trl_ratio, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chosen, trl_chosen)
    torch.testing.assert_close(rejected, trl_rejected)


@pytest.mark.parametrize("gamma, smoothing", [(0.5, 0.0), (1.2, 0.1)])
def test_simpo_equals_trl(gamma, smoothing):
    from trl.experimental.cpo import CPOTrainer

    g = torch.Generator().manual_seed(3)
    chosen_avg, rejected_avg = -torch.rand(5, generator=g) * 2, -torch.rand(5, generator=g) * 2
    counts = torch.tensor([4.0, 1.0, 6.0, 3.0, 9.0])
    trainer = stand_in(alpha=0.0, loss_type="simpo", beta=2.0, simpo_gamma=gamma, label_smoothing=smoothing)
    trl_losses, trl_chosen, trl_rejected = CPOTrainer.cpo_loss(trainer, chosen_avg, rejected_avg)
    method = DpoMethod(pref_loss="simpo", beta=2.0, simpo_gamma=gamma, label_smoothing=smoothing)
    losses, chosen, rejected = pair_losses(method, chosen_avg * counts, rejected_avg * counts, counts, counts)
    torch.testing.assert_close(losses, trl_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chosen, trl_chosen)
    torch.testing.assert_close(rejected, trl_rejected)
