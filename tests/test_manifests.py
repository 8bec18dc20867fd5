"""Manifest reading in JSONL, CSV and Parquet: ids, uris, metadata, bad rows as error rows."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.manifests import iter_raw_rows, manifest_files, read_manifest_file, to_manifest_row
from schemas.spec import InputSpec, StorageSpec

ROWS = [
    {"id": "a", "uri": "media/a.jpg", "context": "first"},
    {"id": 7, "uri": "/abs/b.png", "media_type": "image"},
    {"id": "c", "uris": ["p1.png", "p2.png"]},
    {"uri": "media/no-id.jpg"},
    {"id": "bad-type", "uri": "x.jpg", "media_type": "audio"},
]


def _rows(path):
    spec = InputSpec(manifest=str(path))
    return pa.concat_tables(list(read_manifest_file(str(path), 0, spec, StorageSpec()))).to_pylist()


def _check(rows, manifest_path, line_of_no_id):
    by_id = {r["id"]: r for r in rows}
    folder = str(manifest_path.parent)
    assert by_id["a"]["uris"] == [f"{folder}/media/a.jpg"]  # relative to the manifest
    assert json.loads(by_id["a"]["fields_json"]) == {"context": "first"}
    assert by_id["7"]["uris"] == ["/abs/b.png"] and by_id["7"]["media_type"] == "image"
    assert by_id["c"]["uris"] == [f"{folder}/p1.png", f"{folder}/p2.png"]
    no_id = by_id[f"{manifest_path}#L{line_of_no_id}"]
    assert no_id["error_code"] == "manifest.invalid_row" and "missing or empty 'id'" in no_id["error_message"]
    assert by_id["bad-type"]["error_code"] == "manifest.invalid_row"
    assert len({r["position"] for r in rows}) == len(rows)


def test_jsonl(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS) + "\n{not json\n[1, 2]\n")
    rows = _rows(path)
    _check(rows, path, line_of_no_id=4)
    errors = {r["id"]: r["error_message"] for r in rows if r["error_code"]}
    assert "not valid JSON" in errors[f"{path}#L7"]
    assert "not an object" in errors[f"{path}#L8"]


def test_csv(tmp_path):
    path = tmp_path / "m.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "uri", "uris", "media_type", "context"])
        writer.writeheader()
        for row in ROWS:
            row = dict(row)
            if "uris" in row:
                row["uris"] = json.dumps(row["uris"])
            writer.writerow(row)
    rows = _rows(path)
    _check(rows, path, line_of_no_id=5)  # line 1 is the header


def test_parquet(tmp_path):
    path = tmp_path / "m.parquet"
    columns = ["id", "uri", "uris", "media_type", "context"]
    table = pa.Table.from_pylist(
        [{c: (str(r[c]) if c == "id" else r[c]) if c in r else None for c in columns} for r in ROWS]
    )
    pq.write_table(table, path)
    rows = _rows(path)
    _check(rows, path, line_of_no_id=4)


def test_directory_and_glob_skip_hidden_files(tmp_path):
    (tmp_path / "part-1.jsonl").write_text(json.dumps({"id": "1", "uri": "x.jpg"}) + "\n")
    (tmp_path / "part-2.jsonl").write_text(json.dumps({"id": "2", "uri": "y.jpg"}) + "\n")
    (tmp_path / "_hidden.jsonl").write_text("{}\n")
    (tmp_path / "notes.txt").write_text("not a manifest")
    by_dir = manifest_files(InputSpec(manifest=str(tmp_path)), StorageSpec())
    by_glob = manifest_files(InputSpec(manifest=str(tmp_path / "part-*.jsonl")), StorageSpec())
    assert [p.rsplit("/", 1)[-1] for p in by_dir] == ["part-1.jsonl", "part-2.jsonl"]
    assert by_glob == by_dir
    with pytest.raises(FileNotFoundError):
        manifest_files(InputSpec(manifest=str(tmp_path / "nothing-*.jsonl")), StorageSpec())


def test_custom_id_and_uri_columns(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"key": "k1", "path": "a.jpg", "lang": "de"}) + "\n")
    spec = InputSpec(manifest=str(path), id_column="key", uri_column="path")
    line, raw = next(iter_raw_rows(str(path), "jsonl", StorageSpec()))
    row = to_manifest_row(raw, str(path), line, 0, spec)
    assert row["id"] == "k1" and row["uris"] == [str(tmp_path / "a.jpg")]
    assert json.loads(row["fields_json"]) == {"lang": "de"}
