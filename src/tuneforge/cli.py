"""tuneforge train|check|convert|chat|predict|eval|export|webui|api|env: thin wrappers over the Python API. User errors print without a traceback."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from tuneforge.errors import UserError

OVERRIDES_HELP = "overrides such as train.learning_rate=1e-4 data.dataset=identity,alpaca_en_demo"


def _count(minimum: int):
    """An argparse type for whole numbers of at least `minimum` (a bad value is a usage error, exit 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def _generation_settings(args):
    """The generation flags as settings; out-of-range values are named by their flag."""
    from pydantic import ValidationError

    from tuneforge.errors import ConfigError
    from tuneforge.infer.engine import GenerationSettings

    values = {k: getattr(args, k) for k in GenerationSettings.model_fields if hasattr(args, k)}
    try:
        return GenerationSettings(**values)
    except ValidationError as exc:
        raise ConfigError(*[f"--{str(e['loc'][0]).replace('_', '-')}: {e['msg']} (given {e['input']!r})"
                            for e in exc.errors()]) from None


def main(argv: list[str] | None = None) -> int:
    # PEFT still calls a transformers method renamed in v5; the notice says nothing a user can act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if argv is None:  # run as a program: restart with a memory allocator that returns freed memory, if installed
        from tuneforge.allocator import restart_with_allocator

        restart_with_allocator(args.func.__name__.lstrip("_"), sys.argv[1:])
    try:
        return args.func(args) or 0
    except UserError as err:
        print(err.render(), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ntuneforge: interrupted", file=sys.stderr)
        return 130


ADAPTER_HELP = ("a LoRA adapter (run directory or adapter folder) merged onto the model TARGET; repeat for several, "
                "applied in order")
TARGET_HELP = ("run directory (e.g. runs/quickstart), model name/path, or a LLaMA-Factory inference YAML "
               "(model_name_or_path, adapter_name_or_path, template)")


def build_parser() -> argparse.ArgumentParser:
    from tuneforge import __version__
    from tuneforge.config.help import schema_help

    parser = argparse.ArgumentParser(prog="tuneforge", description="Fine-tune language models from a YAML config.")
    parser.add_argument("--version", action="version", version=f"tuneforge {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND")
    epilog = "config keys:\n" + schema_help()
    for name, func, text in (("train", _train, "fine-tune as the config says; results go to output.run_dir"),
                             ("check", _check, "validate config, data and model without training")):
        p = sub.add_parser(name, help=text, description=text, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("config", help="YAML config file")
        p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
        if name == "check":
            p.add_argument("--measure", type=_count(0), default=0, metavar="STEPS",
                           help="also train STEPS steps (plus a warm-up step) to time an epoch and measure peak memory")
        p.set_defaults(func=func)
    p = sub.add_parser("convert", help="translate a LLaMA-Factory config into a TuneForge config",
                       description="Print (or write with --out) the TuneForge config a flat LLaMA-Factory YAML "
                       "becomes, with the LLaMA-Factory behaviour kept where defaults differ and the keys ignored. "
                       "train and check read LLaMA-Factory configs directly; this shows what they run.")
    p.add_argument("config", help="LLaMA-Factory YAML config")
    p.add_argument("overrides", nargs="*", help="overrides, in LLaMA-Factory's spelling (lora_rank=16) or "
                   "TuneForge's (method.adapter.rank=16)")
    p.add_argument("--out", help="write the TuneForge YAML here instead of printing it")
    p.set_defaults(func=_convert)
    p = sub.add_parser("chat", help="talk to a run directory or a model", description="Chat with a fine-tuned run "
                       "directory or any model TuneForge can load. Commands in the chat: /clear, /exit.")
    p.add_argument("target", help=TARGET_HELP)
    p.add_argument("--prompt", help="ask once, print the answer and exit")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--template", default="auto", help="chat template when TARGET is a model (default: auto)")
    p.add_argument("--adapter", action="append", default=[], metavar="PATH", help=ADAPTER_HELP)
    p.add_argument("--max-new-tokens", type=_count(1), default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=_count(0), default=0, help="0 = no limit")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="vllm needs a GPU and the vllm package")
    p.set_defaults(func=_chat)
    p = sub.add_parser("predict", help="run a model over a data set; write predictions.jsonl and metrics.json",
                       description="Label scoring (answers from a small label set) or free generation, batched.")
    p.add_argument("target", help=TARGET_HELP)
    p.add_argument("--data", required=True, help="data set name in dataset_info.json, or a data file")
    p.add_argument("--dataset-dir", default="data", help="folder of dataset_info.json (default: data)")
    p.add_argument("--out", help="output folder (default: RUN_DIR/predict/NAME or predict/NAME)")
    p.add_argument("--mode", choices=["auto", "score", "generate"], default="auto")
    p.add_argument("--labels", help="candidate labels, comma-separated (default: detected)")
    p.add_argument("--max-samples", type=_count(1))
    p.add_argument("--batch-size", type=_count(1), default=16)
    p.add_argument("--max-new-tokens", type=_count(1), default=64)
    p.add_argument("--template", default="auto", help="chat template when TARGET is a model")
    p.add_argument("--adapter", action="append", default=[], metavar="PATH", help=ADAPTER_HELP)
    p.add_argument("--system", help="system prompt for every row (default: the run's)")
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="vllm needs a GPU and the vllm package")
    p.set_defaults(func=_predict)
    p = sub.add_parser("eval", help="fine-tuned vs base on the config's eval data, with forgetting and repetition checks",
                       epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="the training config (its output.run_dir and eval section are used)")
    p.add_argument("overrides", nargs="*", help="overrides such as eval.dataset=reviews_zh_dev eval.max_samples=200")
    p.set_defaults(func=_eval)
    p = sub.add_parser("export", help="merge the adapter and save a Hugging Face folder or a GGUF file",
                       description="hf: safetensors shards, tokenizer with the trained chat template, generation "
                       "config, model card. gguf: one GGUF file (llama, qwen2, qwen3, gemma3) and an Ollama Modelfile.")
    p.add_argument("run_dir", help="run directory, or a LLaMA-Factory export YAML (model_name_or_path, "
                   "adapter_name_or_path, export_dir, export_size): the base with its adapters merged, hf format")
    p.add_argument("--out", help="new (or empty) output folder (a LLaMA-Factory YAML's export_dir by default)")
    p.add_argument("--format", choices=["hf", "gguf"], default="hf")
    p.add_argument("--gguf-type", default="q8_0", help="f32, f16, bf16, q8_0, q5_1, q5_0, q4_1 or q4_0")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (hf format)")
    p.set_defaults(func=_export)
    p = sub.add_parser("webui", help="the web UI: train, watch, evaluate, chat and export in a browser",
                       description="A Gradio page over the same config and functions as the CLI. Everything it reads "
                       "and writes stays inside --root (runs/, data/, configs/, exports/).")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=_count(1), default=7860)
    p.add_argument("--auth", help="USER:PASS asked by the page (or the TUNEFORGE_WEBUI_AUTH environment variable)")
    p.add_argument("--root", default=".", help="the folder the page works in (default: the working directory)")
    p.set_defaults(func=_webui)
    p = sub.add_parser("api", help="serve a run or a model over an OpenAI-compatible API",
                       description="OpenAI-compatible server: /v1/models, /v1/chat/completions (streaming, tools), "
                       "/v1/completions, /v1/score (reward-model runs), /health. Requests are batched together.")
    p.add_argument("target", help=TARGET_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=_count(1), default=8000)
    p.add_argument("--api-key", help="clients must send 'Authorization: Bearer KEY' (or set TUNEFORGE_API_KEY)")
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="vllm needs a GPU and the vllm package")
    p.add_argument("--max-batch", type=_count(1), default=8, help="requests decoded together (default: 8)")
    p.add_argument("--max-queue", type=_count(0), default=64,
                   help="requests allowed to wait beyond those being decoded; more get 503 (default: 64)")
    p.add_argument("--model-name", help="the model id shown to clients (default: the run's folder name)")
    p.add_argument("--template", default="auto", help="chat template when TARGET is a model (default: auto)")
    p.add_argument("--adapter", action="append", default=[], metavar="PATH", help=ADAPTER_HELP)
    p.add_argument("--max-body-mb", type=float, default=4.0, help="largest request body in MiB (default: 4)")
    p.set_defaults(func=_api)
    p = sub.add_parser("env", help="versions, device and embedded models")
    p.set_defaults(func=_env)
    return parser


def _train(args) -> int:
    import os

    from tuneforge.config import load_config
    from tuneforge.ranks import is_main
    from tuneforge.train.distributed import relaunch_command
    from tuneforge.train.run import train

    command = relaunch_command(load_config(args.config, args.overrides),
                               ["train", args.config, *args.overrides])
    if command:
        return _run_launcher(command)
    result = train(args.config, args.overrides)
    if is_main():
        print(f"tuneforge: {result.status}; run directory {result.run_dir}")
        if result.status == "completed":
            print(f"tuneforge: try it with `tuneforge chat {result.run_dir}`")
        if os.environ.get(STATUS_FILE):
            Path(os.environ[STATUS_FILE]).write_text(result.status, encoding="utf-8")
    if result.status == "interrupted" and os.environ.get(STATUS_FILE):
        return 0  # torchrun would report a stopped process as a failed one; `tuneforge train` returns 3 itself
    return 0 if result.status == "completed" else 3


STATUS_FILE = "TUNEFORGE_STATUS_FILE"  # set by _run_launcher for the processes it starts


def _run_launcher(command: list[str]) -> int:
    """torchrun with the training processes, in a session of their own. Ctrl-C, SIGTERM (or the web UI's Stop) is
    passed on to the training processes themselves, once per signal: each finishes the same step, the run saves
    a checkpoint, and they exit on their own (torchrun would kill them 30 s after passing a signal on)."""
    import os
    import signal
    import subprocess
    import tempfile

    import psutil

    print(f"tuneforge: training under torchrun: {' '.join(command[2:])}", flush=True)
    with tempfile.TemporaryDirectory(prefix="tuneforge-launch-") as folder:
        status = Path(folder) / "status"
        launcher = subprocess.Popen(command, start_new_session=True, env={**os.environ, STATUS_FILE: str(status)})

        def pass_on(signum, frame):
            try:
                workers = psutil.Process(launcher.pid).children()
            except psutil.NoSuchProcess:
                return
            for worker in workers or [psutil.Process(launcher.pid)]:
                try:
                    worker.send_signal(signal.SIGINT)
                except psutil.NoSuchProcess:
                    pass

        previous = {sig: signal.signal(sig, pass_on) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            code = launcher.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if launcher.poll() is None:  # this process is going away: so do the training processes
                os.killpg(launcher.pid, signal.SIGKILL)
        if code == 0 and status.is_file() and status.read_text(encoding="utf-8") == "interrupted":
            return 3
        return code


def _check(args) -> int:
    from tuneforge.train.check import check

    print(check(args.config, args.overrides, measure_steps=args.measure).report)
    print("check: ok")
    return 0


def _chat(args) -> int:
    from tuneforge.infer.engine import Engine

    settings = _generation_settings(args)
    target, template, adapters = _target(args)
    engine = Engine.load(target, template=template, backend=args.backend, adapters=adapters)
    system = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        print(engine.chat(system + [{"role": "user", "content": args.prompt}], settings))
        return 0
    print(f"chatting with {engine.description}. /clear starts over, /exit (or Ctrl-D) quits.")
    history: list[dict] = []
    while True:
        try:
            text = input("\nyou> ").strip()
        except EOFError:
            print()
            return 0
        if text in ("/exit", "/quit"):
            return 0
        if text == "/clear":
            history = []
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        print("assistant> ", end="", flush=True)
        answer = ""
        for piece in engine.stream_chat(system + history, settings):
            answer += piece
            print(piece, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": answer.strip()})


def _predict(args) -> int:
    from tuneforge.config import DataConfig
    from tuneforge.data.pipeline import load_examples
    from tuneforge.errors import ConfigError
    from tuneforge.evaluate.predict import predict, save_prediction, split_answers, summary
    from tuneforge.infer.engine import Engine
    from tuneforge.rundir import META, open_run

    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out} is a file; give a folder (predictions.jsonl and metrics.json go there)")
    settings = _generation_settings(args)
    is_run = (Path(args.target) / META).is_file()
    placeholders = open_run(args.target).config().data.placeholders if is_run else {}  # read as in training
    spec, conversion = load_examples(args.data, DataConfig(dataset=[args.data], dataset_dir=args.dataset_dir,
                                                           placeholders=placeholders), args.max_samples)
    if is_run and open_run(args.target).meta().get("stage") == "rm":
        from tuneforge.evaluate.predict import predict_rewards
        from tuneforge.model.reward import RewardModel

        result = predict_rewards(RewardModel.from_run(args.target), conversion.examples, args.batch_size)
    else:
        target, template, adapters = _target(args)
        engine = Engine.load(target, template=template, backend=args.backend, adapters=adapters)
        if args.system is not None:
            engine.default_system = args.system
        prompts, references = split_answers(conversion.examples, spec.name)
        labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
        result = predict(engine, prompts, references, mode=args.mode, labels=labels, batch_size=args.batch_size,
                         settings=settings)
    out = Path(args.out) if args.out else (Path(args.target) if is_run else Path(".")) / "predict" / Path(spec.name).stem
    save_prediction(result, out)
    print(f"tuneforge: {summary(result.metrics)}")
    print(f"tuneforge: wrote {out / 'predictions.jsonl'} and {out / 'metrics.json'}")
    return 0


def _eval(args) -> int:
    from tuneforge.evaluate.compare import run_eval

    run_eval(args.config, args.overrides)
    return 0


def _export(args) -> int:

    from tuneforge.errors import ConfigError
    from tuneforge.export.export import export_run

    if Path(args.run_dir).suffix in (".yaml", ".yml") and Path(args.run_dir).is_file():
        return _export_llamafactory(args)
    if not args.out:
        raise ConfigError("--out: required: the new (or empty) folder to export into")
    path = export_run(args.run_dir, args.out, args.format, args.gguf_type, args.max_shard_size)
    print(f"tuneforge: exported {args.run_dir} to {path}")
    return 0


def _export_llamafactory(args) -> int:
    """LLaMA-Factory's merge config: base model + adapter_name_or_path merged, saved to export_dir."""

    from tuneforge.config.llamafactory import is_llamafactory
    from tuneforge.config.loader import read_yaml
    from tuneforge.errors import ConfigError
    from tuneforge.export.merge import save_merged

    raw = read_yaml(Path(args.run_dir))
    if not is_llamafactory(raw) or not raw.get("model_name_or_path"):
        raise ConfigError(f"{args.run_dir}: give a run directory, or a LLaMA-Factory export YAML with "
                          "model_name_or_path (and adapter_name_or_path, export_dir)")
    out = args.out or raw.get("export_dir")
    if not out:
        raise ConfigError(f"{args.run_dir}: no export_dir; give it there or with --out")
    if args.format != "hf":
        raise ConfigError("--format gguf exports a run directory; merge to a folder first (this), then train or "
                          "export from it")
    refused = [k for k in ("export_quantization_bit", "export_hub_model_id") if raw.get(k)]
    if refused:
        raise ConfigError(*[f"{args.run_dir}: {k}: not supported (GGUF quantization: tuneforge export RUN "
                            "--format gguf)" for k in refused])
    adapters = raw.get("adapter_name_or_path") or []
    adapters = [a.strip() for a in adapters.split(",")] if isinstance(adapters, str) else list(adapters)
    shard = f"{raw.get('export_size', 5)}GB" if args.max_shard_size == "2GB" else args.max_shard_size
    path = save_merged(raw["model_name_or_path"], adapters, out, raw.get("template") or "auto", shard,
                       bool(raw.get("trust_remote_code", False)))
    print(f"tuneforge: exported {raw['model_name_or_path']} with {len(adapters)} adapter(s) merged to {path}")
    return 0


def _webui(args) -> int:
    import os

    import importlib.util

    from tuneforge.errors import ConfigError

    if importlib.util.find_spec("gradio") is None:
        raise ConfigError("the web UI needs Gradio. hint: pip install 'tuneforge[webui]'")
    from tuneforge.webui.app import launch

    if not Path(args.root).is_dir():
        raise ConfigError(f"--root {args.root}: no such folder")
    print(f"tuneforge: web UI for {Path(args.root).resolve()} at http://{args.host}:{args.port}", flush=True)
    launch(args.root, args.host, args.port, args.auth or os.environ.get("TUNEFORGE_WEBUI_AUTH"))
    return 0


def _target(args) -> tuple[str, str, list[str]]:
    """(model or run, template, adapters) from TARGET and the options; a LLaMA-Factory inference YAML brings its
    own model_name_or_path, adapter_name_or_path and template."""

    from tuneforge.errors import ConfigError

    target, template, adapters = args.target, args.template, list(args.adapter)
    if Path(target).suffix in (".yaml", ".yml") and Path(target).is_file():
        from tuneforge.config.llamafactory import is_llamafactory
        from tuneforge.config.loader import read_yaml

        raw = read_yaml(Path(target))
        if not is_llamafactory(raw) or not raw.get("model_name_or_path"):
            raise ConfigError(f"{target}: give a run directory (output.run_dir of a training config) or a model; "
                              "a YAML here must be a LLaMA-Factory inference config with model_name_or_path")
        listed = raw.get("adapter_name_or_path") or []
        listed = [a.strip() for a in listed.split(",")] if isinstance(listed, str) else list(listed)
        template = raw.get("template") or template
        target, adapters = raw["model_name_or_path"], listed + adapters
    return target, template, adapters


def _convert(args) -> int:

    from tuneforge.config.llamafactory import apply_flat_overrides, describe, is_llamafactory, translate
    from tuneforge.config.loader import apply_overrides, read_yaml, validate_config
    from tuneforge.errors import ConfigError

    raw = read_yaml(Path(args.config))
    if not is_llamafactory(raw):
        raise ConfigError(f"{args.config}: not a flat LLaMA-Factory config (it has TuneForge sections or none of "
                          "model_name_or_path, stage, finetuning_type, dataset, ...); TuneForge reads it as it is")
    raw, rest = apply_flat_overrides(raw, list(args.overrides))
    translation = translate(raw, args.config)
    translation.config = apply_overrides(translation.config, rest)
    validate_config(translation.config, args.config, rest)  # what train would refuse is refused here too
    text = describe(translation)
    if args.out:
        out = Path(args.out)
        if out.exists():
            raise ConfigError(f"--out {out}: already exists; give a new file name")
        out.write_text(text, encoding="utf-8")
        print(f"tuneforge: wrote {out}")
    else:
        print(text, end="")
    return 0


def _api(args) -> int:
    import importlib.util
    import os

    from tuneforge.errors import ConfigError

    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        raise ConfigError("the API server needs FastAPI and uvicorn. hint: pip install 'tuneforge[api]'")
    if args.max_body_mb <= 0:
        raise ConfigError(f"--max-body-mb {args.max_body_mb}: give a positive size in MiB")
    from tuneforge.serve import serve

    target, template, adapters = _target(args)
    serve(target, args.host, args.port, args.api_key or os.environ.get("TUNEFORGE_API_KEY"), args.backend,
          args.max_batch, args.max_queue, args.model_name, template, int(args.max_body_mb * 1024 * 1024), adapters)
    return 0


def _env(args) -> int:
    from tuneforge.envinfo import describe_environment

    print(describe_environment())
    return 0


if __name__ == "__main__":
    sys.exit(main())
