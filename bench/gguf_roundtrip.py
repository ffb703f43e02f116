"""GGUF files as llama.cpp reads them: export, load with llama.cpp (llama-cpp-python), compare token ids and logits.

    python bench/gguf_roundtrip.py                       # tiny models of every architecture + the embedded models
    python bench/gguf_roundtrip.py --run runs/quickstart --types f16,q8_0

For each architecture and GGUF type it prints whether llama.cpp loads the file, whether it tokenizes a mixed
English / Chinese / digits text to the same ids as the Hugging Face tokenizer, the largest absolute logit
difference against the source model, the same against the source with exactly the weights a reader dequantizes
from the file (`readers_view`: what is left is llama.cpp's arithmetic, e.g. its 8-bit activations in quantized
matrix products), and how often the next-token argmax agrees with the source. Tiny models are random (2 layers, hidden 64) with an embedded
model's tokenizer and 8 more embedding rows than tokens, so the token list has to be padded.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the tiny model builders, llama.cpp reader

from tests.llamacpp import llamacpp_read  # noqa: E402
from tuneforge.export.gguf_writer import TYPES, readers_view, write_gguf  # noqa: E402

TEXT = "Hello world, 你好世界! Numbers 12345 and 3.14159; it's done. Café naïve — don't stop 2024年11月。"


@dataclass
class RoundTrip:
    name: str
    qtype: str
    loads: bool
    same_ids: bool
    max_vs_source: float
    max_vs_dequantized: float
    argmax_agreement: float
    size_mb: float


def roundtrip(name: str, model, tokenizer, qtype: str, folder: Path, text: str = TEXT,
              pre_tokenizer: str | None = None, ids: list[int] | None = None) -> RoundTrip:
    ids = ids or tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        source = model.eval()(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    path = folder / f"{name}-{qtype}.gguf"
    write_gguf(model, tokenizer, path, qtype, pre_tokenizer=pre_tokenizer)
    try:
        tokens, got = llamacpp_read(path, text, ids)
    except Exception:  # llama.cpp refused the file
        path.unlink()
        return RoundTrip(name, qtype, False, False, float("nan"), float("nan"), 0.0, 0.0)
    with torch.no_grad():
        dequantized = readers_view(model, qtype)(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    size = path.stat().st_size / 2**20
    path.unlink()
    expected = tokenizer(text, add_special_tokens=False)["input_ids"]
    return RoundTrip(name, qtype, True, tokens == expected, float(np.abs(got - source).max()),
                     float(np.abs(got - dequantized).max()), float((got.argmax(-1) == source.argmax(-1)).mean()), size)


def tiny_models():
    """(name, model, tokenizer, pre) for every architecture, on the embedded models' tokenizers."""
    from tests.conftest import build_family_model
    from tuneforge.config import ModelConfig
    from tuneforge.model.loader import load_tokenizer, resolve_model

    smol = load_tokenizer(resolve_model(ModelConfig(name_or_path="smollm2-135m-instruct")))
    gemma = load_tokenizer(resolve_model(ModelConfig(name_or_path="gemma3-270m")))
    for kind, tokenizer in (("llama", smol), ("mistral", smol), ("qwen2", smol), ("qwen3", smol),
                            ("gemma3_text", gemma)):
        yield f"tiny-{kind}", build_family_model(kind, len(tokenizer) + 8), tokenizer


def embedded_models():
    from tuneforge.config import ModelConfig
    from tuneforge.model.loader import load_model, load_tokenizer, resolve_model

    for name in ("smollm2-135m-instruct", "gemma3-270m"):
        source = resolve_model(ModelConfig(name_or_path=name))
        yield name, load_model(source), load_tokenizer(source)


def print_header() -> None:
    print(f"{'model':<24}{'type':<6}{'loads':>6}{'same ids':>9}{'max |dlogit| vs source':>24}"
          f"{'vs readers view':>16}{'argmax agree':>14}{'MB':>8}")


def print_rows(rows: list[RoundTrip]) -> None:
    for r in rows:
        print(f"{r.name:<24}{r.qtype:<6}{'yes' if r.loads else 'NO':>6}{'yes' if r.same_ids else 'NO':>9}"
              f"{r.max_vs_source:>24.4f}{r.max_vs_dequantized:>16.4f}{r.argmax_agreement:>14.3f}{r.size_mb:>8.1f}",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a run directory: export its merged model instead of the built-in matrix")
    parser.add_argument("--types", default=",".join(TYPES))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.run:
            from tuneforge.export.export import _source_pre
            from tuneforge.export.merge import merged_model
            from tuneforge.rundir import open_run

            model, tokenizer, _ = merged_model(args.run)
            models = [(Path(args.run).name, model, tokenizer, _source_pre(open_run(args.run)))]
        else:
            models = [(n, m, t, None) for n, m, t in [*tiny_models(), *embedded_models()]]
        print_header()
        for name, model, tokenizer, pre in models:
            for qtype in args.types.split(","):
                rows.append(roundtrip(name, model, tokenizer, qtype, Path(tmp), pre_tokenizer=pre))
                print_rows(rows[-1:])
            del model
            gc.collect()


if __name__ == "__main__":
    main()
