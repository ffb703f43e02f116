"""Human-readable reports of what `prepare` found: per data set rows, drops, truncation and lengths."""

from __future__ import annotations

from tuneforge.train.prepare import Prepared


def format_data_report(prepared: Prepared) -> str:
    lines = [f"model: {prepared.source.description}",
             f"  loaded from: {prepared.source.path}",
             f"template: {prepared.template.name}  stop: {', '.join(prepared.template.stop) or '-'}"]
    if prepared.template_note:
        lines.append(f"  note: {prepared.template_note}")
    lines += [f"warning: {w}" for w in prepared.warnings]
    lines.append("data:")
    for r in prepared.data.reports:
        lines += [f"  {line}" for line in r.lines()]
    train, evaluation = prepared.data.train, prepared.data.eval
    count = len(train) if hasattr(train, "__len__") else "read while training (data.streaming)"
    lines.append(f"  train sequences: {count}" + (f", eval sequences: {len(evaluation)}" if evaluation else ""))
    return "\n".join(lines)
