"""Structured results: constrained decoding makes 100 % of rows valid against the schema even
with a random-weight model; typed `output` columns DuckDB can query; re-ask and truncation."""

from __future__ import annotations

import json
import sys

import duckdb
import jsonschema
import pytest

from schemas.presets import PRESET_SCHEMAS
from schemas.tasks import load_output_schema, resolve_task
from schemas.spec import TaskSpec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    from jobs.sample import encode_image, encode_pdf, encode_video, synthetic_image

    root = tmp_path_factory.mktemp("structured")
    rows = []
    for index, (size, fmt) in enumerate([((320, 240), "jpeg"), ((150, 250), "png"), ((640, 360), "webp")]):
        path = root / f"img{index}.{fmt}"
        path.write_bytes(encode_image(synthetic_image(*size, seed=index), fmt))
        rows.append({"id": f"img{index}", "uri": path.name, "context": f"listing {index}"})
    (root / "clip.mp4").write_bytes(encode_video(seconds=3, seed=3))
    rows.append({"id": "clip", "uri": "clip.mp4"})
    (root / "doc.pdf").write_bytes(encode_pdf(1, seed=4))
    rows.append({"id": "doc", "uri": "doc.pdf"})
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def _results(summary):
    return f"read_parquet('{summary['output']['run_dir']}/*.parquet')"


@pytest.mark.parametrize("preset", sorted(PRESET_SCHEMAS))
def test_every_row_valid_for_each_preset(preset, small_corpus, make_spec, ray_local):
    from pipeline.run import run_job

    spec = make_spec(small_corpus, task={"preset": preset, "sampling": {"max_new_tokens": 4096}})
    summary = run_job(spec)
    rows = duckdb.sql(f"SELECT id, status, error_code, output_json FROM {_results(summary)}").fetchall()
    assert len(rows) == 5
    schema = PRESET_SCHEMAS[preset].model_json_schema()
    for row_id, status, code, output_json in rows:
        assert status == "ok", (row_id, code)
        value = json.loads(output_json)
        jsonschema.validate(value, schema)  # the JSON Schema itself, not only pydantic
        PRESET_SCHEMAS[preset].model_validate(value)
    assert summary["truncated"] == 0


def test_custom_pydantic_schema_end_to_end(small_corpus, make_spec, ray_local):
    from pipeline.run import run_job

    spec = make_spec(
        small_corpus,
        task={"prompt": "Describe the product for {{ context | default('a listing') }}.", "output_schema": "custom_output:ProductListing"},
    )
    summary = run_job(spec)
    assert summary["ok"] == 5, summary["errors_by_code"]
    results = _results(summary)
    types = dict(duckdb.sql(f"SELECT column_name, column_type FROM (DESCRIBE SELECT output FROM {results})").fetchall())
    assert types["output"].startswith("STRUCT(category VARCHAR, price STRUCT(amount DOUBLE, currency VARCHAR)")
    assert "attributes MAP(VARCHAR, VARCHAR)" in types["output"] and "colors VARCHAR[]" in types["output"]
    currencies = duckdb.sql(f"SELECT DISTINCT output.price.currency FROM {results}").fetchall()
    assert {c for (c,) in currencies} <= {"EUR", "USD", "GBP"}
    stock = duckdb.sql(f"SELECT count(*) FROM {results} WHERE output.in_stock IS NOT NULL").fetchall()[0][0]
    assert stock == 5


def test_custom_json_schema_file_end_to_end(small_corpus, make_spec, ray_local, tmp_path):
    from pipeline.run import run_job

    schema = {
        "type": "object",
        "properties": {
            "label": {"enum": ["cat", "dog", "other"]},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
            "extra": {"anyOf": [{"type": "string", "maxLength": 8}, {"type": "integer", "minimum": 0, "maximum": 9}]},
        },
        "required": ["label", "score", "tags", "extra"],
        "additionalProperties": False,
    }
    path = tmp_path / "label.schema.json"
    path.write_text(json.dumps(schema))
    spec = make_spec(small_corpus, task={"prompt": "Label the image.", "output_schema": str(path)})
    summary = run_job(spec)
    assert summary["ok"] == 5, summary["errors_by_code"]
    results = _results(summary)
    for output_json, label, extra in duckdb.sql(f"SELECT output_json, output.label, output.extra FROM {results}").fetchall():
        value = json.loads(output_json)
        jsonschema.validate(value, schema)
        assert label == value["label"]
        assert json.loads(extra) == value["extra"]  # a union is stored as JSON text


def test_truncation_reasks_then_errors_with_raw_text(small_corpus, make_spec, ray_local):
    from pipeline.run import run_job

    spec = make_spec(small_corpus, task={"preset": "moderation", "sampling": {"max_new_tokens": 12}})
    summary = run_job(spec)
    assert summary["errors_by_code"] == {"model.invalid_output": 5}
    assert summary["reasks"] == 5 and summary["truncated"] == 5
    rows = duckdb.sql(f"SELECT status, raw_text, output_json, reasks, truncated, output_tokens, error_message FROM {_results(summary)}").fetchall()
    for status, raw_text, output_json, reasks, truncated, output_tokens, message in rows:
        assert status == "error" and output_json is None
        assert raw_text.startswith("{") and reasks == 1 and truncated
        assert output_tokens == 24  # the re-ask budget: 12 x reask_factor 2
        assert "cut at the token limit" in message


def test_prompt_sha256_tracks_what_decides_the_answer():
    base = resolve_task(TaskSpec(preset="moderation"))
    assert base.prompt_sha256 == resolve_task(TaskSpec(preset="moderation")).prompt_sha256
    other_prompt = resolve_task(TaskSpec(preset="moderation", prompt="Is this safe?"))
    other_sampling = resolve_task(TaskSpec(preset="moderation", sampling={"temperature": 0.5}))
    other_budget = resolve_task(TaskSpec(preset="moderation", sampling={"reask_factor": 4}))
    assert other_prompt.prompt_sha256 != base.prompt_sha256
    assert other_sampling.prompt_sha256 != base.prompt_sha256
    assert other_budget.prompt_sha256 == base.prompt_sha256  # the re-ask budget is not the prompt


def test_load_output_schema_errors(tmp_path):
    with pytest.raises(ValueError, match="module:PydanticModel"):
        load_output_schema("not-a-reference")
    with pytest.raises(ValueError, match="No module named"):
        load_output_schema("no_such_module:Model")
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must be an object"):
        load_output_schema(str(bad))


def test_load_output_schema_looks_in_the_given_folders(tmp_path):
    (tmp_path / "beside_the_spec.py").write_text(
        "from pydantic import BaseModel, Field\n\nclass Tag(BaseModel):\n    tag: str = Field(max_length=8)\n"
    )
    with pytest.raises(ValueError, match="No module named"):
        load_output_schema("beside_the_spec:Tag")
    model, schema = load_output_schema("beside_the_spec:Tag", search_dirs=[str(tmp_path)])
    assert model.__name__ == "Tag" and schema["properties"]["tag"]["maxLength"] == 8
    assert str(tmp_path) not in sys.path  # only for that import
