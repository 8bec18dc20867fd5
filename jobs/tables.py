"""Arrow tables out to the terminal or a file, for `tessera results`. A file goes through
pipeline/storage.py, so `--out` may be a local path or any URI the storage layer writes
(s3://, gs://, az://…)."""

from __future__ import annotations

import io
import json
import sys

import click
import pyarrow as pa

from pipeline import storage
from schemas.spec import StorageSpec


def write_table(table: pa.Table, fmt: str, out_path: str | None, storage_spec: StorageSpec | None = None) -> None:
    if fmt == "parquet":
        if not out_path:
            raise click.UsageError("--format parquet needs --out FILE")
        import pyarrow.parquet as pq

        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        data = buffer.getvalue()
    else:
        text = {"table": _as_table, "jsonl": _as_jsonl, "csv": _as_csv}[fmt](table)
        if not out_path:
            sys.stdout.write(text)
            return
        data = text.encode()
    storage.write_bytes(out_path, data, storage_spec)
    click.echo(f"wrote {table.num_rows} rows to {storage.display_uri(out_path)}", err=True)


def _as_jsonl(table: pa.Table) -> str:
    return "".join(json.dumps(row, default=str, ensure_ascii=False) + "\n" for row in table.to_pylist())


def _as_csv(table: pa.Table) -> str:
    import pyarrow.csv as pacsv

    flat = table.select([n for n in table.column_names if not pa.types.is_nested(table.schema.field(n).type)])
    buffer = io.BytesIO()
    pacsv.write_csv(flat, buffer)
    return buffer.getvalue().decode()


_TABLE_COLUMNS = ["id", "status", "error_code", "output_json", "run_id"]


def _as_table(table: pa.Table) -> str:
    columns = [c for c in _TABLE_COLUMNS if c in table.column_names]
    rows = [[_cell(row[c]) for c in columns] for row in table.select(columns).to_pylist()]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
    line = lambda cells: "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in rows]) + "\n"


def _cell(value, width: int = 60) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= width else text[: width - 1] + "…"
