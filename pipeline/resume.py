"""Exactly-once across runs: which manifest rows are due, decided in one hash-partitioned pass.

The manifest rows and the committed results of earlier runs (a few key columns only) are
unioned and grouped by id, so each id is decided in one place with memory bounded by its
partition, however many ids the job has:

- the first manifest occurrence goes on; later ones are marked `manifest.duplicate_id`;
- an id whose latest committed row has the same prompt hash and model revision is done
  (error rows too): marked skipped, unless its content version must be re-checked (the CPU
  stage compares the object's current ETag/size+mtime and skips it only if unchanged);
- a re-drive runs ids whose latest committed row is an error with a chosen code, and ids
  no run ever committed (a killed run's remainder: due as in a plain resume, else the table
  would stay incomplete and the run's invariant check would fail);
- ids committed earlier but no longer in the manifest produce nothing.

Marked rows flow through the later stages untouched; the sink counts them and never writes
them. `output.mode: resume` does this; `overwrite` removes earlier results first;
`error_if_exists` refuses to run over existing results.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from schemas.errors import DUPLICATE_ID, SKIPPED
from schemas.rows import MANIFEST_SCHEMA
from schemas.spec import StorageSpec

# What the decision needs from a committed result row.
COMMITTED_COLUMNS = ["manifest_id", "status", "error_code", "content_version", "prompt_sha256", "model", "model_revision", "finished_at", "run_id"]

# Manifest rows and committed rows share this schema for the union (nulls where not theirs).
_COMMITTED_FIELDS = [
    pa.field("is_committed", pa.bool_()),
    pa.field("c_status", pa.string()),
    pa.field("c_error_code", pa.string()),
    pa.field("c_content_version", pa.string()),
    pa.field("c_prompt_sha256", pa.string()),
    pa.field("c_model", pa.string()),
    pa.field("c_model_revision", pa.string()),
    pa.field("c_finished_at", pa.timestamp("ms", tz="UTC")),
    pa.field("c_run_id", pa.string()),
]
UNION_SCHEMA = pa.schema(list(MANIFEST_SCHEMA) + _COMMITTED_FIELDS)


@dataclass(frozen=True)
class ResumePolicy:
    prompt_sha256: str
    model_uri: str
    model_revision: str
    check_versions: bool = True
    # Re-drive: only ids whose latest committed row is an error with one of these codes
    # (empty: any code) run again; everything else is skipped. None: a normal resume.
    redrive_codes: tuple[str, ...] | None = None

    @property
    def redrive(self) -> bool:
        return self.redrive_codes is not None

    def redrives(self, error_code: str | None) -> bool:
        return self.redrive and error_code is not None and (not self.redrive_codes or error_code in self.redrive_codes)


# A compaction writes `_compaction/<run_id>/<merged file>.json` (the files it merges) before
# it commits the merged file, and removes it once those files are deleted: if it dies in
# between, the record says which files are no longer results (pipeline/results.py finishes).
COMPACTION_DIR = "_compaction"


def committed_files(output_path: str, storage_spec: StorageSpec) -> list[str]:
    """Every committed result file: `run-*/…parquet` (staging and `_` folders excluded, and
    files a committed compaction replaced but did not get to delete)."""
    found = storage.list_files(output_path, storage_spec)
    base = output_path.rstrip("/")
    files = [f for f in found if f.endswith(".parquet") and _is_committed(f, base)]
    records = [f for f in found if f.endswith(".json") and _relative(f, base).startswith(COMPACTION_DIR + "/")]
    replaced = _replaced_by_compaction(records, set(files), storage_spec) if records else set()
    return [f for f in files if f not in replaced]


def compaction_record(path: str, storage_spec: StorageSpec) -> tuple[str, list[str]]:
    """A compaction record -> (the merged file, the files it replaces), as full paths."""
    entry = json.loads(storage.read_bytes(path, storage_spec))
    base, _, run_id, _ = path.rsplit("/", 3)
    folder = f"{base}/run-{run_id}"
    return f"{folder}/{entry['merged']}", [f"{folder}/{name}" for name in entry["replaces"] if name != entry["merged"]]


def _replaced_by_compaction(records: list[str], files: set[str], storage_spec: StorageSpec) -> set[str]:
    replaced = set()
    for record in records:
        merged, replaces = compaction_record(record, storage_spec)
        if merged in files:  # committed; until then the files it merges are the results
            replaced.update(replaces)
    return replaced


def _relative(path: str, base: str) -> str:
    return path.split(base.split("://", 1)[-1].rstrip("/"), 1)[-1].strip("/")


def _is_committed(path: str, base: str) -> bool:
    parts = _relative(path, base).split("/")
    return len(parts) >= 2 and parts[0].startswith("run-") and not any(p.startswith(("_", ".")) for p in parts)


def manifest_to_union(batch: pa.Table) -> pa.Table:
    """Manifest rows in the union schema."""
    n = batch.num_rows
    columns = [batch.column(f.name) for f in MANIFEST_SCHEMA]
    columns.append(pa.array([False] * n, pa.bool_()))
    columns += [pa.nulls(n, f.type) for f in _COMMITTED_FIELDS[1:]]
    return pa.Table.from_arrays(columns, schema=UNION_SCHEMA)


def committed_to_union(batch: pa.Table) -> pa.Table:
    """Committed result rows (COMMITTED_COLUMNS) in the union schema."""
    n = batch.num_rows
    columns = [batch.column("manifest_id").cast(pa.string())]  # the manifest's id (PDF pages share it)
    columns += [pa.nulls(n, f.type) for f in list(MANIFEST_SCHEMA)[1:]]
    columns.append(pa.array([True] * n, pa.bool_()))
    for field in _COMMITTED_FIELDS[1:]:
        name = field.name[2:]
        column = batch.column(name) if name in batch.column_names else pa.nulls(n, field.type)
        columns.append(column.cast(field.type))
    return pa.Table.from_arrays(columns, schema=UNION_SCHEMA)


def decide(group: pa.Table, policy: ResumePolicy) -> pa.Table:
    """All rows of one id (manifest and committed) -> the manifest rows to pass on, marked."""
    committed_mask = pc.fill_null(group.column("is_committed"), False)
    manifest = group.filter(pc.invert(committed_mask))
    if manifest.num_rows == 0:
        return pa.Table.from_pylist([], schema=MANIFEST_SCHEMA)
    manifest = manifest.sort_by("position")
    rows = manifest.select(MANIFEST_SCHEMA.names).to_pylist()
    for duplicate in rows[1:]:
        duplicate["error_code"] = DUPLICATE_ID
        duplicate["error_message"] = rows[0]["source"]  # the occurrence processed, for the summary
    latest = _latest_committed(group.filter(committed_mask))
    if policy.redrive:
        if latest is not None and (latest["c_status"] != "error" or not policy.redrives(latest["c_error_code"])):
            rows[0]["error_code"] = SKIPPED
    elif latest is not None:
        _mark_done_or_due(rows[0], latest, policy)
    return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)


def _latest_committed(committed: pa.Table) -> dict | None:
    """The latest run's result for this manifest id; with PDF pages (several rows of one run)
    it is an error if any page is."""
    if committed.num_rows == 0:
        return None
    ordered = committed.sort_by([("c_finished_at", "descending"), ("c_run_id", "descending")]).to_pylist()
    latest_run = [row for row in ordered if row["c_run_id"] == ordered[0]["c_run_id"]]
    errors = [row for row in latest_run if row["c_status"] == "error"]
    return errors[0] if errors else latest_run[0]


def _mark_done_or_due(row: dict, latest: dict, policy: ResumePolicy) -> None:
    same_work = (
        latest["c_prompt_sha256"] == policy.prompt_sha256
        and latest["c_model"] == policy.model_uri
        and latest["c_model_revision"] == policy.model_revision
    )
    if not same_work:
        return  # the prompt, schema, sampling or model changed: due again
    if latest["c_status"] == "error":  # error rows count as committed; `redrive` retries them
        row["error_code"] = SKIPPED
        return
    if policy.check_versions and latest["c_content_version"] and row["error_code"] is None:
        row["resume_version"] = latest["c_content_version"]  # the CPU stage decides
        return
    row["error_code"] = SKIPPED
