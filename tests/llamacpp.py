"""llama.cpp (llama-cpp-python) as an independent GGUF reader, for the tests and bench/gguf_roundtrip.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def llamacpp_read(path: str | Path, text: str, ids: list[int]) -> tuple[list[int], np.ndarray]:
    """llama.cpp's token ids for `text` (no BOS, special tokens as text), and its logits (T, V) for `ids`."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, n_batch=512, logits_all=True, verbose=False, n_threads=2)
    try:
        tokens = llm.tokenize(text.encode(), add_bos=False, special=False)
        llm.eval(ids)
        return tokens, np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()
