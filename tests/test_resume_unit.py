"""The resume decision and the error budget as pure functions (no Ray)."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pytest

from pipeline.resume import ResumePolicy, committed_to_union, decide, manifest_to_union
from pipeline.stats import BatchStats, ErrorBudget, ErrorBudgetExceeded
from schemas.errors import DUPLICATE_ID, SKIPPED
from schemas.rows import MANIFEST_SCHEMA

POLICY = ResumePolicy(prompt_sha256="p1", model_uri="builtin:tiny", model_revision="r1")
T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)


def manifest_row(position, **extra):
    row = {"id": "a", "uris": ["x.jpg"], "position": position, "source": f"m#L{position}"}
    row.update(extra)
    return row


def committed_row(minutes=0, run="run1", **extra):
    row = {
        "manifest_id": "a", "status": "ok", "error_code": None, "content_version": "etag:1",
        "prompt_sha256": "p1", "model": "builtin:tiny", "model_revision": "r1",
        "finished_at": T0 + timedelta(minutes=minutes), "run_id": run,
    }
    row.update(extra)
    return row


def run_decide(manifest_rows, committed_rows, policy=POLICY):
    parts = [manifest_to_union(pa.Table.from_pylist(manifest_rows, schema=MANIFEST_SCHEMA))]
    if committed_rows:
        schema = pa.schema([
            ("manifest_id", pa.string()), ("status", pa.string()), ("error_code", pa.string()),
            ("content_version", pa.string()), ("prompt_sha256", pa.string()), ("model", pa.string()),
            ("model_revision", pa.string()), ("finished_at", pa.timestamp("ms", tz="UTC")), ("run_id", pa.string()),
        ])
        parts.append(committed_to_union(pa.Table.from_pylist(committed_rows, schema=schema)))
    return decide(pa.concat_tables(parts), policy).to_pylist()


def test_new_id_is_due():
    (row,) = run_decide([manifest_row(1)], [])
    assert row["error_code"] is None and row["resume_version"] is None


def test_first_occurrence_wins_and_the_others_are_duplicates():
    rows = run_decide([manifest_row(9), manifest_row(2), manifest_row(5)], [])
    assert [r["position"] for r in rows] == [2, 5, 9]
    assert [r["error_code"] for r in rows] == [None, DUPLICATE_ID, DUPLICATE_ID]
    assert [r["error_message"] for r in rows[1:]] == ["m#L2", "m#L2"]  # where the one processed is


def test_committed_same_work_checks_the_version():
    (row,) = run_decide([manifest_row(1)], [committed_row()])
    assert row["error_code"] is None and row["resume_version"] == "etag:1"
    no_check = ResumePolicy(**{**POLICY.__dict__, "check_versions": False})
    (row,) = run_decide([manifest_row(1)], [committed_row()], no_check)
    assert row["error_code"] == SKIPPED


def test_changed_prompt_or_model_makes_it_due():
    (row,) = run_decide([manifest_row(1)], [committed_row(prompt_sha256="old")])
    assert row["error_code"] is None and row["resume_version"] is None
    (row,) = run_decide([manifest_row(1)], [committed_row(model_revision="r0")])
    assert row["error_code"] is None and row["resume_version"] is None


def test_latest_committed_row_decides():
    rows = [committed_row(0, "run1", prompt_sha256="old"), committed_row(5, "run2", status="error", error_code="fetch.timeout")]
    (row,) = run_decide([manifest_row(1)], rows)
    assert row["error_code"] == SKIPPED  # an error row counts as committed


def test_redrive_only_runs_matching_error_rows():
    error = [committed_row(status="error", error_code="fetch.timeout")]
    redrive = ResumePolicy(**{**POLICY.__dict__, "redrive_codes": ("fetch.timeout",)})
    (row,) = run_decide([manifest_row(1)], error, redrive)
    assert row["error_code"] is None
    other = ResumePolicy(**{**POLICY.__dict__, "redrive_codes": ("model.oom",)})
    (row,) = run_decide([manifest_row(1)], error, other)
    assert row["error_code"] == SKIPPED
    (row,) = run_decide([manifest_row(1)], [committed_row()], redrive)
    assert row["error_code"] == SKIPPED  # ok rows are not re-driven
    (row,) = run_decide([manifest_row(1)], [], redrive)
    assert row["error_code"] is None  # ids that never ran (a killed run's remainder) are due
    every = ResumePolicy(**{**POLICY.__dict__, "redrive_codes": ()})
    (row,) = run_decide([manifest_row(1)], error, every)
    assert row["error_code"] is None


def test_committed_ids_no_longer_in_the_manifest_produce_nothing():
    assert run_decide([], [committed_row()]) == []


def _stats(rows, **errors):
    stats = BatchStats(rows=rows, ok=rows - sum(errors.values()))
    stats.errors = Counter({code.replace("_", "."): n for code, n in errors.items()})
    return stats


def test_error_budget_waits_for_a_full_window_then_names_the_dominant_code():
    budget = ErrorBudget(max_rate=0.2, window=1000)
    budget.add(_stats(500, fetch_denied=500))
    budget.check()  # not a full window yet
    budget.add(_stats(600, fetch_denied=400, fetch_timeout=10))
    with pytest.raises(ErrorBudgetExceeded, match=r"fetch\.\* errors.*most of them fetch\.denied \(900\)"):
        budget.check()


def test_error_budget_counts_families_separately_and_slides():
    budget = ErrorBudget(max_rate=0.2, window=1000)
    budget.add(_stats(1000, fetch_denied=150, decode_corrupt=150))  # 15 % each: fine
    budget.check()
    for _ in range(5):
        budget.add(_stats(1000, decode_corrupt=10))
    budget.check()
