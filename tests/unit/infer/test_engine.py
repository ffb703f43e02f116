import shutil

import pytest
import torch

from tuneforge.errors import ConfigError
from tuneforge.infer.engine import Engine, GenerationSettings, run_base_model
from tuneforge.rundir import open_run


def test_engine_loads_a_run_and_chats_greedily(tiny_run):
    engine = Engine.load(str(tiny_run))
    messages = [{"role": "user", "content": "Who are you?"}]
    settings = GenerationSettings(max_new_tokens=8)
    first, second = engine.chat(messages, settings), engine.chat(messages, settings)
    assert isinstance(first, str) and first == second  # greedy is deterministic
    assert "".join(engine.stream_chat(messages, settings)).strip() == first


def test_the_trained_default_system_prompt_is_used_at_inference(tiny_run):
    engine = Engine.load(str(tiny_run))
    assert engine.default_system == "Be brief."
    ids = engine._inputs([{"role": "user", "content": "hi"}])["input_ids"][0]
    assert engine.tokenizer.decode(ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_engine_loads_a_plain_model_with_a_named_template(tiny_model_dir):
    engine = Engine.load(str(tiny_model_dir), template="alpaca")
    assert "### Response:" in engine.tokenizer.apply_chat_template([{"role": "user", "content": "x"}],
                                                                  add_generation_prompt=True, tokenize=False)
    assert isinstance(engine.chat([{"role": "user", "content": "x"}], GenerationSettings(max_new_tokens=3)), str)


def test_a_folder_that_is_not_a_run_is_explained(tmp_path):
    (tmp_path / "run.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a TuneForge run directory"):
        Engine.from_run(tmp_path)


def test_batched_generation_equals_one_at_a_time(tiny_run):
    engine = Engine.load(str(tiny_run))
    conversations = [[{"role": "user", "content": text}] for text in ("Who are you?", "Hello there, how are you today?", "x")]
    settings = GenerationSettings(max_new_tokens=6)
    batched = engine.generate_batch(conversations, settings, batch_size=3)
    assert [g.text for g in batched] == [engine.chat(c, settings) for c in conversations]


def test_label_scores_agree_between_the_single_token_and_general_paths(tiny_run):
    engine = Engine.load(str(tiny_run))
    conversations = [[{"role": "user", "content": t}] for t in ("good product", "bad product, broke in a day")]
    labels = ["1", "0"]
    assert [len(ids) for ids in engine.label_ids(labels)] == [1, 1]
    fast = engine.score_labels(conversations, labels, batch_size=2)
    prompts = [engine.prompt_ids(c) for c in conversations]
    for k, ids in enumerate(engine.label_ids(labels)):
        slow = engine._continuation_logprob(prompts, ids)
        assert [row[k] for row in fast] == pytest.approx(slow, abs=1e-4)
    # a multi-token label scores the sum of its tokens' log-probabilities
    (ids,) = engine.label_ids(["positively"])
    assert len(ids) >= 2
    several = engine.score_labels(conversations, ["positively", "1"], batch_size=2)
    expected = [0.0, 0.0]
    for k, token in enumerate(ids):
        step = engine._last_logprobs([p + ids[:k] for p in prompts])[:, token]
        expected = [e + v for e, v in zip(expected, step.tolist())]
    assert [r[0] for r in several] == pytest.approx(expected, abs=1e-4)


def test_answer_nll_counts_answer_tokens_only(tiny_run):
    import torch

    engine = Engine.load(str(tiny_run))
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    nll, count = engine.answer_nll([conversation])
    prompt = engine.prompt_ids(conversation[:1])
    full = engine.tokenizer.apply_chat_template(engine.with_system(conversation), return_dict=False)
    assert count == len(full) - len(prompt)
    with torch.no_grad():
        logp = torch.log_softmax(engine.model(input_ids=torch.tensor([full])).logits[0].float(), -1)
    expected = -sum(logp[t - 1, full[t]].item() for t in range(len(prompt), len(full)))
    assert nll == pytest.approx(expected, rel=1e-4)


def test_vllm_backend_without_vllm_says_what_is_needed(tiny_run):
    import importlib.util

    from tuneforge.errors import ModelError

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    with pytest.raises(ModelError, match="backend vllm needs the vllm package"):
        Engine.load(str(tiny_run), backend="vllm")


def test_a_run_whose_base_model_folder_is_gone_finds_it_again(tiny_run, tmp_path):
    moved = shutil.copytree(tiny_run, tmp_path / "run")
    open_run(moved).update_meta(base_model=str(tmp_path / "cleared-cache" / "model"))
    run = open_run(moved)
    assert run_base_model(run) == run.config().model.name_or_path  # resolved again from the config
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        expected = Engine.load(str(tiny_run)).model(input_ids=ids).logits
        assert torch.equal(Engine.load(str(moved)).model(input_ids=ids).logits, expected)
