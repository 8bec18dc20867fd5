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

import functools
import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

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

# Committed result files read per task when select and verify read their key columns.
RESULT_FILES_PER_READ_TASK = 32


class CommittedColumns(Datasource):
    """A few key columns of many result files: RESULT_FILES_PER_READ_TASK files per read task,
    one block per file. (`ray.data.read_parquet` first lists and samples the files in tasks of
    its own: 3-5 s per read on a 2-CPU machine, twice per run, for columns this small.)"""

    def __init__(self, files: list[str], columns: list[str], storage_spec):
        super().__init__()
        self._files, self._columns, self._storage = files, columns, storage_spec

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None):
        step = RESULT_FILES_PER_READ_TASK
        groups = [self._files[i : i + step] for i in range(0, len(self._files), step)]
        return [
            ReadTask(
                functools.partial(_read_columns, group, self._columns, self._storage),
                BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=group),
                per_task_row_limit=per_task_row_limit,
            )
            for group in groups
        ]

    def get_name(self) -> str:
        return "ReadCommitted"


def _read_columns(files: list[str], columns: list[str], storage_spec):
    for uri in files:
        yield storage.read_parquet_columns(uri, columns, storage_spec)


# --- verify: rows in = rows out, counted from the files (pipeline/run.py drives it) ----------
# Here, not in run.py, because Ray workers import the module of every function they run, and
# run.py pulls in torch (seconds per fresh worker).

# Per manifest id: in the manifest; its current rows are this run's; else an earlier run's for
# the same key; else it has none; current rows of one id beyond the first; rows of ids the
# manifest does not hold.
VERIFY_COUNTS = ("rows_in", "written", "already_committed", "missing", "ids_written_twice", "ids_not_in_manifest")
_MANIFEST, THIS_RUN, EARLIER = 0, 1, 2
_KEY_COLUMNS = ["run_id", "finished_at", "status", "error_code", "prompt_sha256", "model", "model_revision"]
VERIFY_COLUMNS = ["id", "manifest_id", *_KEY_COLUMNS]
_ID_TAGS = pa.schema(
    [pa.field("manifest_id", pa.string()), pa.field("id", pa.string()), pa.field("kind", pa.int8())]
    + [pa.field(name, pa.timestamp("ms", tz="UTC") if name == "finished_at" else pa.string()) for name in _KEY_COLUMNS]
)


def tag_manifest_ids(batch: pa.Table) -> pa.Table:
    n, ids = batch.num_rows, batch.column("id")
    columns = [ids, ids, pa.array([_MANIFEST] * n, pa.int8())] + [pa.nulls(n, f.type) for f in list(_ID_TAGS)[3:]]
    return pa.Table.from_arrays(columns, schema=_ID_TAGS)


def tag_result_rows(batch: pa.Table, kind: int) -> pa.Table:
    columns = [batch.column("manifest_id"), batch.column("id"), pa.array([kind] * batch.num_rows, pa.int8())]
    columns += [batch.column(f.name).cast(f.type) for f in list(_ID_TAGS)[3:]]
    return pa.Table.from_arrays(columns, schema=_ID_TAGS)


def sum_counts(batch: pa.Table) -> pa.Table:
    return pa.table({name: [int(pc.sum(batch.column(name)).as_py() or 0)] for name in VERIFY_COUNTS})


def check_id(group: pa.Table, policy: ResumePolicy) -> pa.Table:
    """One manifest id: which of its rows are current, and is each row id there exactly once?"""
    rows = group.to_pylist()
    mine = [row for row in rows if row["kind"] == THIS_RUN]
    if not any(row["kind"] == _MANIFEST for row in rows):
        return _counts(ids_not_in_manifest=int(bool(mine)))  # earlier runs' ids the manifest dropped are fine
    if mine:
        return _counts(rows_in=1, written=1, ids_written_twice=_extra(mine))
    latest = _latest_run_rows([row for row in rows if row["kind"] == EARLIER])
    if latest and _still_current(latest, policy):
        return _counts(rows_in=1, already_committed=1, ids_written_twice=_extra(latest))
    return _counts(rows_in=1, missing=1)


def _counts(**values: int) -> pa.Table:
    return pa.table({name: [values.get(name, 0)] for name in VERIFY_COUNTS})


def _extra(rows: list[dict]) -> int:
    ids = [row["id"] for row in rows]
    return len(ids) - len(set(ids))


def _latest_run_rows(rows: list[dict]) -> list[dict]:
    """The rows of the latest run that committed this id (several with PDF pages)."""
    if not rows:
        return []
    latest = max(rows, key=lambda row: (row["finished_at"], row["run_id"]))["run_id"]
    return [row for row in rows if row["run_id"] == latest]


def _still_current(rows: list[dict], policy: ResumePolicy) -> bool:
    """Would this run rightly have skipped an id whose latest rows are these? A re-drive skips
    all but the error rows it re-drives; a resume skips rows of the same prompt and model."""
    if policy.redrive:
        return not any(row["status"] == "error" and policy.redrives(row["error_code"]) for row in rows)
    key = (policy.prompt_sha256, policy.model_uri, policy.model_revision)
    return all((row["prompt_sha256"], row["model"], row["model_revision"]) == key for row in rows)
