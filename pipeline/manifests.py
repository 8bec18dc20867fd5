"""Manifests -> ManifestRow blocks: JSONL, CSV or Parquet; a file, a directory or a glob.

Each manifest file is one Ray read task that streams small blocks, so a long manifest never
sits in memory and decoding starts while it is still being read. A row that cannot be used
(bad JSON, no id, no uri) is not dropped: it becomes an error row, `manifest.invalid_row`,
with the id `<manifest file>#L<line>` when it has none of its own.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline import storage
from schemas.errors import ErrorCode
from schemas.rows import MANIFEST_SCHEMA
from schemas.spec import InputSpec, StorageSpec

MEDIA_TYPES = ("image", "video", "pdf")
SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
ROWS_PER_BLOCK = 16
# position = file index << 40 | line: global manifest order, to tell which duplicate came first.
_LINE_BITS = 40


def manifest_files(spec: InputSpec, storage_spec: StorageSpec) -> list[str]:
    """Every manifest file the spec names, in a stable order."""
    uris = spec.manifest if isinstance(spec.manifest, list) else [spec.manifest]
    files: list[str] = []
    for uri in uris:
        files.extend(storage.expand(uri, storage_spec, tuple(SUFFIXES)))
    if not files:
        raise FileNotFoundError(f"no manifest files match {spec.manifest}")
    return list(dict.fromkeys(files))


def manifest_format(uri: str, declared: str) -> str:
    if declared != "auto":
        return declared
    for suffix, fmt in SUFFIXES.items():
        if uri.lower().endswith(suffix):
            return fmt
    raise ValueError(f"cannot tell the format of manifest {uri}: set input.format (jsonl, csv or parquet)")


def iter_raw_rows(uri: str, fmt: str, storage_spec: StorageSpec) -> Iterator[tuple[int, Any]]:
    """(line number, dict | parse error message) for every row of one manifest file."""
    if fmt == "parquet":
        with storage.open_file(uri, "rb", storage_spec) as handle:
            parquet = pq.ParquetFile(handle)
            line = 0
            for batch in parquet.iter_batches(batch_size=4096):
                for row in batch.to_pylist():
                    line += 1
                    yield line, row
        return
    with storage.open_file(uri, "rb", storage_spec) as handle:
        text = io.TextIOWrapper(handle, encoding="utf-8", errors="replace", newline="")
        if fmt == "csv":
            reader = csv.DictReader(text)
            for row in reader:
                yield reader.line_num, row
            return
        for line, raw in enumerate(text, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as exc:
                yield line, f"line is not valid JSON ({exc.msg} at column {exc.colno})"
                continue
            yield line, row if isinstance(row, dict) else f"line is a JSON {type(row).__name__}, not an object"


def to_manifest_row(raw: Any, uri: str, line: int, file_index: int, spec: InputSpec) -> dict:
    """Validate one raw row into the ManifestRow columns (an error row if it is unusable)."""
    source = f"{uri}#L{line}"
    row = {
        "id": source,
        "uris": None,
        "media_type": None,
        "fields_json": None,
        "source": source,
        "position": (file_index << _LINE_BITS) | line,
        "error_code": None,
        "error_message": None,
    }
    if isinstance(raw, str):
        return _invalid(row, f"{source}: {raw}")
    raw = dict(raw)
    raw_id = raw.pop(spec.id_column, None)
    if isinstance(raw_id, float) and raw_id.is_integer():
        raw_id = int(raw_id)
    if isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) and str(raw_id).strip():
        row["id"] = str(raw_id).strip()
    else:
        return _invalid(row, f"{source}: missing or empty '{spec.id_column}'")
    uris, problem = _uris(raw, spec.uri_column)
    if problem:
        return _invalid(row, f"{source}: {problem}")
    row["uris"] = [storage.resolve_relative(u, uri) for u in uris]
    media_type = raw.pop("media_type", None)
    if media_type not in (None, "", *MEDIA_TYPES):
        return _invalid(row, f"{source}: media_type must be one of {', '.join(MEDIA_TYPES)}, got {media_type!r}")
    row["media_type"] = media_type or None
    row["fields_json"] = json.dumps(raw, default=str, ensure_ascii=False)
    return row


def _uris(raw: dict, uri_column: str) -> tuple[list[str], str | None]:
    single, many = raw.pop(uri_column, None), raw.pop("uris", None)
    if isinstance(many, str) and many.strip().startswith("["):
        try:
            many = json.loads(many)  # CSV carries a list as JSON text
        except json.JSONDecodeError:
            return [], "'uris' is not a JSON list"
    if many not in (None, ""):
        if not isinstance(many, (list, tuple)) or not many or not all(isinstance(u, str) and u for u in many):
            return [], "'uris' must be a non-empty list of strings"
        return list(many), None
    if isinstance(single, str) and single.strip():
        return [single.strip()], None
    return [], f"missing or empty '{uri_column}' (or 'uris')"


def _invalid(row: dict, message: str) -> dict:
    row["error_code"] = ErrorCode.MANIFEST_INVALID_ROW.value
    row["error_message"] = message
    return row


def read_manifest_file(uri: str, file_index: int, spec: InputSpec, storage_spec: StorageSpec) -> Iterator[pa.Table]:
    fmt = manifest_format(uri, spec.format)
    rows: list[dict] = []
    for line, raw in iter_raw_rows(uri, fmt, storage_spec):
        rows.append(to_manifest_row(raw, uri, line, file_index, spec))
        if len(rows) >= ROWS_PER_BLOCK:
            yield pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
            rows = []
    if rows:
        yield pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)


class ManifestDatasource(Datasource):
    """One read task per manifest file; each streams blocks of ROWS_PER_BLOCK rows."""

    def __init__(self, files: list[str], spec: InputSpec, storage_spec: StorageSpec):
        super().__init__()
        self._files = files
        self._spec = spec
        self._storage = storage_spec

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None):
        tasks = []
        for index, uri in enumerate(self._files):
            tasks.append(
                ReadTask(
                    _reader(uri, index, self._spec, self._storage),
                    BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=[uri]),
                    schema=MANIFEST_SCHEMA,
                    per_task_row_limit=per_task_row_limit,
                )
            )
        return tasks

    def get_name(self) -> str:
        return "ReadManifest"


def _reader(uri: str, index: int, spec: InputSpec, storage_spec: StorageSpec):
    return lambda: read_manifest_file(uri, index, spec, storage_spec)
