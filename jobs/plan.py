"""`tessera run --dry-run`: what the job would do, without starting Ray or the model."""

from __future__ import annotations

import os
from collections import Counter

import click
import yaml

from pipeline.manifests import iter_raw_rows, manifest_files, manifest_format, to_manifest_row
from schemas.spec import JobSpec
from schemas.tasks import resolve_task

# A dry run reads manifests on this machine; past this many rows it stops counting and says so.
DRY_RUN_MAX_ROWS = 1_000_000
_EXTENSION_KINDS = {
    "image": (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".avif"),
    "video": (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"),
    "pdf": (".pdf",),
}


def guess_kind(uri: str) -> str:
    lowered = uri.lower().split("?", 1)[0]
    for kind, extensions in _EXTENSION_KINDS.items():
        if lowered.endswith(extensions):
            return kind
    return "unknown (sniffed from the bytes at run time)"


def print_dry_run(spec: JobSpec, limit: int | None) -> None:
    task = resolve_task(spec.task)
    files = manifest_files(spec.input, spec.storage)
    kinds, invalid, ids, duplicates, rows = Counter(), 0, set(), 0, 0
    cap = min(limit or DRY_RUN_MAX_ROWS, DRY_RUN_MAX_ROWS)
    for index, uri in enumerate(files):
        for line, raw in iter_raw_rows(uri, manifest_format(uri, spec.input.format), spec.storage):
            if rows >= cap:
                break
            rows += 1
            row = to_manifest_row(raw, uri, line, index, spec.input)
            if row["error_code"]:
                invalid += 1
            elif row["id"] in ids:
                duplicates += 1
            else:
                ids.add(row["id"])
                for media_uri in row["uris"]:
                    kinds[row["media_type"] or guess_kind(media_uri)] += 1
    echo = click.echo
    echo(f"job          {spec.name}")
    echo(f"manifests    {len(files)} file(s): " + ", ".join(os.path.basename(f) for f in files[:5]) + (" …" if len(files) > 5 else ""))
    echo(f"rows         {rows}" + (" (stopped counting)" if rows >= cap and not limit else ""))
    echo(f"distinct ids {len(ids) + invalid}   invalid rows {invalid}   duplicate ids {duplicates}")
    echo("media        " + (", ".join(f"{k}: {v}" for k, v in kinds.most_common()) or "none"))
    echo(f"model        {spec.model.path} ({spec.model.backend})")
    echo(f"task         {task.name}" + (" (structured JSON)" if task.structured else " (free text)") + f"   prompt_sha256 {task.prompt_sha256[:12]}")
    echo(f"output       {spec.output.path} (mode {spec.output.mode})")
    echo("\nresolved spec:")
    echo(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
