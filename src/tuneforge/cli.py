"""tuneforge train|check|chat|env: thin wrappers over the Python API. User errors print without a traceback."""

from __future__ import annotations

import argparse
import sys
import warnings

from tuneforge.errors import UserError

OVERRIDES_HELP = "overrides such as train.learning_rate=1e-4 data.dataset=identity,alpaca_en_demo"


def main(argv: list[str] | None = None) -> int:
    # PEFT still calls a transformers method renamed in v5; the notice says nothing a user can act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except UserError as err:
        print(err.render(), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ntuneforge: interrupted", file=sys.stderr)
        return 130


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
        p.set_defaults(func=func)
    p = sub.add_parser("chat", help="talk to a run directory or a model", description="Chat with a fine-tuned run "
                       "directory or any model TuneForge can load. Commands in the chat: /clear, /exit.")
    p.add_argument("target", help="run directory (e.g. runs/quickstart) or model name/path")
    p.add_argument("--prompt", help="ask once, print the answer and exit")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--template", default="auto", help="chat template when TARGET is a model (default: auto)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.set_defaults(func=_chat)
    p = sub.add_parser("env", help="versions, device and embedded models")
    p.set_defaults(func=_env)
    return parser


def _train(args) -> int:
    from tuneforge.train.run import train

    result = train(args.config, args.overrides)
    print(f"tuneforge: {result.status}; run directory {result.run_dir}")
    if result.status == "completed":
        print(f"tuneforge: try it with `tuneforge chat {result.run_dir}`")
    return 0 if result.status == "completed" else 3


def _check(args) -> int:
    from tuneforge.train.run import check

    print(check(args.config, args.overrides).report)
    print("check: ok")
    return 0


def _chat(args) -> int:
    from tuneforge.infer.engine import Engine, GenerationSettings

    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_p=args.top_p, repetition_penalty=args.repetition_penalty)
    engine = Engine.load(args.target, template=args.template)
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


def _env(args) -> int:
    from tuneforge.envinfo import describe_environment

    print(describe_environment())
    return 0


if __name__ == "__main__":
    sys.exit(main())
