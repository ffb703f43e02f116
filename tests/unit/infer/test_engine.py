import shutil

import pytest
import torch

from tuneforge.errors import ConfigError
from tuneforge.infer.engine import Engine, GenerationSettings
from tuneforge.model.runs import run_base_model
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


def full_forward_logprob(engine, prompt: list[int], continuation: list[int]) -> float:
    with torch.no_grad():
        logp = torch.log_softmax(engine.model(input_ids=torch.tensor([prompt + continuation])).logits[0].float(), -1)
    return sum(logp[len(prompt) + j - 1, t].item() for j, t in enumerate(continuation))


def test_label_scores_are_label_plus_end_of_answer_under_a_full_forward(tiny_run):
    engine = Engine.load(str(tiny_run))
    conversations = [[{"role": "user", "content": t}] for t in ("good product", "bad product, broke in a day", "x")]
    labels = ["1", "0", "positively"]
    ids = engine.label_ids(labels)
    end = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert all(i[-1] == end for i in ids) and engine.tokenizer.decode(ids[2][:-1]) == "positively"
    scores = engine.score_labels(conversations, labels, batch_size=2)
    for c, row in zip(conversations, scores):
        expected = [full_forward_logprob(engine, engine.prompt_ids(c), i) for i in ids]
        assert row == pytest.approx(expected, abs=1e-4)


def test_a_label_that_extends_another_can_win(tiny_model_dir, tmp_path):
    """With labels 1, 10 and 100 a model trained to answer 10 must predict 10: summed without the end-of-answer
    token, "1" scores at least as high as "10" whenever "10" is written "1" + "0"."""
    import json

    from tuneforge.train.run import train

    folder = tmp_path / "data"
    folder.mkdir()
    rows = [{"instruction": f"Pick a number for item {i}", "output": "10"} for i in range(16)]
    (folder / "tens.json").write_text(json.dumps(rows))
    (folder / "dataset_info.json").write_text(json.dumps({"tens": {"file_name": "tens.json"}}))
    run = train({"model": {"name_or_path": str(tiny_model_dir), "cache_dir": str(tmp_path / "cache")},
                 "data": {"dataset": "tens", "dataset_dir": str(folder), "cutoff_len": 64},
                 "method": {"adapter": {"type": "full"}},
                 "train": {"max_steps": 60, "batch_size": 8, "learning_rate": 1e-2, "save_steps": 1000,
                           "lr_scheduler": "constant", "logging_steps": 40},
                 "output": {"run_dir": str(tmp_path / "run")}}).run_dir
    engine = Engine.load(str(run))
    one, ten, hundred = engine.label_ids(["1", "10", "100"])
    assert ten[: len(one) - 1] == one[:-1] and len(ten) > len(one)  # "10" continues the tokens of "1"
    conversations = [[{"role": "user", "content": f"Pick a number for item {i}"}] for i in (20, 21)]
    for row in engine.score_labels(conversations, ["1", "10", "100"]):
        assert max(range(3), key=row.__getitem__) == 1


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


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"])
def test_shared_prompt_scoring_equals_reading_every_row_in_full(tokenizer, kind):
    """Label scores from one cached pass per prompt equal full passes over prompt + label, for every family, with
    prompts of different lengths (left padding) and, for Gemma 3, longer than its sliding window."""
    from tests.conftest import build_family_model
    from tuneforge.model.scoring import continuations_after_shared_prompts

    extra = {"sliding_window": 8, "num_hidden_layers": 6} if kind == "gemma3_text" else {}
    engine = Engine(build_family_model(kind, len(tokenizer), **extra), tokenizer, ["<|im_end|>"])
    conversations = [[{"role": "user", "content": t}] for t in
                     ("good", "a much longer review that goes on about the product for a while", "bad, broke")]
    labels = ["1", "0", "positively", "100"]
    label_ids = engine.label_ids(labels)
    prompts = [engine.prompt_ids(c) for c in conversations]
    with torch.no_grad():
        shared = continuations_after_shared_prompts(engine.model, prompts, label_ids, tokenizer.pad_token_id)
    full = engine.continuation_logprobs([p for p in prompts for _ in label_ids], [i for _ in prompts for i in label_ids])
    assert shared.flatten().tolist() == pytest.approx(full, abs=2e-4)
    assert engine.score_labels(conversations, labels) == [pytest.approx(r, abs=2e-4) for r in shared.tolist()]
