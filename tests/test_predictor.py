"""The model actor's batching and per-item isolation: token-budget batches; an item that makes
the model raise (out of memory, an exception), in the first pass or the re-ask, fails alone
while the rest of its batch succeeds; unreadable inputs fail their own row; truncations that
a re-ask fixed still count.

The failures come from the test-only hook in actors/predictor.py, inert unless
TESSERA_TEST_HOOKS=1 is in the environment. The model is the real tiny one, the inputs come
from the real CPU stage, and the last test runs the whole pipeline on a local Ray cluster.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from actors.inputs import ModelInputs
from actors.predictor import TEST_FAULT_PREFIX, TEST_HOOKS_ENV, Predictor, _Item, token_budget_chunks
from pipeline.stats import BatchStats
from schemas.rows import PREPARED_SCHEMA
from schemas.spec import ModelSpec, TaskSpec
from schemas.tasks import resolve_task

OOM, ERROR, REASK = (f"{TEST_FAULT_PREFIX}{action}-0" for action in ("oom", "error", "reask"))
# A short, bounded answer: the tiny model finishes it in a few tokens.
LABEL_SCHEMA = {
    "type": "object",
    "properties": {"label": {"enum": ["cat", "dog", "other"]}, "score": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["label", "score"],
    "additionalProperties": False,
}


def item(tokens: int) -> _Item:
    return _Item({"id": f"t{tokens}"}, ModelInputs(input_ids=np.zeros(tokens, np.int32), pixels=None))


def test_token_budget_chunks_bound_rows_and_padded_tokens():
    items = [item(n) for n in (50, 10, 30, 20, 40)]
    spec = ModelSpec(batch_size=2, max_batch_tokens=10_000)
    chunks = token_budget_chunks(items, spec, max_new_tokens=10)
    assert [[it.cost for it in chunk] for chunk in chunks] == [[10, 20], [30, 40], [50]]  # by length, 2 a batch
    # rows x (longest prompt + generation) must fit: 3 x (30 + 10) = 120 does, 4 x 50 does not.
    chunks = token_budget_chunks(items, ModelSpec(batch_size=8, max_batch_tokens=120), max_new_tokens=10)
    assert [[it.cost for it in chunk] for chunk in chunks] == [[10, 20, 30], [40, 50]]
    # A larger generation budget (a re-ask) makes smaller batches; an item over the budget goes alone.
    chunks = token_budget_chunks(items, ModelSpec(batch_size=8, max_batch_tokens=120), max_new_tokens=60)
    assert [[it.cost for it in chunk] for chunk in chunks] == [[10], [20], [30], [40], [50]]
    assert token_budget_chunks([], spec, 10) == []


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model_path):
    """prepared(ids) -> PreparedRows made by the real CPU stage from small images, and the model."""
    from jobs.sample import encode_image, synthetic_image
    from pipeline.manifests import to_manifest_row
    from pipeline.model_cache import resolve
    from pipeline.prepare import PrepareContext, Preparer
    from schemas.spec import parse_spec

    root = tmp_path_factory.mktemp("predictor")
    image = root / "image.jpg"
    image.write_bytes(encode_image(synthetic_image(96, 64, seed=1), "jpeg"))
    spec = parse_spec({
        "name": "predictor", "input": {"manifest": str(root / "m.jsonl")}, "output": {"path": str(root / "out")},
        "model": {"path": "builtin:tiny"}, "task": {"prompt": "What is it?"},
    })
    model = resolve(spec.model, spec.storage)
    preparer = Preparer(PrepareContext(run_id="t", spec=spec, model=model, task=resolve_task(spec.task)))
    template = preparer.prepare_rows(to_manifest_row({"id": "x", "uri": str(image)}, str(root / "m.jsonl"), 1, 0, spec.input))[0]
    preparer.close()
    assert template["error_code"] is None, template

    def make(ids: list[str]) -> pa.Table:
        return pa.Table.from_pylist([{**template, "id": i, "manifest_id": i} for i in ids], schema=PREPARED_SCHEMA)

    make.model = model
    return make


@pytest.fixture(scope="module")
def model(prepared):
    """One Predictor (one model load) for the module; each test sets its task and batching."""
    return Predictor(prepared.model, ModelSpec(path="builtin:tiny"), resolve_task(TaskSpec(prompt="What is it?")))


@pytest.fixture
def label_schema(tmp_path):
    path = tmp_path / "label.schema.json"
    path.write_text(json.dumps(LABEL_SCHEMA))
    return str(path)


def configure(model: Predictor, monkeypatch, task: dict, **model_spec) -> list[tuple[int, int]]:
    """Set the task and batching; returns the (rows, max_new_tokens) of every generate asked for."""
    model.task = resolve_task(TaskSpec(**task))
    model.model_spec = ModelSpec(path="builtin:tiny", **model_spec)
    calls = []
    generate = model._generate  # the hook fires in here, before the backend

    def recorded(chunk, max_new_tokens):
        calls.append((len(chunk), max_new_tokens))
        return generate(chunk, max_new_tokens)

    monkeypatch.setattr(model, "_generate", recorded)
    return calls


def by_id(table: pa.Table) -> dict[str, dict]:
    return {row["id"]: row for row in table.to_pylist()}


def test_the_model_loads_on_the_first_row_for_it_and_fails_the_block_when_it_cannot(prepared, tmp_path):
    from dataclasses import replace

    predictor = Predictor(prepared.model, ModelSpec(path="builtin:tiny"), resolve_task(TaskSpec(prompt="What is it?")))
    errors = prepared(["failed-0", "failed-1"]).to_pylist()
    for row in errors:
        row.update(error_code="fetch.not_found", error_message="gone", model_inputs=None)
    out = predictor(pa.Table.from_pylist(errors, schema=PREPARED_SCHEMA)).to_pylist()
    assert [row["error_code"] for row in out] == ["fetch.not_found"] * 2
    assert predictor._backend is None  # only error rows so far: nothing loaded
    row = predictor(prepared(["good"])).to_pylist()[0]
    assert row["error_code"] is None and row["raw_text"] is not None and predictor._backend is not None

    # A checkpoint that does not load fails the block (the job), not each row as model.error.
    broken = Predictor(replace(prepared.model, uri=str(tmp_path), path=str(tmp_path)), ModelSpec(path="builtin:tiny"), predictor.task)
    with pytest.raises(ValueError, match="Unrecognized processing class"):
        broken(prepared(["good"]))


def test_an_item_that_fails_the_batch_fails_alone(prepared, model, monkeypatch):
    monkeypatch.setenv(TEST_HOOKS_ENV, "1")
    rows = prepared(["good-0", OOM, "good-1", ERROR, "good-2", "unreadable", "failed-before"]).to_pylist()
    rows[5]["model_inputs"] = b"not a pickle"
    rows[6].update(error_code="decode.corrupt", error_message="bad bytes", model_inputs=None)
    calls = configure(model, monkeypatch, {"prompt": "What is it?", "sampling": {"max_new_tokens": 4}})
    out = by_id(model(pa.Table.from_pylist(rows, schema=PREPARED_SCHEMA)))
    assert [size for size, _ in calls] == [5, 1, 1, 1, 1, 1]  # the batch raised; then each of its items alone
    for good in ("good-0", "good-1", "good-2"):
        assert out[good]["error_code"] is None and out[good]["raw_text"] is not None, out[good]
    assert out[OOM]["error_code"] == "model.oom" and "OutOfMemoryError" in out[OOM]["error_message"]
    assert out[ERROR]["error_code"] == "model.error" and "generation failed: RuntimeError" in out[ERROR]["error_message"]
    assert out["unreadable"]["error_code"] == "model.error" and "model inputs unreadable" in out["unreadable"]["error_message"]
    assert out["failed-before"]["error_code"] == "decode.corrupt" and out["failed-before"]["raw_text"] is None


def test_hooks_are_inert_without_the_environment_variable(prepared, model, monkeypatch):
    monkeypatch.delenv(TEST_HOOKS_ENV, raising=False)
    configure(model, monkeypatch, {"prompt": "What is it?", "sampling": {"max_new_tokens": 2}})
    out = by_id(model(prepared([OOM, ERROR])))
    assert all(row["error_code"] is None for row in out.values()), out


def test_a_reask_batch_that_fails_is_retried_item_by_item_within_the_token_budget(prepared, model, monkeypatch, label_schema):
    monkeypatch.setenv(TEST_HOOKS_ENV, "1")
    table = prepared(["cut-0", REASK, "cut-1"])
    cost = len(ModelInputs.from_bytes(table.column("model_inputs")[0].as_py()).input_ids)
    # Three rows fit a batch at the first budget (1 token: every answer is cut), two at the re-ask's (2).
    calls = configure(
        model, monkeypatch, {"prompt": "Label it.", "output_schema": label_schema, "sampling": {"max_new_tokens": 1}},
        max_batch_tokens=3 * (cost + 2) - 1,
    )
    out = by_id(model(table))
    # Re-ask batches of 2 and 1; the one holding the faulty row raises, and its rows go again alone.
    assert calls == [(3, 1), (2, 2), (1, 2), (1, 2), (1, 2)], calls
    assert out[REASK]["error_code"] == "model.error" and "re-ask failed: RuntimeError" in out[REASK]["error_message"]
    for row_id in ("cut-0", "cut-1"):
        assert out[row_id]["error_code"] == "model.invalid_output", out[row_id]
    assert all(row["reasks"] == 1 and row["first_truncated"] for row in out.values())


def test_a_cut_the_reask_fixed_still_counts_as_cut(prepared, model, monkeypatch, label_schema):
    task = {"prompt": "Label it.", "output_schema": label_schema}
    configure(model, monkeypatch, {**task, "sampling": {"max_new_tokens": 64}})
    full = model(prepared(["x"])).to_pylist()[0]
    assert full["error_code"] is None and not full["truncated"] and full["reasks"] == 0, full
    length = full["output_tokens"] - 1  # its tokens, without the end-of-sequence one
    assert length >= 4
    # Greedy: the same answer at any budget. Two tokens short, the JSON is not closed: re-asked.
    configure(model, monkeypatch, {**task, "sampling": {"max_new_tokens": length - 2}})
    row = model(prepared(["x"])).to_pylist()[0]
    assert row["error_code"] is None and json.loads(row["output_json"]) == json.loads(full["output_json"])
    assert row["reasks"] == 1 and row["first_truncated"] and not row["truncated"]  # the last answer is whole
    stats = BatchStats()
    stats.add_row(row)
    assert (stats.reasks, stats.truncated) == (1, 1)


@pytest.mark.slow
def test_through_the_pipeline_a_failing_item_is_one_error_row(tmp_path, make_spec, tiny_model_path, ray_local):
    import pyarrow.parquet as pq

    from jobs.sample import encode_image, synthetic_image
    from pipeline.run import run_job

    (tmp_path / "image.jpg").write_bytes(encode_image(synthetic_image(96, 64, seed=2), "jpeg"))
    ids = ["good-0", OOM, "good-1", ERROR, "good-2"]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"id": i, "uri": "image.jpg"}) + "\n" for i in ids))
    spec = make_spec(manifest, task={"prompt": "What is it?", "sampling": {"max_new_tokens": 4}}, model={"batch_size": 8})

    summary = run_job(spec)  # on the shared cluster: its workers have the test hooks on
    rows = {row["id"]: row for row in pq.read_table(summary["output"]["run_dir"]).to_pylist()}
    assert sorted(rows) == sorted(ids)
    assert summary["errors_by_code"] == {"model.oom": 1, "model.error": 1} and summary["ok"] == 3
    assert rows[OOM]["error_code"] == "model.oom" and rows[ERROR]["error_code"] == "model.error"
    assert summary["invariant"]["ok"]
