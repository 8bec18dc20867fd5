"""The command line as a user meets it: exit statuses, error text, --dry-run, schema, results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


def tessera(*args, cwd=REPO, timeout=600):
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def write_spec(tmp_path, manifest, **extra) -> Path:
    spec = {
        "name": "cli-job",
        "input": {"manifest": str(manifest)},
        "output": {"path": str(tmp_path / "out")},
        "task": {"prompt": "What is it?", "sampling": {"max_new_tokens": 4}},
        "ray": {"num_cpus": 2},
        **extra,
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_help_explains_every_command():
    result = tessera("--help")
    assert result.returncode == 0
    for command in ("run", "validate", "schema", "results", "redrive", "compact", "submit", "schedule", "report"):
        assert command in result.stdout
    run_help = tessera("run", "--help").stdout
    assert "--dry-run" in run_help and "--ray-address" in run_help and "--set" in run_help


def test_invalid_spec_exits_2_and_names_the_key(tmp_path, sample_corpus):
    spec = write_spec(tmp_path, sample_corpus, model={"batchsize": 4})
    result = tessera("validate", str(spec))
    assert result.returncode == 2
    assert "model.batchsize: unknown key" in result.stderr
    result = tessera("run", str(spec))
    assert result.returncode == 2 and "model.batchsize" in result.stderr
    result = tessera("run", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "cannot read spec" in result.stderr


def test_missing_manifest_exits_2(tmp_path):
    spec = write_spec(tmp_path, tmp_path / "no-such-manifest.jsonl")
    result = tessera("run", str(spec))
    assert result.returncode == 2 and "no-such-manifest.jsonl" in result.stderr


def test_validate_prints_defaults(tmp_path, sample_corpus):
    result = tessera("validate", str(write_spec(tmp_path, sample_corpus)), "--set", "model.batch_size=3")
    assert result.returncode == 0
    resolved = yaml.safe_load(result.stdout)
    assert resolved["model"]["batch_size"] == 3 and resolved["media"]["video"]["fps"] == 1.0


def test_dry_run_prints_the_plan_without_running(tmp_path, sample_corpus):
    result = tessera("run", str(write_spec(tmp_path, sample_corpus)), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "invalid rows 1" in result.stdout and "video: 2" in result.stdout and "pdf: 1" in result.stdout
    assert not (tmp_path / "out").exists()


def test_schema_prints_json_schema():
    result = tessera("schema", "moderation")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    assert schema["properties"]["verdict"]["enum"] == ["allow", "review", "block"]
    assert tessera("schema", "no_such_module:Model").returncode == 2


@pytest.mark.slow
def test_run_prints_summary_and_results_reads_it_back(tmp_path, sample_corpus):
    spec = write_spec(tmp_path, sample_corpus)
    result = tessera("run", str(spec), "--limit", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rows in" in result.stdout and "invariant" in result.stdout and "holds" in result.stdout
    assert str(tmp_path / "out") in result.stdout
    log_lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    finished = [line for line in log_lines if line.get("event") == "run_finished"]
    assert finished and finished[0]["job"] == "cli-job" and finished[0]["run_id"]

    listed = tessera("results", str(tmp_path / "out"), "--format", "jsonl")
    assert listed.returncode == 0
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert len(rows) == 4 and len({r["id"] for r in rows}) == 4
    assert "row_number()" in tessera("results", str(tmp_path / "out"), "--sql").stdout
