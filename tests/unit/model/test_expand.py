"""LLaMA-Pro block expansion: the expanded model computes what the original did, only the new blocks train,
and the trained run saves and reloads as a plain model with more layers."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

from tests.conftest import build_tiny_model
from tuneforge.config import LlamaProAdapter
from tuneforge.errors import ConfigError
from tuneforge.model.adapters import apply_adapter
from tuneforge.model.expand import apply_block_expansion
from tuneforge.train.run import train


def tiny_gemma3(layers=4):
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                              layer_types=["sliding_attention", "full_attention"] * (layers // 2))
    return Gemma3ForCausalLM(config).eval()


@pytest.mark.parametrize("build, new_layers, expected", [
    (lambda: build_tiny_model(100).eval(), 2, [1, 3]),
    (lambda: build_tiny_model(100).eval(), 1, [2]),
    (tiny_gemma3, 2, [2, 5]),
])
def test_expanded_model_computes_what_the_original_did(build, new_layers, expected):
    model = build()
    ids = torch.randint(0, 100, (2, 12))
    before = model(ids).logits
    types, original = getattr(model.config, "layer_types", None), len(model.model.layers)
    assert apply_block_expansion(model, new_layers) == expected
    n = model.config.num_hidden_layers
    assert len(model.model.layers) == n == original + new_layers
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(n))
    if types:  # each new block keeps the attention type (sliding or full) of the block it copies
        assert [model.config.layer_types[i] for i in expected] == [model.config.layer_types[i - 1] for i in expected]
    torch.testing.assert_close(model(ids).logits, before, atol=1e-5, rtol=0)
    # with a KV cache too: the new blocks have their own cache slots
    out = model.generate(ids[:1], max_new_tokens=3, do_sample=False, use_cache=True)
    assert out.shape == (1, 15)


def test_only_the_new_blocks_train():
    model = apply_adapter(build_tiny_model(100), LlamaProAdapter(new_layers=2, extra_modules=["norm"]))
    names = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    layers = {n.split(".")[2] for n in names if n.startswith("model.layers.")}
    assert layers == {"1", "3"} and "model.norm.weight" in names


def test_new_layers_must_divide_the_stack():
    with pytest.raises(ConfigError, match=r"new_layers: 3 must divide the model's 2 decoder layers .* \[1, 2\]"):
        apply_block_expansion(build_tiny_model(100), 3)


def test_a_llama_pro_run_trains_new_blocks_and_reloads(tiny_config, tiny_model_dir):
    tiny_config["method"]["adapter"] = {"type": "llama_pro", "new_layers": 2}
    tiny_config["train"].update(max_steps=2, learning_rate=1e-2)
    run = train(tiny_config).run_dir
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned = AutoModelForCausalLM.from_pretrained(run / "model")
    assert tuned.config.num_hidden_layers == 4
    old, new = base.state_dict(), tuned.state_dict()
    for i_new, i_old in ((0, 0), (2, 1)):  # the original blocks are unchanged
        for key, value in base.model.layers[i_old].state_dict().items():
            assert torch.equal(new[f"model.layers.{i_new}.{key}"], value), key
    assert torch.equal(new["model.embed_tokens.weight"], old["model.embed_tokens.weight"])
    for i in (1, 3):  # the new blocks moved away from their zero output projections
        assert new[f"model.layers.{i}.self_attn.o_proj.weight"].abs().sum() > 0
        assert new[f"model.layers.{i}.mlp.down_proj.weight"].abs().sum() > 0
