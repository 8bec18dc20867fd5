"""InferredRow blocks -> committed Parquet files of ResultRows, one file per call.

Each file is written under `_staging/` (hidden, and named `.tmp` so no `*.parquet` glob can
match it), then renamed into `run-<run_id>/`: readers never see a partial file. The file
name is a digest of the ids it holds, so a Ray retry of the same block rewrites the same
file instead of adding a second copy of its rows. Each call returns one small stats row for
the driver's summary; result rows themselves never travel to the driver.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.stats import BatchStats
from schemas.errors import DUPLICATE_ID, SKIPPED
from schemas.arrow_types import arrow_type, to_arrow_value
from schemas.rows import STATUS_ERROR, STATUS_OK, result_schema
from schemas.spec import JobSpec

STATS_SCHEMA = pa.schema(
    [pa.field("file", pa.string()), pa.field("stats_json", pa.string()), pa.field("committed_at", pa.float64())]
)


@dataclass(frozen=True)
class SinkContext:
    run_id: str
    spec: JobSpec
    model_uri: str
    model_revision: str
    prompt_sha256: str
    json_schema: dict | None

    @property
    def output_type(self) -> pa.DataType | None:
        return arrow_type(self.json_schema) if self.json_schema else None


def run_dir(output_path: str, run_id: str) -> str:
    return storage.join(output_path, f"run-{run_id}")


def staging_dir(output_path: str, run_id: str) -> str:
    return storage.join(output_path, "_staging", run_id)


def commit_batch(batch: pa.Table, ctx: SinkContext) -> pa.Table:
    """Entry point for `map_batches`: write, commit, and report one file."""
    stats = BatchStats()
    rows = []
    for row in batch.to_pylist():
        if row.get("error_code") == DUPLICATE_ID:
            stats.add_duplicate(row)
        elif row.get("error_code") == SKIPPED:
            stats.skipped += 1
        else:
            stats.add_row(row)
            rows.append(row)
    if not rows:
        return _stats_table(None, stats)
    table = to_result_table(rows, ctx)
    name = f"part-{_digest(row['id'] for row in rows)}.parquet"
    final = storage.join(run_dir(ctx.spec.output.path, ctx.run_id), name)
    staged = storage.join(staging_dir(ctx.spec.output.path, ctx.run_id), name + ".tmp")
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    storage.write_bytes(staged, buffer.getvalue(), ctx.spec.storage)
    storage.rename(staged, final, ctx.spec.storage)
    return _stats_table(final, stats)


def _stats_table(file: str | None, stats: BatchStats) -> pa.Table:
    return pa.Table.from_pylist(
        [{"file": file, "stats_json": json.dumps(stats.to_dict()), "committed_at": time.time()}],
        schema=STATS_SCHEMA,
    )


def to_result_table(rows: list[dict], ctx: SinkContext) -> pa.Table:
    output_type = ctx.output_type
    now = datetime.now(timezone.utc)
    results = [_result_row(row, ctx, output_type, now) for row in rows]
    return pa.Table.from_pylist(results, schema=result_schema(output_type))


def _result_row(row: dict, ctx: SinkContext, output_type, now: datetime) -> dict:
    failed = row.get("error_code") is not None
    output_json = None if failed else row.get("output_json")
    uri = (row.get("uris") or [None])[0]
    message = row.get("error_message")
    output = None
    if output_json is not None and output_type is not None:
        output = to_arrow_value(json.loads(output_json), output_type)
    return {
        "id": row["id"],
        "manifest_id": row.get("manifest_id") or row["id"],
        # Results are shared more widely than manifests: no user info or signed query strings.
        "uri": storage.display_uri(uri) if uri else None,
        "media_type": row.get("media_type"),
        "status": STATUS_ERROR if failed else STATUS_OK,
        "output": output,
        "output_json": output_json,
        "raw_text": row.get("raw_text"),
        "metadata": _metadata(row.get("fields_json"), ctx.spec),
        "error_code": row.get("error_code"),
        "error_message": storage.redact(message) if message else None,
        "model": ctx.model_uri,
        "model_revision": ctx.model_revision,
        "prompt_sha256": ctx.prompt_sha256,
        "content_version": row.get("content_version"),
        "job": ctx.spec.name,
        "run_id": ctx.run_id,
        "n_tiles": row.get("n_tiles"),
        "n_frames": row.get("n_frames"),
        "n_pages": row.get("n_pages"),
        "input_tokens": row.get("input_tokens"),
        "output_tokens": row.get("output_tokens"),
        "reasks": row.get("reasks"),
        "truncated": row.get("truncated"),
        "fetch_ms": row.get("fetch_ms"),
        "decode_ms": row.get("decode_ms"),
        "infer_ms": row.get("infer_ms"),
        "finished_at": now,
    }


def _metadata(fields_json: str | None, spec: JobSpec) -> str | None:
    if not spec.input.keep_metadata or not fields_json:
        return None
    fields = json.loads(fields_json)
    for name in spec.input.drop_columns:
        fields.pop(name, None)
    return json.dumps(fields, ensure_ascii=False) if fields else None


def _digest(ids) -> str:
    digest = hashlib.sha256()
    for item in sorted(ids):
        digest.update(item.encode())
        digest.update(b"\n")
    return digest.hexdigest()[:20]
