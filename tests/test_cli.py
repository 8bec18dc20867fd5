"""The command line as a user meets it: exit statuses, error text, --dry-run, schema, results."""

from __future__ import annotations

import json
import os
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


# --- a user's own output schema, and a bad one ---------------------------------------------

# The console script, not `python -m`: it puts neither the working directory nor the spec's
# folder on sys.path, which is where a user's schema module lives.
TESSERA = Path(sys.executable).parent / "tessera"
SHOP_SCHEMA = '''
from typing import Literal

from pydantic import BaseModel, Field


class Listing(BaseModel):
    category: Literal["clothing", "electronics", "other"]
    colour: str = Field(max_length=12)
    in_stock: bool
'''


def console(*args, cwd):
    return subprocess.run([str(TESSERA), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_schema_module_in_the_working_directory(tmp_path):
    (tmp_path / "shop_schema.py").write_text(SHOP_SCHEMA)
    result = console("schema", "shop_schema:Listing", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["properties"]["category"]["enum"] == ["clothing", "electronics", "other"]


def test_bad_output_schema_exits_2_with_a_one_line_error(tmp_path, sample_corpus):
    not_a_schema = tmp_path / "not-a-schema.json"
    not_a_schema.write_text('{"type": "nope"}')
    cases = [("no_such_module:Model", "No module named 'no_such_module'"), (str(not_a_schema), "not a valid JSON Schema")]
    for ref, message in cases:
        spec = write_spec(tmp_path, sample_corpus, task={"prompt": "What is it?", "output_schema": ref})
        for args in (("run", spec), ("run", spec, "--dry-run"), ("validate", spec)):
            result = tessera(*map(str, args))
            assert result.returncode == 2, (args, result.stderr[-2000:])
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: task.output_schema") and message in lines[0], lines


@pytest.fixture(scope="module")
def schema_module_run(tmp_path_factory, sample_corpus):
    """One `tessera run --limit 3` from another folder, with the output schema a module next
    to the spec (the Ray workers get the module's code with the task). Two tests read it:
    a run of a fresh Ray cluster in a subprocess costs a minute on two cores."""
    work = tmp_path_factory.mktemp("cli-run")
    job = work / "job"
    job.mkdir()
    (job / "shop_schema.py").write_text(SHOP_SCHEMA)
    spec = write_spec(job, sample_corpus, task={"prompt": "Describe it.", "output_schema": "shop_schema:Listing"})
    env = {**os.environ, "RAY_ADDRESS": ""}
    result = subprocess.run([str(TESSERA), "run", str(spec), "--limit", "3"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    return work, job, result


@pytest.mark.slow
@pytest.mark.xdist_group("cli_run")
def test_run_prints_summary_and_results_reads_it_back(schema_module_run):
    work, job, result = schema_module_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rows in" in result.stdout and "invariant" in result.stdout and "holds" in result.stdout
    assert str(job / "out") in result.stdout
    log_lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    finished = [line for line in log_lines if line.get("event") == "run_finished"]
    assert finished and finished[0]["job"] == "cli-job" and finished[0]["run_id"]

    listed = console("results", job / "out", "--format", "jsonl", cwd=work)
    assert listed.returncode == 0
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert len(rows) == 3 and len({r["id"] for r in rows}) == 3
    assert "row_number()" in console("results", job / "out", "--sql", cwd=work).stdout


@pytest.mark.slow
@pytest.mark.xdist_group("cli_run")
def test_run_with_a_schema_module_next_to_the_spec(schema_module_run):
    work, job, result = schema_module_run
    assert result.returncode == 0, result.stderr[-3000:]
    listed = console("results", job / "out", "--format", "jsonl", cwd=work)
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    ok = [row for row in rows if row["status"] == "ok"]
    assert len(rows) == 3 and ok and not [row for row in rows if (row["error_code"] or "").startswith("model.")], rows
    assert all(json.loads(row["output_json"])["category"] in ("clothing", "electronics", "other") for row in ok)
