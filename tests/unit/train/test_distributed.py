"""Two training processes on this CPU (torchrun or accelerate launch, gloo; the Trainer's DDP, DeepSpeed ZeRO): the
same losses as one process with the same global batch for every stage (kto's KL reference point and ppo's
statistics gathered across processes), one writer of the run directory, resume after Ctrl-C."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.slow
TOLERANCE = 1e-4  # relative; float32 sums in another order (two shards, then an all-reduce)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(tmp_path, tiny_model_dir, name, stage="sft", method=None, **train):
    data = {"dataset": "identity", "dataset_dir": str(REPO / "data"), "cutoff_len": 128, "max_samples": 32,
            "placeholders": {"name": "Tiny", "author": "Tests"}}
    if stage == "kto":
        data = {"dataset": "kto_en_demo", "dataset_dir": str(REPO / "tests" / "assets" / "llamafactory"),
                "cutoff_len": 128, "max_samples": 32, "overlong": "truncate_answer"}
    if stage == "pt":
        data = {"dataset": "c4_demo", "dataset_dir": str(REPO / "data"), "cutoff_len": 64, "max_samples": 32}
    if stage in ("dpo", "rm"):
        data = {"dataset": "dpo_en_demo", "dataset_dir": str(REPO / "data"), "cutoff_len": 128, "max_samples": 32,
                "overlong": "truncate_answer"}
    cfg = {"model": {"name_or_path": str(tiny_model_dir), "cache_dir": str(tmp_path / "cache")}, "data": data,
           "method": {"stage": stage, "adapter": {"type": "lora", "rank": 4, "alpha": 8}, **(method or {})},
           "train": {"max_steps": 6, "batch_size": 4, "learning_rate": 1e-2, "logging_steps": 1, "save_steps": 100,
                     "group_by_length": False, **train},
           "output": {"run_dir": str(tmp_path / name)}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def tuneforge(*args, expect=0):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    done = subprocess.run([sys.executable, "-m", "tuneforge.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == expect, f"{args}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


@pytest.fixture(scope="module")
def one_process_sft(tmp_path_factory, tiny_model_dir):
    """The one-process LoRA SFT run that several tests compare a two-process run with, trained once."""
    folder = tmp_path_factory.mktemp("one-process-sft")
    tuneforge("train", str(config(folder, tiny_model_dir, "one")))
    return folder / "one"


def single_process_run(request, tmp_path, tiny_model_dir, stage: str):
    """The one-process run of `stage` (SFT's shared by the module's tests), its run directory."""
    if stage == "sft":
        return request.getfixturevalue("one_process_sft")
    tuneforge("train", str(config(tmp_path, tiny_model_dir, "one", stage)))
    return tmp_path / "one"


@pytest.mark.parametrize("stage", ["sft", "pt", "rm", "dpo", "kto"])
def test_two_processes_follow_the_single_process_losses(request, tmp_path, tiny_model_dir, stage):
    one = single_process_run(request, tmp_path, tiny_model_dir, stage)
    two = config(tmp_path, tiny_model_dir, "two", stage, batch_size=2)  # 2 processes x 2 rows = the same 4 rows
    out = tuneforge("train", str(two), "distributed.nproc_per_node=2", f"distributed.master_port={free_port()}")
    assert "torch.distributed.run --nproc_per_node=2" in out.stdout
    single, double = losses(one), losses(tmp_path / "two")
    assert len(single) == len(double) == 6 and single[0] != single[-1]
    assert double == pytest.approx(single, rel=TOLERANCE), (single, double)
    # written once, by rank 0: one final line in the output, one adapter, one run.json that says completed
    assert out.stdout.count("tuneforge: completed; run directory") == 1
    meta = json.loads((tmp_path / "two" / "run.json").read_text())
    assert meta["status"] == "completed" and meta["global_step"] == 6
    from safetensors.torch import load_file

    a = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-4 for k in a)


def test_an_interrupted_two_process_run_resumes_to_the_same_losses(tmp_path, tiny_model_dir):
    """Ctrl-C on `tuneforge train` (as a terminal or the web UI's Stop sends it) stops both processes after the same
    step with a checkpoint; continuing from it ends with the losses of an uninterrupted run."""
    import signal
    import time

    steps = 40  # five epochs (the order of each epoch's shards comes back too)
    whole = config(tmp_path, tiny_model_dir, "whole", batch_size=2, max_steps=steps)
    two = config(tmp_path, tiny_model_dir, "two", batch_size=2, max_steps=steps)
    tuneforge("train", str(whole), "distributed.nproc_per_node=2", f"distributed.master_port={free_port()}")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    run = tmp_path / "two"
    interrupted = subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "train", str(two),
                                    "distributed.nproc_per_node=2", f"distributed.master_port={free_port()}"],
                                   cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 300
    while not ((run / "metrics.jsonl").is_file() and len(losses(run)) >= 3) and time.monotonic() < deadline:
        assert interrupted.poll() is None, interrupted.stdout.read()[-3000:]
        time.sleep(0.02)
    interrupted.send_signal(signal.SIGINT)
    out, _ = interrupted.communicate(timeout=300)
    assert interrupted.returncode == 3, out[-3000:]
    meta = json.loads((run / "run.json").read_text())
    stopped = meta["global_step"]
    assert meta["status"] == "interrupted" and 3 <= stopped < steps, (meta, out[-3000:])
    assert [p.name for p in (run / "checkpoints").glob("checkpoint-*")] == [f"checkpoint-{stopped}"]
    assert out.count("stopping after this step") == 1 and "Traceback" not in out, out[-3000:]

    out = tuneforge("train", str(run / "config.yaml"), "train.resume_from_checkpoint=auto",
                    f"distributed.master_port={free_port()}").stdout
    meta = json.loads((run / "run.json").read_text())
    assert meta["status"] == "completed" and meta["global_step"] == steps, out[-3000:]
    by_step = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            by_step[record["step"]] = record["loss"]
    uninterrupted = losses(tmp_path / "whole")
    assert sorted(by_step) == list(range(1, steps + 1)) and len(uninterrupted) == steps
    assert [by_step[s] for s in range(1, steps + 1)] == pytest.approx(uninterrupted, rel=TOLERANCE), stopped


def test_ppo_in_two_processes_follows_the_single_process_run(tmp_path, tiny_model_dir):
    """Each process writes answers for its half of the prompts; whitening, token counts and the logged figures
    span both halves. Sampling is made greedy (top_p near 0) so that both runs see the same answers."""
    tuneforge("train", str(config(tmp_path, tiny_model_dir, "reward", "rm", max_steps=2)))
    method = {"reward_model": str(tmp_path / "reward"), "max_new_tokens": 6, "top_p": 1e-6, "ppo_epochs": 2}
    one = config(tmp_path, tiny_model_dir, "one", "ppo", method, max_steps=4)
    two = config(tmp_path, tiny_model_dir, "two", "ppo", method, max_steps=4, batch_size=2, save_steps=2)
    tuneforge("train", str(one))
    out = tuneforge("train", str(two), "distributed.nproc_per_node=2", f"distributed.master_port={free_port()}")
    assert out.stdout.count("tuneforge: completed; run directory") == 1
    saved = tmp_path / "two" / "checkpoints" / "checkpoint-2"
    assert sorted(p.name for p in saved.glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]
    # continuing from step 2 in two processes gives steps 3 and 4 again
    tuneforge("train", str(two), "distributed.nproc_per_node=2", f"distributed.master_port={free_port()}",
              f"output.run_dir={tmp_path / 'again'}", f"train.resume_from_checkpoint={saved}")
    read = lambda run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    single, double = read("one"), read("two")
    assert [m["step"] for m in single] == [m["step"] for m in double] == [1, 2, 3, 4]
    for key in ("loss", "policy_loss", "value_loss", "reward", "kl", "answer_tokens"):
        assert [m[key] for m in double] == pytest.approx([m[key] for m in single], rel=1e-3, abs=1e-5), key
    assert single[0]["loss"] != single[-1]["loss"]
    again = read("again")
    assert [m["step"] for m in again] == [3, 4]
    for key in ("loss", "reward", "kl"):
        assert [m[key] for m in again] == pytest.approx([m[key] for m in double[2:]], rel=1e-5, abs=1e-7), key
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-4 for k in a)


@pytest.mark.parametrize("engine", ["ds_z2", "ds_z3_offload"])
def test_deepspeed_in_two_processes_follows_the_single_process_losses(tmp_path, tiny_model_dir, one_process_sft,
                                                                       engine):
    """DeepSpeed ZeRO through the Trainer, on DeepSpeed's CPU accelerator: ZeRO-2 shards gradients and optimizer
    states; ZeRO-3 with offload also shards the weights and keeps them and the optimizer in CPU memory."""
    two = config(tmp_path, tiny_model_dir, "two", batch_size=2,
                 deepspeed=str(REPO / "examples" / "deepspeed" / f"{engine}.json"))
    out = tuneforge("train", str(two), "distributed.nproc_per_node=2", f"distributed.master_port={free_port()}")
    assert out.stdout.count("tuneforge: completed; run directory") == 1
    single, double = losses(one_process_sft), losses(tmp_path / "two")
    assert len(double) == 6 and double == pytest.approx(single, rel=TOLERANCE), (single, double)
    from safetensors.torch import load_file

    a = load_file(str(one_process_sft / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))  # gathered from the shards
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape and (a[k] - b[k]).abs().max() < 1e-4 for k in a)


def test_full_training_under_zero3_saves_whole_weights_that_export(tmp_path, tiny_model_dir):
    """ZeRO-3 holds a shard of every weight in each process; the saved model is whole (equal to one process's
    training) and `tuneforge export` turns the run into a model folder."""
    full = {"method.adapter.type=full", "train.learning_rate=1e-4"}
    one = config(tmp_path, tiny_model_dir, "one")
    two = config(tmp_path, tiny_model_dir, "two", batch_size=2,
                 deepspeed=str(REPO / "examples" / "deepspeed" / "ds_z3.json"))
    tuneforge("train", str(one), *full)
    tuneforge("train", str(two), *full, "distributed.nproc_per_node=2", f"distributed.master_port={free_port()}")
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=TOLERANCE)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape and (a[k] - b[k]).abs().max() < 1e-5 for k in a)
    tuneforge("export", str(tmp_path / "two"), "--out", str(tmp_path / "exported"))
    import torch

    exported = load_file(str(tmp_path / "exported" / "model.safetensors"))
    assert exported.keys() == b.keys() and all(torch.equal(exported[k], b[k]) for k in b)


def test_started_by_accelerate_launch_it_trains_as_under_its_own_launcher(tmp_path, tiny_model_dir, one_process_sft):
    """`accelerate launch -m tuneforge.cli train` (accelerate starts the processes; `--multi_gpu` is its name for
    DDP, which runs on gloo here) gives the single-process losses and one run directory."""
    two = config(tmp_path, tiny_model_dir, "two", batch_size=2)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--main_process_port", str(free_port()), "-m", "tuneforge.cli", "train", str(two)],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "training under torchrun" not in done.stdout  # no second launcher inside accelerate's
    assert done.stdout.count("tuneforge: completed; run directory") == 1
    assert losses(tmp_path / "two") == pytest.approx(losses(one_process_sft), rel=TOLERANCE)


def test_a_stream_in_two_processes_follows_the_single_process_stream(tmp_path, tiny_model_dir):
    """data.streaming: each process reads the stream and keeps its share of every batch."""
    one = config(tmp_path, tiny_model_dir, "one")
    two = config(tmp_path, tiny_model_dir, "two", batch_size=2)
    stream = ["data.streaming=true", "data.buffer_size=8"]
    tuneforge("train", str(one), *stream)
    tuneforge("train", str(two), *stream, "distributed.nproc_per_node=2", f"distributed.master_port={free_port()}")
    single, double = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(double) == 6 and double == pytest.approx(single, rel=TOLERANCE), (single, double)
