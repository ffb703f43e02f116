"""Human-readable reports of what `prepare` found: per data set rows, drops, truncation and lengths."""

from __future__ import annotations

from tuneforge.train.prepare import Prepared


def format_data_report(prepared: Prepared) -> str:
    lines = [f"model: {prepared.source.description}",
             f"  loaded from: {prepared.source.path}",
             f"template: {prepared.template.name}  stop: {', '.join(prepared.template.stop) or '-'}"]
    if prepared.template_note:
        lines.append(f"  note: {prepared.template_note}")
    lines.append("data:")
    for r in prepared.data.reports:
        cached = " (tokenized copy from cache)" if r.from_cache else ""
        lines.append(f"  {r.name}: {r.rows_read} rows read, {r.rows_used} used{cached}")
        for reason, n in sorted(r.dropped.items()):
            lines.append(f"    dropped {n}: {reason}")
        if r.skipped_bad_rows:
            lines.append(f"    skipped {r.skipped_bad_rows} malformed rows (data.on_bad_row: skip)")
        if r.truncated:
            lines.append(f"    truncated {r.truncated}: prompts shortened to fit cutoff_len (answers kept whole)")
        for note in r.notes:
            lines.append(f"    note: {note}")
        s = r.stats
        if s.get("sequences"):
            lines.append(f"    tokens per sequence: min {s['min']}, median {s['median']}, p90 {s['p90']}, "
                         f"max {s['max']}; {s['tokens']:,} tokens, {s['supervised_tokens']:,} supervised")
    train, evaluation = prepared.data.train, prepared.data.eval
    lines.append(f"  train sequences: {len(train)}" + (f", eval sequences: {len(evaluation)}" if evaluation else ""))
    return "\n".join(lines)
