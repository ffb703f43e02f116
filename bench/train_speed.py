"""TuneForge vs LLaMA-Factory on identical LoRA work, in one invocation.

    python bench/train_speed.py --rows 400 --dev 200
    python bench/train_speed.py --models smollm2-135m-instruct --rows 200 --lf-variants default,no_checkpointing

Work, the same for both: LoRA rank 8 (alpha 16, no dropout) on every linear layer of the decoder blocks, fp32,
the first --rows rows of data/reviews_zh_train.jsonl as alpaca rows (instruction "判断这条商品评论的情感：好评输出1，
差评输出0", input the review, output 1 or 0), cutoff 256, batch 8, one epoch, the same learning rate and schedule,
the same converted model folder. LLaMA-Factory is installed the way a user would (`pip install llamafactory`)
into a throw-away virtual environment under ~/.cache/tuneforge/bench (kept for later runs), with its defaults
(gradient checkpointing on; `--lf-variants no_checkpointing` adds a run without it).

Printed per model and framework: training rows/s and supervised tokens/s (from each trainer's train_runtime,
so model loading and tokenization are excluded, less the seconds spent reading the matmul rate between steps, see
below), tokens/s (real tokens, padding not counted), peak RSS of the
training process, final train loss, dev accuracy (both adapters scored by the same TuneForge label scorer on the
first --dev rows of reviews_zh_dev, balanced), and model FLOPs utilisation against the fp32 matmul peak that the
script measures first. Useful FLOPs per token are counted the same way for both: 4 x the decoder blocks' weights
per real token (forward, and the backward pass through frozen weights) plus 4 x hidden x vocabulary per
supervised token (the LM head where a loss is taken). TuneForge computes a prompt that every row of a batch
starts with once for the batch (here the template's header and the instruction); "run MFU" counts those
positions once (run.json's shared_prompt_tokens), i.e. the FLOPs that ran. The machine's speed drifts (it is
shared, and its matmul rate moves by a fifth within a minute): each training command runs under
bench/step_rates.py, which reads the peak (the fastest of five 2048 x 2048 products) at the first step boundary
after every 10 s of training; "step MFU" divides by those readings, each step weighted by its time and the mean of
the readings around it, the rate the run itself had. The comparison line also shows the median matmul rate read
just before and just after each training run, to judge whether one framework ran on a slower machine than the
other. Not a test: the figures depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
import yaml
from step_rates import matmul_peak_gflops, weighted_rate

from tuneforge.allocator import find_library, preload_environment

REPO = Path(__file__).resolve().parents[1]
LLAMAFACTORY = "llamafactory==0.9.5"
VENV = Path.home() / ".cache" / "tuneforge" / "bench" / "llamafactory-venv"
INSTRUCTION = "判断这条商品评论的情感：好评输出1，差评输出0"
TEMPLATES = {"smollm2-135m-instruct": ("chatml", "chatml"), "gemma3-270m": ("gemma", "gemma2"),
             "qwen2.5-0.5b-random": ("chatml", "chatml"), "qwen2.5-1.5b-random": ("chatml", "chatml")}  # TF, LF
# The published architectures of Qwen2.5-0.5B and Qwen2.5-1.5B (their config.json on the Hugging Face hub), built
# with random weights for the scale curve: speed and memory depend on the shape, not on the values. The token ids
# come from SmolLM2's tokenizer (49,152 ids, all inside Qwen's 151,936-row embedding).
QWEN25 = {"qwen2.5-0.5b-random": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768),
          "qwen2.5-1.5b-random": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                      num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=131072)}
STEP_RATES = REPO / "bench" / "step_rates.py"
MODELS = Path.home() / ".cache" / "tuneforge" / "bench" / "models"


@dataclass
class Result:
    framework: str
    runtime: float  # train_runtime reported by the trainer, seconds
    wall: float  # the whole command, seconds
    peak_rss: int
    train_loss: float
    accuracy: float = float("nan")
    variant: str = "lora"
    target: Path | None = None  # run directory / output folder
    estimate: int | None = None  # tuneforge check's peak estimate, bytes
    work: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # per row: real tokens, supervised tokens,
    # useful FLOPs; and the decoder blocks' FLOPs per token
    shared: int = 0  # token positions TuneForge computed once for a whole batch (its rows' shared prompt)
    peaks: tuple[float, float] = (float("nan"), float("nan"))  # median matmul rate just before and after the run
    step_rate: float = float("nan")  # the matmul rate read between the run's steps, weighted by step time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2-135m-instruct,gemma3-270m")
    parser.add_argument("--rows", type=int, default=400, help="first N training rows")
    parser.add_argument("--dev", type=int, default=200, help="dev rows scored after training")
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--lf-variants", default="default",
                        help="default and/or no_checkpointing; empty: no LLaMA-Factory runs")
    parser.add_argument("--tf-variants", default="lora", help="lora and/or full (full training, TuneForge only)")
    parser.add_argument("--venv", type=Path, default=VENV, help="LLaMA-Factory's virtual environment")
    parser.add_argument("--work", type=Path, default=None, help="folder for data and runs (default: a temp dir)")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="tuneforge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    cli = ensure_llamafactory(args.venv)
    data_dir = write_data(work / "data", args.rows, args.dev)
    peak = matmul_peak_gflops()
    print(f"fp32 matmul peak of this machine: {peak:.1f} GFLOP/s ({torch.get_num_threads()} threads)", flush=True)
    table = []
    for model in args.models.split(","):
        table.append((model, run_model(model, args, cli, data_dir, work)))
    again = matmul_peak_gflops()  # a second reading: one taken while the machine is still busy reads low
    print(f"fp32 matmul peak measured again after the runs: {again:.1f} GFLOP/s; MFU uses the higher", flush=True)
    print_table(table, args.rows, max(peak, again))


def ensure_llamafactory(venv: Path) -> Path:
    """pip install llamafactory into its own venv with this machine's torch build pinned; torchvision's CUDA
    build breaks transformers' import on CPU (removed), torchaudio is imported by LLaMA-Factory but only used for
    audio data, so its CUDA libraries are removed and the Python part stays."""
    cli = venv / "bin" / "llamafactory-cli"
    if cli.exists():
        return cli
    print(f"installing {LLAMAFACTORY} into {venv} (a few minutes, once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    constraints = venv / "constraints.txt"
    constraints.write_text(f"torch=={torch.__version__.split('+')[0]}\n")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["-c", str(constraints), LLAMAFACTORY], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "uninstall", "-q", "-y", "torchvision"], check=True)
    site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    for lib in (Path(site) / "torchaudio" / "lib").glob("*.so"):
        lib.unlink()
    return cli


def write_data(folder: Path, rows: int, dev: int) -> Path:
    """The same alpaca files and dataset_info.json for both frameworks; dev rows balanced between labels."""
    folder.mkdir(parents=True, exist_ok=True)
    train = [json.loads(x) for x in (REPO / "data" / "reviews_zh_train.jsonl").open(encoding="utf-8")][:rows]
    dev_rows = [json.loads(x) for x in (REPO / "data" / "reviews_zh_dev.jsonl").open(encoding="utf-8")]
    by_label = [[r for r in dev_rows if r["label"] == k] for k in (0, 1)]
    dev_rows = [r for pair in zip(*by_label) for r in pair][:dev]
    info = {}
    for name, part in (("bench_train", train), ("bench_dev", dev_rows)):
        alpaca = [{"instruction": INSTRUCTION, "input": r["text"], "output": str(r["label"])} for r in part]
        (folder / f"{name}.json").write_text(json.dumps(alpaca, ensure_ascii=False), encoding="utf-8")
        info[name] = {"file_name": f"{name}.json"}
    (folder / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    positives = sum(r["label"] for r in train)
    print(f"data: {len(train)} training rows ({positives} positive), {len(dev_rows)} dev rows (balanced)", flush=True)
    return folder


def run_tracked(cmd: list[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> tuple[float, int]:
    """Run a command, its output to `log`; wall seconds and the peak resident memory of its process tree."""
    start, peak = time.perf_counter(), 0
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        ps = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak = max(peak, sum(p.memory_info().rss for p in [ps] + ps.children(recursive=True)))
            except psutil.Error:
                pass
            time.sleep(0.2)
    if proc.returncode:
        raise SystemExit(f"{cmd[0]} failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - start, peak


def random_model(name: str) -> str:
    """A folder with a randomly initialised Qwen2.5 model of the published shape and SmolLM2's tokenizer, made once
    and kept under ~/.cache/tuneforge/bench/models."""
    folder = MODELS / name
    if (folder / "config.json").exists():
        return str(folder)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tuneforge.config import ModelConfig
    from tuneforge.model.loader import load_tokenizer, resolve_model

    print(f"{name}: building a randomly initialised model (no weights are downloaded; its outputs mean nothing)",
          flush=True)
    tokenizer = load_tokenizer(resolve_model(ModelConfig(name_or_path="smollm2-135m-instruct")).path)
    config = Qwen2Config(vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True,
                         hidden_act="silu", use_sliding_window=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **QWEN25[name])
    torch.manual_seed(0)
    tmp = folder.with_suffix(".partial")
    Qwen2ForCausalLM(config).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    return str(folder)


def run_model(model: str, args, cli: Path, data_dir: Path, work: Path):
    from tuneforge.config import ModelConfig
    from tuneforge.model.loader import resolve_model

    if model in QWEN25:
        path = random_model(model)
    else:
        path = resolve_model(ModelConfig(name_or_path=model)).path  # the converted folder both frameworks load
    tf_template, lf_template = TEMPLATES[model]
    name = path if model in QWEN25 else model
    results = [run_tuneforge(name, tf_template, data_dir, work / f"tf-{model}-{v}", args, v)
               for v in args.tf_variants.split(",") if v]
    lf_results = [run_llamafactory(cli, path, lf_template, data_dir, work / f"lf-{model}-{v}", args,
                                   checkpointing=v == "default") for v in args.lf_variants.split(",") if v]
    if model not in QWEN25 and args.dev:  # random weights: an accuracy would mean nothing
        for r in results + lf_results:
            r.accuracy = dev_accuracy(r.target, path, tf_template, data_dir, args.dev)
            print(f"  {r.framework}: dev accuracy {r.accuracy:.3f}", flush=True)
    for r in results + lf_results:
        r.work = work_per_row(name, path, tf_template, data_dir, full=r.variant == "full")
    return results + lf_results


def run_tuneforge(model: str, template: str, data_dir: Path, out: Path, args, variant: str) -> Result:
    adapter = ({"type": "lora", "rank": 8, "alpha": 16, "target_modules": "all"} if variant == "lora"
               else {"type": "full"})
    config = {
        "model": {"name_or_path": model, "template": template},
        "data": {"dataset": "bench_train", "dataset_dir": str(data_dir), "cutoff_len": 256},
        "method": {"stage": "sft", "adapter": adapter},
        "train": {"num_epochs": 1, "batch_size": 8, "lr_scheduler": "cosine", "logging_steps": 5,
                  "learning_rate": args.learning_rate if variant == "lora" else args.learning_rate / 20,
                  "save_steps": 100000, "seed": 42},
        "output": {"run_dir": str(out), "overwrite": True, "plot_loss": False},
    }
    cfg_path = out.with_suffix(".yaml")
    cfg_path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    estimate = estimated_peak(cfg_path)
    framework = "TuneForge" + ("" if variant == "lora" else " (full)")
    print(f"{Path(model).name}: {framework} training (estimated peak {estimate / 2 ** 30:.2f} GiB)", flush=True)
    before = matmul_peak_gflops(median=True)
    rates = out.with_suffix(".rates.json")
    library = find_library()  # preloaded here as the CLI would, so that it does not restart without the callback
    env = preload_environment(dict(os.environ), library) if library else None
    wall, rss = run_tracked([sys.executable, str(STEP_RATES), str(rates), "tuneforge", "train", str(cfg_path)],
                            out.with_suffix(".log"), env=env)
    peaks = (before, matmul_peak_gflops(median=True))
    metrics = json.loads((out / "run.json").read_text())["metrics"]
    record = json.loads(rates.read_text())
    return Result(framework, metrics["train_runtime"] - record["reading_seconds"], wall, rss,
                  metrics["train_loss"], variant=variant, target=out, estimate=estimate,
                  shared=int(metrics.get("shared_prompt_tokens", 0)), peaks=peaks, step_rate=weighted_rate(record))


def estimated_peak(cfg_path: Path) -> int:
    """`tuneforge check`'s peak-memory estimate for the config, read from its output, in bytes."""
    out = subprocess.run([sys.executable, "-m", "tuneforge", "check", str(cfg_path)], capture_output=True,
                         text=True, check=True).stdout
    match = re.search(r"memory estimate: ~([0-9.]+) GiB", out)
    if not match:
        raise SystemExit(f"no memory estimate in tuneforge check's output:\n{out}")
    return int(float(match.group(1)) * 2 ** 30)


def run_llamafactory(cli: Path, path: str, template: str, data_dir: Path, out: Path, args,
                     checkpointing: bool) -> Result:
    config = {
        "model_name_or_path": path, "trust_remote_code": False, "stage": "sft", "do_train": True,
        "finetuning_type": "lora", "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0, "lora_target": "all",
        "dataset_dir": str(data_dir), "dataset": "bench_train", "template": template, "cutoff_len": 256,
        "overwrite_cache": True, "preprocessing_num_workers": 1, "output_dir": str(out), "logging_steps": 5,
        "save_strategy": "no", "plot_loss": False, "overwrite_output_dir": True, "report_to": "none",
        "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "learning_rate": args.learning_rate,
        "num_train_epochs": 1.0, "lr_scheduler_type": "cosine", "bf16": False, "fp16": False, "seed": 42,
    }
    if not checkpointing:
        config["disable_gradient_checkpointing"] = True
    cfg_path = out.with_suffix(".yaml")
    cfg_path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for key in ("VIRTUAL_ENV", "LD_PRELOAD", "TUNEFORGE_ALLOCATOR_ACTIVE"):  # LLaMA-Factory as its users run it
        env.pop(key, None)
    name = "LLaMA-Factory" + ("" if checkpointing else " (no checkpointing)")
    print(f"{Path(path).name}: {name} training", flush=True)
    before = matmul_peak_gflops(median=True)
    rates = out.with_suffix(".rates.json")
    wall, rss = run_tracked([str(cli.parent / "python"), str(STEP_RATES), str(rates), "llamafactory.cli", "train",
                             str(cfg_path)], out.with_suffix(".log"), env=env, cwd=out.parent)
    peaks = (before, matmul_peak_gflops(median=True))
    metrics = json.loads((out / "all_results.json").read_text())
    record = json.loads(rates.read_text())
    return Result(name, metrics["train_runtime"] - record["reading_seconds"], wall, rss, metrics["train_loss"],
                  target=out, peaks=peaks, step_rate=weighted_rate(record))


def dev_accuracy(target: Path, base_path: str, template: str, data_dir: Path, dev: int) -> float:
    """Score both labels for each dev row with TuneForge's scorer: a TuneForge run directory, or a LLaMA-Factory
    output folder (a PEFT adapter on the same base)."""
    from peft import PeftModel

    from tuneforge.config import DataConfig
    from tuneforge.data.pipeline import load_examples
    from tuneforge.data.template import resolve_template
    from tuneforge.evaluate.predict import predict, split_answers
    from tuneforge.infer.engine import Engine
    from tuneforge.model.loader import load_model, load_tokenizer

    if (target / "run.json").exists():
        engine = Engine.from_run(target)
    else:
        tokenizer = load_tokenizer(base_path)
        chat, _ = resolve_template(template, tokenizer)
        tokenizer.chat_template = chat.jinja
        model = PeftModel.from_pretrained(load_model(base_path), str(target))
        engine = Engine(model, tokenizer, list(chat.stop), f"LLaMA-Factory adapter {target}")
    spec, conversion = load_examples("bench_dev", DataConfig(dataset=["bench_dev"], dataset_dir=str(data_dir)), dev)
    prompts, references = split_answers(conversion.examples, spec.name)
    result = predict(engine, prompts, references, mode="score", labels=["0", "1"], progress=False)
    return result.metrics["accuracy"]


def work_per_row(model: str, path: str, template: str, data_dir: Path,
                 full: bool) -> tuple[float, float, float, float]:
    """(real tokens, supervised tokens, useful FLOPs) per training row, from TuneForge's tokenization, and the
    decoder blocks' FLOPs per token. Per real
    token the decoder blocks cost 2 x weights forward and 2 x backward to their inputs, plus 2 x for the weights'
    own gradients in full training (LoRA's are negligible); the LM head counts where a loss is taken."""
    from transformers import AutoConfig

    from tuneforge.config import load_config
    from tuneforge.train.prepare import prepare

    cfg = load_config({"model": {"name_or_path": model, "template": template},
                       "data": {"dataset": "bench_train", "dataset_dir": str(data_dir), "cutoff_len": 256}})
    stats = prepare(cfg).data.train.stats()
    c = AutoConfig.from_pretrained(path)
    c = getattr(c, "text_config", None) or c
    heads, kv = c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    block = (c.hidden_size * head_dim * (2 * heads + 2 * kv) + 3 * c.hidden_size * c.intermediate_size)
    factor = 6 if full else 4
    flops = (factor * block * c.num_hidden_layers * stats["tokens"]
             + factor * c.hidden_size * c.vocab_size * stats["supervised_tokens"])
    n = stats["sequences"]
    return stats["tokens"] / n, stats["supervised_tokens"] / n, flops / n, factor * block * c.num_hidden_layers


def print_table(table, rows: int, peak: float) -> None:
    header = (f"{'model':<24}{'framework':<34}{'rows/s':>8}{'sup tok/s':>11}{'tok/s':>8}{'peak RSS':>10}"
              f"{'estimate':>10}{'est err':>9}{'loss':>8}{'dev acc':>9}{'MFU':>7}{'step MFU':>10}{'run MFU':>9}"
              f"{'wall s':>8}")
    print("\n" + header + "\n" + "-" * len(header))
    for model, results in table:
        for r in results:
            tokens, supervised, flops, per_token = r.work
            run_flops = flops - r.shared / rows * per_token  # what ran: the shared prompts once per batch
            rows_s = rows / r.runtime
            estimate = f"{r.estimate / 2 ** 30:>7.2f}GiB{(r.estimate - r.peak_rss) / r.peak_rss:>+9.1%}" \
                if r.estimate else f"{'-':>10}{'-':>9}"
            accuracy = f"{r.accuracy:>9.3f}" if r.accuracy == r.accuracy else f"{'-':>9}"
            print(f"{model:<24}{r.framework:<34}{rows_s:>8.2f}{rows_s * supervised:>11.1f}{rows_s * tokens:>8.0f}"
                  f"{r.peak_rss / 2 ** 30:>7.2f}GiB{estimate}{r.train_loss:>8.3f}{accuracy}"
                  f"{rows_s * flops / (peak * 1e9):>7.1%}{rows_s * flops / (r.step_rate * 1e9):>10.1%}"
                  f"{rows_s * run_flops / (peak * 1e9):>9.1%}{r.wall:>8.0f}")
        ours = next((r for r in results if r.variant == "lora" and r.framework.startswith("TuneForge")), None)
        for r in results:
            if ours and not r.framework.startswith("TuneForge"):
                print(f"{'':<24}TuneForge / {r.framework}: {r.runtime / ours.runtime:.2f}x rows/s, "
                      f"{ours.peak_rss / r.peak_rss:.2f}x peak RSS")
                print(f"{'':<24}matmul rate around each run (median, before and after): TuneForge "
                      f"{ours.peaks[0]:.0f}, {ours.peaks[1]:.0f}; {r.framework} {r.peaks[0]:.0f}, "
                      f"{r.peaks[1]:.0f} GFLOP/s; between steps (weighted by step time): TuneForge "
                      f"{ours.step_rate:.0f}, {r.framework} {r.step_rate:.0f} GFLOP/s")
    print(f"\nMFU: useful model FLOPs per second over the measured fp32 matmul peak ({peak:.1f} GFLOP/s, the higher "
          "of the readings before and after all runs); step MFU: over the peak read between the run's own steps "
          "(bench/step_rates.py), weighted by step time; run MFU: the FLOPs that ran, where TuneForge computed a "
          "prompt shared by a batch's rows once for the batch.")
    if any(model in QWEN25 for model, _ in table):
        print("qwen2.5-*-random: the published Qwen2.5 shapes with random weights (speed and memory only; the loss "
              "and accuracy of random weights mean nothing).")
    print("estimate: tuneforge check's peak-memory estimate before training; est err: its error against the "
          "measured peak RSS.")


if __name__ == "__main__":
    main()
