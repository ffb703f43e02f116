"""Mixture-of-Depths conversion on tiny random Llama and Gemma3 models: routing, training, save/load, errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tests.conftest import build_tiny_model
from tuneforge.errors import ConfigError, ModelError
from tuneforge.model.depth import CONFIG_KEY, RoutedLayer, apply_mixture_of_depths, load_mixture_of_depths

VOCAB, T = 600, 8


def build_tiny_gemma3(seed: int = 0):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    # Routed layers 1 (sliding window 4 < T: a real 4-D sliding mask to gather) and 3 (full attention).
    config = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                              layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                           "full_attention"], max_position_embeddings=512, pad_token_id=0)
    return Gemma3ForCausalLM(config)


BUILDERS = {"llama": lambda: build_tiny_model(VOCAB), "gemma3": build_tiny_gemma3}


@pytest.fixture(params=sorted(BUILDERS))
def base(request):
    return BUILDERS[request.param]().eval()


def ids(batch: int = 2, seq: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randint(4, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def converted(model, capacity: float, layers=None):
    apply_mixture_of_depths(model, capacity, layers)
    return model


def logits(model, input_ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids, **kwargs).logits


class Constant(nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, h):  # (B, T, D) -> (B, T, 1)
        return h.new_full((*h.shape[:-1], 1), self.value)


def test_default_layers_skip_layer_0_and_config_records_them(base):
    n = len(base.model.layers)
    assert apply_mixture_of_depths(base, 0.5) == list(range(1, n, 2))
    assert base.config.tuneforge_mixture_of_depths == {"capacity": 0.5, "layers": list(range(1, n, 2))}
    assert base.config.use_cache is False and base.generation_config.use_cache is False
    routers = sorted(name for name, _ in base.named_parameters() if "mod_router" in name)
    assert routers == [f"model.layers.{i}.mod_router.weight" for i in range(1, n, 2)]


def test_full_capacity_with_saturated_router_equals_the_plain_model(base):
    x = ids()
    expected = logits(base, x)
    model = converted(base, 1.0)
    for i in model.config.tuneforge_mixture_of_depths["layers"]:
        model.model.layers[i].mod_router = Constant(30.0)  # sigmoid(30) == 1 in float32: the unscaled update
    torch.testing.assert_close(logits(model, x), expected, atol=1e-5, rtol=0)


def test_half_capacity_processes_top_k_tokens_and_passes_the_rest_through(base):
    model = converted(base, 0.5)
    layer = model.model.layers[1]
    seen = {}
    layer.mlp.register_forward_hook(lambda m, args, out: seen.update(mlp_in=args[0].shape))
    layer.register_forward_hook(lambda m, args, out: seen.update(h_in=args[0], h_out=out))
    logits(model, ids(seq=T))
    k = T // 2
    assert seen["mlp_in"] == (2, k, 32)
    h_in, h_out = seen["h_in"], seen["h_out"]
    with torch.no_grad():
        scores = layer.mod_router(h_in).squeeze(-1)  # (B, T)
    top = scores.topk(k, dim=1).indices.sort(dim=1).values  # (B, k)
    changed = (h_out != h_in).any(-1)  # (B, T)
    for b in range(2):
        assert changed[b].nonzero().flatten().tolist() == top[b].tolist()
        assert torch.equal(h_out[b, ~changed[b]], h_in[b, ~changed[b]])


def test_routed_tokens_run_in_order_at_their_own_positions_with_a_scaled_update(base):
    """Recompute a routed layer by hand: the plain layer on the top-k tokens in sequence order, with their original
    rotary positions and a mask built from those positions (causal; Gemma3's layer 1 also a window of 4)."""
    model = converted(base, 0.5)
    layer, gemma = model.model.layers[1], model.config.model_type == "gemma3_text"
    seen = {}
    layer.register_forward_hook(lambda m, args, out: seen.update(h_in=args[0], h_out=out))
    logits(model, ids())
    h = seen["h_in"]  # (B, T, D)
    with torch.no_grad():
        scores = layer.mod_router(h).squeeze(-1)  # (B, T)
        idx = scores.topk(T // 2, dim=1).indices.sort(dim=1).values  # (B, k)
        sub = torch.stack([h[b, idx[b]] for b in range(2)])  # (B, k, D)
        rope = model.model.rotary_emb(sub, idx, *(["sliding_attention"] if gemma else []))
        query, key = idx[:, None, :, None], idx[:, None, None, :]
        allowed = (key <= query) & (query - key < (model.config.sliding_window if gemma else T))  # (B, 1, k, k)
        update = super(RoutedLayer, layer).forward(sub, attention_mask=allowed, position_embeddings=rope,
                                                   position_ids=idx) - sub
        expected = h.clone()
        for b in range(2):
            expected[b, idx[b]] = sub[b] + torch.sigmoid(scores[b, idx[b], None]) * update[b]
    torch.testing.assert_close(seen["h_out"], expected, atol=1e-6, rtol=0)


def test_one_step_changes_the_routers_and_the_routed_layers(base):
    model = converted(base, 0.5).train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    x = ids()
    model(x, labels=x).loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    unchanged = [name for name, p in model.named_parameters() if torch.equal(p, before[name])]
    assert unchanged == []


def test_save_and_load_reproduces_the_converted_model(base, tmp_path):
    from transformers import AutoModelForCausalLM

    model = converted(base, 0.5)
    x = ids()
    expected = logits(model, x)
    model.save_pretrained(tmp_path)
    layers = model.config.tuneforge_mixture_of_depths["layers"]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["tuneforge_mixture_of_depths"] == {"capacity": 0.5, "layers": layers}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    plain_keys = set(loaded.state_dict())
    assert load_mixture_of_depths(loaded, tmp_path) == layers
    # Layer weights keep their names: only the routers are new keys.
    assert sorted(set(loaded.state_dict()) - plain_keys) == sorted(k for k in model.state_dict() if "mod_router" in k)
    torch.testing.assert_close(logits(loaded, x), expected, atol=1e-6, rtol=0)


def test_load_of_a_plain_model_converts_nothing(tmp_path):
    model = build_tiny_model(VOCAB)
    model.save_pretrained(tmp_path)
    assert load_mixture_of_depths(model, tmp_path) == []


def test_load_without_router_weights_names_them(tmp_path):
    model = build_tiny_model(VOCAB)
    model.save_pretrained(tmp_path)
    model.config.tuneforge_mixture_of_depths = {"capacity": 0.5, "layers": [1]}
    with pytest.raises(ModelError, match=r"lack the router weights \['model.layers.1.mod_router.weight'\]"):
        load_mixture_of_depths(model, tmp_path)


@pytest.mark.parametrize("padding", ["right", "left"])
def test_padded_batch(padding):
    """The unpadded row is routed as when alone; the padded row matches its unpadded self at capacity 1.0
    only, since at lower capacity k comes from the padded length and padding tokens can be selected."""
    short = ids(1, T - 2, seed=2)
    full = ids(1, T, seed=3)
    pad = torch.zeros(1, 2, dtype=torch.long)
    row = torch.cat([short, pad] if padding == "right" else [pad, short], dim=1)
    batch = torch.cat([full, row])
    mask = (batch != 0).long()  # token ids start at 4, so 0 is only padding
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # (B, T): left padding keeps the real tokens at 0..
    real = slice(0, T - 2) if padding == "right" else slice(2, T)
    for capacity in (0.5, 1.0):
        model = converted(build_tiny_model(VOCAB).eval(), capacity)
        batched = logits(model, batch, attention_mask=mask, position_ids=positions)
        torch.testing.assert_close(batched[0], logits(model, full)[0], atol=1e-5, rtol=0)
        if capacity == 1.0:
            torch.testing.assert_close(batched[1, real], logits(model, short)[0], atol=1e-5, rtol=0)


def test_kv_cache_is_refused_and_generation_runs_without_it():
    model = converted(build_tiny_model(VOCAB).eval(), 0.5)
    x = ids(1)
    with pytest.raises(ModelError, match="use_cache=False"):
        model(x, use_cache=True)
    out = model.generate(x, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert out[0, T].item() == logits(model, x)[0, -1].argmax().item()


def test_bad_arguments_are_reported_together():
    model = build_tiny_model(VOCAB)
    with pytest.raises(ConfigError) as err:
        apply_mixture_of_depths(model, 1.5, [1, 2, 1])
    assert err.value.problems == [
        "Mixture-of-Depths: capacity is 1.5; expected a share of tokens in (0, 1], e.g. 0.125 or 0.5",
        "Mixture-of-Depths: layers [2] do not exist; the model has 2 layers (0..1)",
        "Mixture-of-Depths: layers is [1, 2, 1]; expected distinct layer indices, at least one",
    ]
    with pytest.raises(ConfigError, match=r"capacity is 0; expected a share of tokens in \(0, 1\]"):
        apply_mixture_of_depths(model, 0)
    apply_mixture_of_depths(model, 0.5)
    with pytest.raises(ConfigError, match=r"layers \[1\] are already routed"):
        apply_mixture_of_depths(model, 0.5, [1])


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    with pytest.raises(ConfigError, match=r"model type 'gpt2' is not supported; "
                                          r"supported: llama, mistral, qwen2, qwen3, gemma3_text"):
        apply_mixture_of_depths(model, 0.5)


# ---- as a config switch: model.mixture_of_depths trains, saves and reloads through a run directory ----

def test_a_mixture_of_depths_run_trains_routers_and_reloads(tiny_config):
    from tuneforge.infer.engine import Engine, GenerationSettings
    from tuneforge.train.run import train

    tiny_config["model"]["mixture_of_depths"] = {"capacity": 0.5}
    tiny_config["method"]["adapter"] = {"type": "freeze", "trainable_layers": 1}
    tiny_config["train"].update(max_steps=2, learning_rate=1e-2)
    run = train(tiny_config).run_dir
    engine = Engine.from_run(run)
    model = engine.model
    layer = model.model.layers[1]
    assert isinstance(layer, RoutedLayer) and layer.mod_capacity == 0.5
    saved = json.loads((run / "model" / "config.json").read_text())
    assert saved[CONFIG_KEY] == {"capacity": 0.5, "layers": [1]}
    settings = GenerationSettings(max_new_tokens=4, temperature=0)
    batch = engine.generate_batch([[{"role": "user", "content": "Who are you?"}]], settings)
    assert len(batch) == 1 and batch[0].text is not None  # cache-free generation runs through routed layers


def test_mixture_of_depths_needs_full_or_freeze_training(tiny_config):
    from tuneforge.config import load_config

    tiny_config["model"]["mixture_of_depths"] = {"capacity": 0.5}
    with pytest.raises(ConfigError, match="mixture_of_depths trains new routers"):
        load_config(tiny_config)
