"""The read path and the output's lifecycle: the current table, compaction, staging clean-up.

Many runs of a job accumulate under `output.path`, one `run-<run_id>/` folder each. The
current table is the latest row per id over all of them (errors included); schemas may
differ between runs (a changed output schema), so columns are unioned by name.
"""

from __future__ import annotations

import hashlib
import io
import json

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.resume import COMPACTION_DIR, committed_files, compaction_record
from schemas.spec import StorageSpec

LATEST_PER_ID = """
SELECT * EXCLUDE (_rank) FROM (
    SELECT *, row_number() OVER (PARTITION BY id ORDER BY finished_at DESC, run_id DESC) AS _rank
    FROM {source}
) WHERE _rank = 1"""


def results_sql(output_path: str) -> str:
    """The DuckDB query users can paste: the current table of a local output path."""
    source = f"read_parquet('{output_path.rstrip('/')}/run-*/*.parquet', union_by_name = true)"
    return LATEST_PER_ID.format(source=source).strip()


def results_dataset(output_path: str, storage_spec: StorageSpec | None = None) -> pads.Dataset | None:
    """Every committed file as one pyarrow dataset with the union of their schemas."""
    files = committed_files(output_path, storage_spec or StorageSpec())
    if not files:
        return None
    filesystem = storage.arrow_filesystem(files[0], storage_spec)
    paths = [storage.strip_scheme(f) for f in files]
    schemas = [pq.read_schema(path, filesystem=filesystem) for path in paths]
    return pads.dataset(paths, schema=union_schema(schemas, files), format="parquet", filesystem=filesystem)


class SchemaConflict(ValueError):
    """Two runs wrote one column with types the read path cannot read as one."""


def union_schema(schemas: list[pa.Schema], files: list[str]) -> pa.Schema:
    """The files' columns unioned by name, as DuckDB's union_by_name does: a struct has the
    fields any run gave it, numbers widen, and a scalar whose type changed between runs (an
    output field that went from int to string) reads as string (the scan casts it)."""
    merged: dict[str, pa.Field] = {}
    first: dict[str, str] = {}  # the file each column was first seen in, for the error
    for schema, path in zip(schemas, files):
        for field in schema:
            if field.name not in merged:
                merged[field.name], first[field.name] = field, path
                continue
            try:
                merged[field.name] = merged[field.name].with_type(_union_type(merged[field.name].type, field.type))
            except pa.ArrowTypeError:
                raise SchemaConflict(
                    f"column {field.name!r} is {merged[field.name].type} in {first[field.name]} but {field.type} "
                    f"in {path}, and the two have no common type: read those runs apart (one run-<run_id>/ folder each)"
                ) from None
    return pa.schema(list(merged.values()))


def _union_type(a: pa.DataType, b: pa.DataType) -> pa.DataType:
    if a == b:
        return a
    if pa.types.is_struct(a) and pa.types.is_struct(b):
        fields = {field.name: field for field in a}
        for field in b:
            known = fields.get(field.name)
            fields[field.name] = known.with_type(_union_type(known.type, field.type)) if known else field
        return pa.struct(list(fields.values()))
    if pa.types.is_list(a) and pa.types.is_list(b):
        return pa.list_(_union_type(a.value_type, b.value_type))
    try:
        return pa.unify_schemas([pa.schema([("x", a)]), pa.schema([("x", b)])], promote_options="permissive").field("x").type
    except pa.ArrowTypeError:
        if pa.types.is_nested(a) or pa.types.is_nested(b):
            raise  # a struct or list that became a scalar: no cast reads both
        return pa.string()


def current_results(output_path: str, storage_spec: StorageSpec | None = None, where: str | None = None) -> pa.Table:
    """The latest row per id across every run, as an Arrow table (`where`: a SQL filter)."""
    dataset = results_dataset(output_path, storage_spec)
    if dataset is None:
        return pa.table({})
    connection = duckdb.connect()
    connection.register("committed", dataset)
    sql = LATEST_PER_ID.format(source="committed")
    if where:
        sql = f"SELECT * FROM ({sql}) WHERE {where}"
    return connection.sql(sql + " ORDER BY id").to_arrow_table()


def finished_runs(output_path: str, storage_spec: StorageSpec | None = None) -> dict[str, dict]:
    """run_id -> its summary, for runs that published one (finished or aborted)."""
    runs = {}
    for path in storage.list_files(storage.join(output_path, "_runs"), storage_spec, suffix="summary.json"):
        summary = json.loads(storage.read_bytes(path, storage_spec))
        runs[summary["run_id"]] = summary
    return runs


def compact(output_path: str, storage_spec: StorageSpec | None = None, target_file_mb: float = 64.0) -> dict:
    """Merge the small files of each finished run into files of about `target_file_mb`.

    The merged file is committed (staged, renamed) before the small ones are deleted, so a
    reader never misses a row; a record of what it replaces keeps readers from seeing its
    rows twice if compaction dies before the deletes, and the next compaction finishes them.
    """
    spec = storage_spec or StorageSpec()
    for record in storage.list_files(storage.join(output_path, COMPACTION_DIR), spec, suffix=".json"):
        finish_merge(record, spec)  # left by a compaction that died
    finished = finished_runs(output_path, spec)
    by_run: dict[str, list[str]] = {}
    for path in committed_files(output_path, spec):
        run_id = path.rsplit("/", 2)[-2].removeprefix("run-")
        if run_id in finished:
            by_run.setdefault(run_id, []).append(path)
    merged = removed = 0
    for run_id, files in sorted(by_run.items()):
        for group in _bins(files, spec, target_file_mb * 1e6):
            if len(group) > 1:
                _merge(group, output_path, run_id, spec)
                merged += 1
                removed += len(group)
    return {"runs": len(by_run), "files_merged": removed, "files_written": merged}


def _bins(files: list[str], spec: StorageSpec, target_bytes: float) -> list[list[str]]:
    bins, current, size = [], [], 0
    for path in files:
        file_size = storage.size(path, spec)
        if current and size + file_size > target_bytes:
            bins.append(current)
            current, size = [], 0
        current.append(path)
        size += file_size
    if current:
        bins.append(current)
    return bins


def _merge(group: list[str], output_path: str, run_id: str, spec: StorageSpec) -> None:
    finish_merge(commit_merged(group, output_path, run_id, spec), spec)


def commit_merged(group: list[str], output_path: str, run_id: str, spec: StorageSpec) -> str:
    """Write the files of `group` as one, record what it replaces, commit it; -> the record."""
    from pipeline.sink import run_dir, staging_dir

    tables = [pq.read_table(io.BytesIO(storage.read_bytes(path, spec))) for path in group]
    table = pa.concat_tables(tables, promote_options="permissive")
    digest = hashlib.sha256("\n".join(sorted(table.column("id").to_pylist())).encode()).hexdigest()[:20]
    name = f"part-c{digest}.parquet"
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    staged = storage.join(staging_dir(output_path, run_id), name + ".tmp")
    storage.write_bytes(staged, buffer.getvalue(), spec)
    record = storage.join(output_path, COMPACTION_DIR, run_id, name + ".json")
    replaces = [path.rsplit("/", 1)[-1] for path in group]
    storage.write_bytes(record, json.dumps({"merged": name, "replaces": replaces}).encode(), spec)
    storage.rename(staged, storage.join(run_dir(output_path, run_id), name), spec)
    return record


def finish_merge(record: str, spec: StorageSpec) -> None:
    """Delete the files a committed merge replaced, then its record (a merge that never got
    committed replaced nothing: its staged file is stale staging)."""
    merged, replaces = compaction_record(record, spec)
    if storage.exists(merged, spec):
        for path in replaces:
            storage.remove(path, spec)
    storage.remove(record, spec)
