"""`dptool info`: what a .beton holds."""

from __future__ import annotations

import click

from dptool.beton import summarize

from ._common import CONTEXT_SETTINGS, emit, json_option

__all__ = ["command"]


def _human(s: dict) -> str:
    lines = [f"{s['path']}: {s['num_samples']} samples, {s['file_size'] / 1e6:.1f} MB, page size {s['page_size']}"]
    lines.append("fields: " + ", ".join(f"{k} ({v})" for k, v in s["fields"].items()))
    if s.get("writer"):
        w = s["writer"]
        lines.append(
            f"writer: max-res {w.get('max_resolution')}, {w.get('write_mode')}, jpeg quality "
            f"{w.get('jpeg_quality')}, compress-prob {w.get('compress_probability')}"
        )
    if s.get("source"):
        lines.append(f"source: {s['source'].get('format')} {s['source'].get('path')} ({s['source'].get('split')})")
    if s.get("pruning"):
        p = s["pruning"]
        lines.append(
            f"pruned: ratio {p.get('ratio')}, {p.get('kept_groups', '?')} groups kept, scores {p.get('scores')}"
        )
    if s["skipped"]:
        lines.append(f"skipped at conversion: {s['skipped']} files (listed in the sidecar)")
    if "classes" in s:
        present = sum(1 for c in s["classes"] if c["count"])
        lines.append(f"classes: {s['num_classes']} ({present} with samples)")
        for c in s["classes"][:50]:
            lines.append(f"  {c['label']:>5}  {c['count']:>8}  {c['name']}")
        if len(s["classes"]) > 50:
            lines.append(f"  ... {len(s['classes']) - 50} more (use --json for all)")
    if s["fingerprint"]:
        lines.append(f"fingerprint: {s['fingerprint']}")
    return "\n".join(lines)


@click.command("info", context_settings=CONTEXT_SETTINGS)
@click.argument("path", type=click.Path(path_type=str))
@json_option
def command(path, as_json):
    """Show samples, classes, fields and writer parameters of a .beton.

    \b
    dptool info imagenet_train.beton --json
    """
    emit(summarize(path), as_json, _human)
