import pytest

from tests.conftest import build_tiny_model
from tuneforge.config import FreezeAdapter, FullAdapter, LoraAdapter
from tuneforge.errors import ConfigError
from tuneforge.model.adapters import apply_adapter, count_params, decoder_layers


def trainable(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_lora_all_targets_every_linear_layer_and_trains_only_adapters():
    model = apply_adapter(build_tiny_model(100), LoraAdapter(rank=2, alpha=4))
    names = trainable(model)
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    targeted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names}
    assert targeted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(names) == 2 * 7 * 2  # A and B, 7 linears, 2 layers


def test_lora_named_targets_are_checked():
    model = apply_adapter(build_tiny_model(100), LoraAdapter(target_modules=["q_proj", "v_proj"]))
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable(model)} == {"q_proj", "v_proj"}
    with pytest.raises(ConfigError, match=r"\['qkv'\] are not linear layers of this model"):
        apply_adapter(build_tiny_model(100), LoraAdapter(target_modules=["qkv"]))


def test_lora_on_the_last_layers_only():
    model = apply_adapter(build_tiny_model(100), LoraAdapter(rank=2, last_layers=1))
    names = trainable(model)
    assert names and all(".layers.1." in n for n in names) and len(names) == 2 * 7
    with pytest.raises(ConfigError, match="last_layers: 3 but the model has 2 layers"):
        apply_adapter(build_tiny_model(100), LoraAdapter(last_layers=3))


def test_freeze_trains_the_last_layers_only():
    model = apply_adapter(build_tiny_model(100), FreezeAdapter(trainable_layers=1))
    names = trainable(model)
    assert names and all(n.startswith("model.layers.1.") for n in names)
    assert len(names) == len([n for n, _ in model.model.layers[1].named_parameters()])


def test_freeze_first_layers_submodules_and_extra_modules():
    model = apply_adapter(build_tiny_model(100), FreezeAdapter(trainable_layers=-1, trainable_modules=["mlp"],
                                                               extra_modules=["norm"]))
    names = trainable(model)
    assert [n for n in names if n.startswith("model.layers")] == [
        "model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"]
    assert "model.norm.weight" in names


def test_freeze_errors_list_what_exists():
    with pytest.raises(ConfigError, match="trainable_layers: 5 but the model has 2 layers"):
        apply_adapter(build_tiny_model(100), FreezeAdapter(trainable_layers=5))
    with pytest.raises(ConfigError, match=r"\['attn'\] match nothing"):
        apply_adapter(build_tiny_model(100), FreezeAdapter(trainable_modules=["attn"]))


def test_full_trains_everything_and_tied_weights_count_once():
    model = apply_adapter(build_tiny_model(100), FullAdapter())
    count = count_params(model)
    assert count.trainable == count.total
    assert count.total == sum(p.numel() for p in model.parameters())  # parameters() already dedups tied weights
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_decoder_layers_finds_the_block_stack():
    name, layers = decoder_layers(build_tiny_model(100))
    assert name == "model.layers" and len(layers) == 2


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_lora_forward_matches_peft_in_outputs_and_gradients(dropout):
    """The adapters' products added in place (addmm_) give PEFT's outputs and gradients; the base projection's
    output is not kept by anything, so the in-place sum is legal for autograd in training. Siblings reading the
    same input (query/key/value, gate/up) share one down-projection product when there is no dropout."""
    import copy

    import torch
    from peft.tuners.lora.layer import Linear as LoraLinear

    from tuneforge.model.adapters import fused_lora_forward, share_lora_inputs

    torch.manual_seed(0)
    theirs = apply_adapter(build_tiny_model(100), LoraAdapter(rank=4, alpha=12, dropout=dropout)).train()
    for name, p in theirs.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)  # B not zero: the adapters change every output
    ours = copy.deepcopy(theirs)
    assert fused_lora_forward(ours) == 14 and fused_lora_forward(ours) == 0  # 7 linears x 2 layers, once
    assert share_lora_inputs(ours) == 4 and share_lora_inputs(ours) == 0  # (q, k, v) and (gate, up) x 2 layers
    downs = []
    for module in ours.modules():
        if isinstance(module, LoraLinear):
            module.lora_A["default"].register_forward_hook(lambda m, a, out: downs.append(out.shape))
    ids = torch.randint(3, 100, (2, 16))
    results = []
    for model in (theirs, ours):
        torch.manual_seed(5)  # the same dropout masks
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        results.append((out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    # without dropout only the output and down projections call their own A; with it every layer does
    assert len(downs) == (14 if dropout else 4)
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    assert len(results[0][1]) == 28
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-5, atol=1e-7)
    layer = next(m for m in ours.eval().modules() if isinstance(m, LoraLinear))  # eval: no dropout draws
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        expected = layer._peft_forward(x)
        with ours.disable_adapter():  # PEFT's own path where adapters are off
            torch.testing.assert_close(layer(x), layer.base_layer(x))
        handle = layer.base_layer.register_forward_hook(lambda m, a, out: out * 2)  # a hook on the base: PEFT's path
        try:
            torch.testing.assert_close(layer(x), layer._peft_forward(x))
            assert not torch.allclose(layer(x), expected)
        finally:
            handle.remove()


def test_shared_lora_input_when_the_query_reads_other_rows():
    """In the last layer the query projection reads only the supervised rows while key and value read them all:
    the query computes its own product, key and value still share one, and the group keeps nothing afterwards."""
    import torch
    from peft.tuners.lora.layer import Linear as LoraLinear

    from tuneforge.model.adapters import fused_lora_forward, share_lora_inputs

    torch.manual_seed(0)
    model = apply_adapter(build_tiny_model(100), LoraAdapter(rank=4, alpha=12)).train()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    fused_lora_forward(model)
    share_lora_inputs(model)
    attention = model.base_model.model.model.layers[0].self_attn
    calls = []
    for proj in ("q_proj", "k_proj", "v_proj"):
        layer = getattr(attention, proj)
        layer.lora_A["default"].register_forward_hook(lambda m, a, out, proj=proj: calls.append(proj))
    group = attention.q_proj._shared_input
    x = torch.randn(2, 5, attention.q_proj.in_features, requires_grad=True)
    kept = x[:, -2:]
    outs = [attention.q_proj(kept), attention.k_proj(x), attention.v_proj(x)]
    assert group.stacked is None and group.source is None  # key and value took their parts: nothing held
    assert calls == []  # every down-projection came from a stacked product
    sum(o.square().sum() for o in outs).backward()
    trained = {n: p for n, p in attention.named_parameters() if p.requires_grad and n[0] in "qkv"}
    grads = {n: p.grad.clone() for n, p in trained.items()}
    assert len(grads) == 6
    grad_x = x.grad.clone()
    attention.zero_grad()
    x.grad = None
    reference = [getattr(attention, p)._peft_forward(t) for p, t in (("q_proj", kept), ("k_proj", x), ("v_proj", x))]
    for ours, theirs in zip(outs, reference):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    sum(o.square().sum() for o in reference).backward()
    torch.testing.assert_close(x.grad, grad_x, rtol=1e-5, atol=1e-6)
    for n, p in trained.items():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-6)
    assert isinstance(attention.q_proj, LoraLinear)


def _grads_and_step(model, ids, use_head=True):
    """Gradients of one backward pass (the LM loss, or without the output layer only the hidden states), then the
    weights after one AdamW step."""
    import torch

    if use_head:
        loss = model(input_ids=ids, labels=ids).loss
    else:
        loss = model.model(input_ids=ids).last_hidden_state.pow(2).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert not any(g.is_sparse for g in grads.values())
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    torch.optim.AdamW(model.parameters(), lr=1e-2).step()
    return grads, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["llama", "gemma3_text"])
@pytest.mark.parametrize("use_head", [True, False])
def test_sparse_tied_embedding_grads_give_the_dense_gradients_and_step(kind, use_head):
    """The tied embedding's lookup adds its rows into the output layer's gradient: every gradient and the weights
    after an AdamW step equal those of the usual dense path. Without the output layer in the loss the lookup's
    gradient arrives alone, sparse, and is made dense as it lands."""
    import torch

    from tests.conftest import build_family_model
    from tuneforge.model.adapters import sparse_tied_embedding_grads

    ids = torch.tensor([[3, 17, 17, 40, 9, 2], [3, 5, 88, 17, 2, 2]])
    dense = apply_adapter(build_family_model(kind, 128), FullAdapter())
    sparse = apply_adapter(build_family_model(kind, 128), FullAdapter())
    assert sparse_tied_embedding_grads(sparse) and sparse.get_input_embeddings().sparse
    dense_grads, dense_after = _grads_and_step(dense, ids, use_head)
    sparse_grads, sparse_after = _grads_and_step(sparse, ids, use_head)
    assert dense_grads.keys() == sparse_grads.keys()
    for name, grad in dense_grads.items():
        torch.testing.assert_close(sparse_grads[name], grad, rtol=1e-6, atol=1e-7, msg=name)
    for name, weight in dense_after.items():
        torch.testing.assert_close(sparse_after[name], weight, rtol=1e-6, atol=1e-7, msg=name)


def test_sparse_tied_embedding_grads_only_where_they_apply(monkeypatch):
    """Untied or frozen embeddings, and several processes, keep the dense lookup gradient."""
    import torch

    from tuneforge.model.adapters import sparse_tied_embedding_grads

    untied = build_tiny_model(100)
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    assert not sparse_tied_embedding_grads(untied)
    assert not sparse_tied_embedding_grads(apply_adapter(build_tiny_model(100), LoraAdapter(rank=2)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    model = build_tiny_model(100)
    assert not sparse_tied_embedding_grads(model) and not model.get_input_embeddings().sparse
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert sparse_tied_embedding_grads(model) and not sparse_tied_embedding_grads(model)  # once


def test_sparse_tied_embedding_grads_skip_a_model_that_does_not_name_its_embeddings():
    import torch

    from tuneforge.model.adapters import sparse_tied_embedding_grads

    class Opaque(torch.nn.Module):
        def get_input_embeddings(self):
            raise NotImplementedError

        def get_output_embeddings(self):
            return None

    assert not sparse_tied_embedding_grads(Opaque())
