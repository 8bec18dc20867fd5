"""Row contracts between the stages, as Arrow schemas (the blocks Ray Data passes around).

    manifest -> MANIFEST -> prepare (CPU) -> PREPARED -> infer (actor) -> INFERRED -> sink -> ResultRow (Parquet)

Every stage reads and writes exactly these columns, so a block whose rows are all errors
still has the same schema as one whose rows all succeeded. A row that failed keeps its
`error_code` / `error_message`; later stages carry it along without touching it.
`ResultRow` is the user-facing contract (docs/results.md); the others are internal.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import pyarrow as pa
from pydantic import BaseModel

STATUS_OK = "ok"
STATUS_ERROR = "error"

# Columns every internal row carries from the manifest to the sink.
_CARRIED = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("uris", pa.list_(pa.string())),
    pa.field("media_type", pa.string()),
    pa.field("fields_json", pa.string()),  # prompt fields + metadata of the manifest row, as JSON
    pa.field("source", pa.string()),  # <manifest file>#L<line>: where the row came from
    pa.field("position", pa.int64()),  # global manifest order: the first occurrence of an id wins
    pa.field("resume_version", pa.string()),  # content version committed earlier: skip if unchanged
    pa.field("error_code", pa.string()),
    pa.field("error_message", pa.string()),
]

MANIFEST_SCHEMA = pa.schema(_CARRIED)

PREPARED_SCHEMA = pa.schema(
    _CARRIED
    + [
        pa.field("manifest_id", pa.string()),  # the manifest row's id (differs from id for PDF pages)
        pa.field("content_version", pa.string()),  # ETag / size+mtime of the media, when known
        pa.field("model_inputs", pa.binary()),  # serialized ModelInputs (uint8 pixels + token ids)
        pa.field("n_tiles", pa.int32()),
        pa.field("n_frames", pa.int32()),
        pa.field("n_pages", pa.int32()),
        pa.field("input_tokens", pa.int32()),
        pa.field("pixel_bytes", pa.int64()),  # bytes of pixels that cross to the actor
        pa.field("fetch_ms", pa.float64()),
        pa.field("decode_ms", pa.float64()),
    ]
)

# A model replica: its Ray actor id, the node it ran on, the GPU ids Ray gave it.
REPLICA_TYPE = pa.struct(
    [pa.field("id", pa.string()), pa.field("node_id", pa.string()), pa.field("gpu_ids", pa.list_(pa.string()))]
)

# What the model actor adds; it drops the (large) model_inputs.
INFERRED_SCHEMA = pa.schema(
    [f for f in PREPARED_SCHEMA if f.name != "model_inputs"]
    + [
        pa.field("raw_text", pa.string()),
        pa.field("output_json", pa.string()),
        pa.field("output_tokens", pa.int32()),
        pa.field("reasks", pa.int32()),
        pa.field("truncated", pa.bool_()),
        # Whether the first answer was cut at the token limit, even if a re-ask fixed it: the
        # run summary's count. Not written to the results.
        pa.field("first_truncated", pa.bool_()),
        pa.field("infer_ms", pa.float64()),
        # Which model replica generated the row (null for rows that reached no model): the
        # run summary's placement report. Not written to the results.
        pa.field("replica", REPLICA_TYPE),
    ]
)


class ResultRow(BaseModel):
    """One row of the results table: exactly one per distinct manifest id (or PDF page)."""

    id: str
    manifest_id: str  # the manifest row it came from: equal to id, except `<id>#p<N>` PDF pages
    uri: str | None
    media_type: str | None
    status: Literal["ok", "error"]
    output: dict[str, Any] | None  # typed struct column derived from the task's output schema
    output_json: str | None
    raw_text: str | None
    metadata: str | None  # the manifest row's other columns, as a JSON object
    error_code: str | None
    error_message: str | None
    model: str
    model_revision: str | None
    prompt_sha256: str
    content_version: str | None
    job: str
    run_id: str
    n_tiles: int | None
    n_frames: int | None
    n_pages: int | None
    input_tokens: int | None
    output_tokens: int | None
    reasks: int | None
    truncated: bool | None
    fetch_ms: float | None
    decode_ms: float | None
    infer_ms: float | None
    finished_at: datetime


def result_schema(output_type: pa.DataType | None) -> pa.Schema:
    """The Parquet schema of the results; `output` is typed from the task's output schema."""
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("manifest_id", pa.string()),
            pa.field("uri", pa.string()),
            pa.field("media_type", pa.string()),
            pa.field("status", pa.string(), nullable=False),
            pa.field("output", output_type or pa.null()),
            pa.field("output_json", pa.string()),
            pa.field("raw_text", pa.string()),
            pa.field("metadata", pa.string()),
            pa.field("error_code", pa.string()),
            pa.field("error_message", pa.string()),
            pa.field("model", pa.string()),
            pa.field("model_revision", pa.string()),
            pa.field("prompt_sha256", pa.string()),
            pa.field("content_version", pa.string()),
            pa.field("job", pa.string()),
            pa.field("run_id", pa.string()),
            pa.field("n_tiles", pa.int32()),
            pa.field("n_frames", pa.int32()),
            pa.field("n_pages", pa.int32()),
            pa.field("input_tokens", pa.int32()),
            pa.field("output_tokens", pa.int32()),
            pa.field("reasks", pa.int32()),
            pa.field("truncated", pa.bool_()),
            pa.field("fetch_ms", pa.float64()),
            pa.field("decode_ms", pa.float64()),
            pa.field("infer_ms", pa.float64()),
            pa.field("finished_at", pa.timestamp("ms", tz="UTC")),
        ]
    )
