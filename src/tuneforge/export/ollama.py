"""Ollama Modelfile for an exported GGUF: the chat format (as a Go template), system prompt and stop tokens."""

from __future__ import annotations

import re
from pathlib import Path

from tuneforge.data.template import ChatTemplate, builtin_templates

PROBE = [{"role": "user", "content": "PROBE-USER"}, {"role": "assistant", "content": "PROBE-ANSWER"}]
SYSTEM_MARK = "PROBE-SYSTEM"


def template_family(tokenizer) -> tuple[str | None, str | None]:
    """Which built-in template renders exactly like the tokenizer's one, and the system prompt the
    tokenizer's template inserts on its own (e.g. SmolLM2's), if any."""
    own = ChatTemplate("own", tokenizer.chat_template)
    with_system = own.render(tokenizer, [{"role": "system", "content": SYSTEM_MARK}] + PROBE)
    without = own.render(tokenizer, PROBE)
    for name, entry in builtin_templates().items():
        candidate = ChatTemplate(name, entry["jinja"])
        if candidate.render(tokenizer, [{"role": "system", "content": SYSTEM_MARK}] + PROBE) != with_system:
            continue
        if candidate.render(tokenizer, PROBE) == without:
            return name, None
        pattern = re.escape(with_system).replace(re.escape(SYSTEM_MARK), "(.*)", 1)
        match = re.fullmatch(pattern, without, re.S)
        if match:
            return name, match.group(1)
    return None, None


def write_modelfile(out_dir: Path, gguf_name: str, tokenizer, stop: list[str], system: str | None) -> Path:
    family, inserted_system = template_family(tokenizer)
    lines = ["# Ollama Modelfile written by TuneForge.  ollama create NAME -f Modelfile", f"FROM ./{gguf_name}"]
    if family is not None:
        lines.append(f'TEMPLATE """{builtin_templates()[family]["ollama"]}"""')
    else:
        lines.append("# chat format: the GGUF's own tokenizer.chat_template (no built-in template matches it)")
    system = system or inserted_system
    if system:
        lines.append(f'SYSTEM """{system}"""')
    for token in dict.fromkeys(stop):
        lines.append(f'PARAMETER stop "{token}"')
    path = out_dir / "Modelfile"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
