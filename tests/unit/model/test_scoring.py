"""Logits, log-probabilities and rewards at chosen positions, against full forward passes of every supported family."""

import gc
import math
import os
import socket

import pytest
import torch

from tests.conftest import FAMILIES, build_family_model, build_tiny_model
from tuneforge.model.scoring import (causal_lm_loss_sum, forward_at, frozen_plain_head, head_cross_entropy,
                                     last_layer_sees_only, last_token_rewards, next_token_mask, next_token_targets,
                                     sequence_logprobs, shared_prefix_length, supervised_logits, supervised_loss_sum)


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


def batch(vocab: int):
    torch.manual_seed(1)
    ids = torch.randint(4, vocab, (3, 12))
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0  # right padding
    labels = ids.clone()
    labels[:, :5] = -100
    labels[2, 9:] = -100
    return ids, mask, labels


@pytest.mark.parametrize("kind", FAMILIES)
def test_logits_at_chosen_positions_equal_the_full_forward(kind):
    overrides = {"final_logit_softcapping": 5.0} if kind == "gemma3_text" else {}  # capping applies after the head
    model = build_family_model(kind, 96, **overrides)
    ids, mask, labels = batch(96)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        keep = next_token_mask(labels)
        at_mask, hidden = forward_at(model, keep, input_ids=ids, attention_mask=mask)
        assert at_mask.logits.shape == (int(keep.sum()), 96) and hidden.shape == (int(keep.sum()), 64)
        torch.testing.assert_close(at_mask.logits, full[keep], rtol=1e-5, atol=1e-5)
        positions = torch.tensor([[4, 7], [0, 11], [3, 8]])
        at_index, _ = forward_at(model, positions, input_ids=ids, attention_mask=mask)
        assert at_index.logits.shape == (3, 2, 96)
        torch.testing.assert_close(at_index.logits, torch.take_along_dim(full, positions[..., None], dim=1),
                                   rtol=1e-5, atol=1e-5)
        # the supervised loss equals the model's own loss over the same labels
        logits, targets = supervised_logits(model, labels, input_ids=ids, attention_mask=mask)
        ours = causal_lm_loss_sum(logits, targets) / targets.numel()
        torch.testing.assert_close(ours, model(input_ids=ids, attention_mask=mask, labels=labels).loss,
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cap", [None, 5.0], ids=["plain", "softcapped"])
@pytest.mark.parametrize("k", [0, 1, 37])
def test_single_pass_head_loss_and_gradient_against_torch_cross_entropy(cap, k):
    """The one-pass loss over vocabulary slices (here 9 slices of 112 rows and a last one of 92) against torch's
    own cross-entropy of the full logits, computed in float64; float32 torch on the same inputs sets the
    tolerance the single pass must meet."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(1100, 48, generator=gen) * 0.3
    hidden = torch.randn(k, 48, generator=gen)
    targets = torch.randint(0, 1100, (k,), generator=gen)

    def reference(h, w):
        h = h.clone().requires_grad_()
        logits = h @ w.t()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        loss.backward()
        return loss.detach(), h.grad

    exact_loss, exact_grad = reference(hidden.double(), weight.double())
    torch_loss, torch_grad = reference(hidden, weight)
    h = hidden.clone().requires_grad_()
    ours = head_cross_entropy(h, weight, targets, cap, slice_bytes=112 * 48 * 4)
    (ours * 2.5).backward()  # the upstream gradient scales the saved one
    assert ours.dtype == torch.float32 and h.grad.shape == (k, 48)
    def worst(a, b):
        return float((a.double() - b).abs().max()) if a.numel() else 0.0

    loss_tol = 4 * worst(torch_loss, exact_loss) + 1e-5 * max(1.0, float(exact_loss.abs()))
    assert abs(float(ours.detach()) - float(exact_loss)) <= loss_tol
    assert worst(h.grad / 2.5, exact_grad) <= 4 * worst(torch_grad, exact_grad) + 1e-6
    if k:
        assert float(exact_grad.abs().max()) > 0.1  # a real gradient, not zeros matching zeros


def _lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                            init_lora_weights=False)).train()


@pytest.mark.parametrize("kind", FAMILIES)
def test_supervised_loss_through_the_single_pass_equals_the_logits_path(kind):
    """With a frozen head (LoRA) the training loss skips the head's logits and the last layer's MLP, queries and
    attention output away from the supervised positions. Its loss and every trainable weight's gradient are as
    close to the logits path in float64 as the float32 logits path is (within 4x its largest error, plus 1e-6
    of the loss or 1e-6 absolute for gradients)."""
    import copy

    overrides = {"final_logit_softcapping": 5.0} if kind == "gemma3_text" else {}
    model = _lora(build_family_model(kind, 96, **overrides))
    exact_model = copy.deepcopy(model).double()
    ids, mask, labels = batch(96)
    assert frozen_plain_head(model) is not None and frozen_plain_head(exact_model) is None  # float32 heads only

    def loss_and_grads(m, fn):
        m.zero_grad(set_to_none=True)
        loss = fn(m)
        loss.backward()
        return loss.detach().double(), {n: p.grad.double() for n, p in m.named_parameters() if p.requires_grad}

    def logits_path(m):
        logits, targets = supervised_logits(m, labels, input_ids=ids, attention_mask=mask)
        return causal_lm_loss_sum(logits, targets)

    exact, exact_grads = loss_and_grads(exact_model, logits_path)
    plain, plain_grads = loss_and_grads(model, logits_path)
    seen = []
    last = model.get_base_model().model.layers[-1]
    handles = [m.base_layer.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape[:-1])))
               for m in (last.mlp.gate_proj, last.self_attn.q_proj, last.self_attn.o_proj, last.self_attn.k_proj)]
    loss, grads = loss_and_grads(model, lambda m: supervised_loss_sum(m, labels, input_ids=ids, attention_mask=mask)[0])
    for handle in handles:
        handle.remove()
    supervised = int((labels[:, 1:] != -100).sum())
    # the last layer's MLP, queries and attention output at the supervised positions only; keys everywhere
    assert sorted(seen) == sorted([(supervised,), (supervised,), (supervised,), (3, 12)])
    assert abs(float(loss - exact)) <= 4 * abs(float(plain - exact)) + 1e-6 * abs(float(exact))
    assert grads.keys() == exact_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        error, bound = (grad - exact_grads[name]).abs().max(), (plain_grads[name] - exact_grads[name]).abs().max()
        assert error <= 4 * bound + 1e-6, (name, float(error), float(bound))
        assert exact_grads[name].abs().max() > 1e-4, name  # every adapter gets a real gradient


def shared_batch(vocab: int):
    """Four rows that start with the same 7 tokens (a template header and one instruction), one right-padded,
    supervised from position 10 (row 1 from 12)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, vocab, (4, 16), generator=g)
    ids[:, :7] = ids[0, :7]
    mask = torch.ones_like(ids)
    mask[2, 12:] = 0
    labels = ids.clone()
    labels[:, :10] = -100
    labels[1, :12] = -100
    labels[2, 12:] = -100
    return ids, mask, labels


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("kind", FAMILIES)
def test_a_prompt_every_row_shares_runs_once(kind, lora):
    """The batch runs as one row: the 7 shared tokens once, then the other 9 of each row (padding left out),
    which attend to them.
    Loss and every trainable weight's gradient (embeddings included in full training) are as close to the
    float64 logits path without sharing as the float32 one is (within 4x its largest error)."""
    import copy

    overrides = {"final_logit_softcapping": 5.0} if kind == "gemma3_text" else {}
    model = build_family_model(kind, 96, **overrides)
    model = _lora(model) if lora else model.train()
    exact_model = copy.deepcopy(model).double()
    ids, mask, labels = shared_batch(96)
    inputs = {"input_ids": ids, "attention_mask": mask}
    assert shared_prefix_length(model, labels, inputs) == 7

    def loss_and_grads(m, fn):
        m.zero_grad(set_to_none=True)
        loss = fn(m)
        loss.backward()
        return loss.detach().double(), {n: p.grad.double() for n, p in m.named_parameters() if p.grad is not None}

    def logits_path(m):  # no sharing
        return causal_lm_loss_sum(*supervised_logits(m, labels, **inputs))

    exact, exact_grads = loss_and_grads(exact_model, logits_path)
    plain, plain_grads = loss_and_grads(model, logits_path)
    first = (model.get_base_model() if lora else model).model.layers[0].self_attn.k_proj
    seen = []
    handle = (first.base_layer if lora else first).register_forward_pre_hook(
        lambda _m, args: seen.append(tuple(args[0].shape[:-1])))
    loss, grads = loss_and_grads(model, lambda m: supervised_loss_sum(m, labels, **inputs)[0])
    handle.remove()
    assert seen == [(1, 7 + 4 * 9 - 4)]  # the prompt once, then the rest of every row but row 2's padding
    assert abs(float(loss - exact)) <= 4 * abs(float(plain - exact)) + 1e-6 * abs(float(exact))
    assert grads.keys() == exact_grads.keys() and len(grads) >= 20
    for name, grad in grads.items():
        error, bound = (grad - exact_grads[name]).abs().max(), (plain_grads[name] - exact_grads[name]).abs().max()
        assert error <= 4 * bound + 1e-6, (name, float(error), float(bound))
    if not lora:  # the shared tokens' embedding rows collect the gradient of all four rows
        embedding = "model.embed_tokens.weight"
        assert exact_grads[embedding][ids[0, :7]].abs().max() > 1e-4


def test_no_shared_prompt_where_running_it_once_would_change_the_result():
    import copy

    model = _lora(build_family_model("llama", 96))
    ids, mask, labels = shared_batch(96)
    inputs = {"input_ids": ids, "attention_mask": mask}
    assert shared_prefix_length(model, labels, inputs) == 7
    early = labels.clone()
    early[3, 5] = ids[3, 5]  # a loss inside the common part: only the tokens before it are shared
    assert shared_prefix_length(model, early, inputs) == 4
    short = {"input_ids": ids[:, :3], "attention_mask": mask[:, :3]}  # 2 x 3 tokens: not worth a second call
    assert shared_prefix_length(model, labels[:, :3], short) == 0
    left = {"input_ids": ids, "attention_mask": mask.flip(1)}  # left padding: no common real prefix
    assert shared_prefix_length(model, labels, left) == 0
    holed = mask.clone()
    holed[3, 13] = 0  # padding inside a row: the one-row layout would drop it and pair 12 with 14's label
    assert shared_prefix_length(model, labels, {**inputs, "attention_mask": holed}) == 0
    read_at_padding = labels.clone()
    read_at_padding[2, 14] = ids[2, 14]  # a loss at a padding position: that position would not run
    assert shared_prefix_length(model, read_at_padding, inputs) == 0
    assert shared_prefix_length(model, labels, {**inputs, "position_ids": torch.arange(16).expand(4, -1)}) == 0
    assert shared_prefix_length(model, labels[:1], {k: v[:1] for k, v in inputs.items()}) == 0
    with torch.no_grad():
        assert shared_prefix_length(model, labels, inputs) == 0
    dropout = _lora_dropout(build_family_model("llama", 96))
    assert shared_prefix_length(dropout, labels, inputs) == 0  # one dropout mask would serve every row
    assert shared_prefix_length(dropout.eval(), labels, inputs) == 7  # dropout off: exact again
    checkpointed = copy.deepcopy(model)
    checkpointed.get_base_model().gradient_checkpointing_enable()
    assert shared_prefix_length(checkpointed, labels, inputs) == 0  # the prompt would rerun outside the call

    class Wrapper(torch.nn.Module):  # DistributedDataParallel's shape: one forward per backward expected
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert shared_prefix_length(Wrapper(model), labels, inputs) == 0


def _lora_dropout(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear")).train()


def test_the_logits_path_where_the_head_trains_or_layers_recompute():
    """Full training trains the head: no single pass. Under gradient checkpointing the last layer runs again in
    backward, outside the loss call: its MLP and queries compute everywhere."""
    model = build_family_model("llama", 96).train()
    assert frozen_plain_head(model) is None
    lora = _lora(build_family_model("llama", 96))
    lora.get_base_model().gradient_checkpointing_enable()
    ids, mask, labels = batch(96)
    seen = []
    last = lora.get_base_model().model.layers[-1]
    handles = [m.base_layer.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape)))
               for m in (last.mlp.gate_proj, last.self_attn.q_proj)]
    with last_layer_sees_only(lora, next_token_mask(labels)):
        lora(input_ids=ids, attention_mask=mask)
    for handle in handles:
        handle.remove()
    assert seen == [(3, 12, 64), (3, 12, 64)]


def test_sequence_logprobs_equal_a_full_forward_pass():
    model = build_tiny_model(50)
    ids, mask, labels = batch(50)
    with torch.no_grad():
        sums, counts = sequence_logprobs(model, ids, mask, labels)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits, -1)  # (B, T, V)
    for row in range(3):
        expected = sum(logp[row, t - 1, ids[row, t]].item() for t in range(12) if labels[row, t] != -100)
        assert sums[row].item() == pytest.approx(expected, abs=1e-4)
        assert counts[row].item() == int((labels[row] != -100).sum())


def reward_model(pad_is_eos: bool = True):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1, eos_token_id=2,
                         pad_token_id=2 if pad_is_eos else 0)
    return LlamaForSequenceClassification(config).eval()


def manual_rewards(model, rows):
    """Each row alone, unpadded: the score layer at its last token."""
    with torch.no_grad():
        return [model.score(model.model(input_ids=torch.tensor([r])).last_hidden_state[0, -1]).item() for r in rows]


def test_rewards_at_the_last_real_token_when_the_pad_token_is_the_end_of_turn_token():
    model = reward_model(pad_is_eos=True)
    rows = [[5, 6, 7, 2], [8, 9, 2], [10, 11, 12, 13, 2]]  # every answer ends with eos, which is also the pad
    ids = torch.tensor([r + [2] * (5 - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (5 - len(r)) for r in rows])
    with torch.no_grad():
        got = last_token_rewards(model, ids, mask)
        pooled_by_the_model = model(input_ids=ids, attention_mask=mask).logits[:, 0]
    assert got.tolist() == pytest.approx(manual_rewards(model, rows), abs=1e-5)
    # the model's own pooling takes the last token that is not the pad, i.e. the one before eos: wrong here
    assert pooled_by_the_model.tolist() != pytest.approx(got.tolist(), abs=1e-3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rewards_through_a_distributed_wrapper_reach_the_score_layer():
    """Under DistributedDataParallel the reward forward runs through the wrapper (gradients synchronised) and the
    score layer still gets its gradient."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = reward_model()
    rows = [[5, 6, 7, 2], [8, 9, 2, 2]]
    ids, mask = torch.tensor(rows), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    expected = last_token_rewards(model, ids, mask).detach()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(model)
        rewards = last_token_rewards(wrapped, ids, mask)
        rewards.sum().backward()
        rewards = rewards.detach()
        # the wrapper's reducer goes before its process group: freed after it, gloo's teardown can hang
        del wrapped
        gc.collect()
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(rewards, expected)
    assert model.score.weight.grad is not None and model.score.weight.grad.abs().sum() > 0
