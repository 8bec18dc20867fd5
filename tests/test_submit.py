"""`tessera submit / status / logs / stop / list` against a real Ray head started here
(`ray start --head` on loopback, every port explicit, stopped at the end).

One real tessera job runs to SUCCEEDED (tiny model, a tiny corpus, a tick-templated manifest,
a forwarded variable) and its Parquet is read back with DuckDB; one fails and must say why.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import duckdb
import pytest
import yaml
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from ray_head import RayHead  # noqa: E402

from jobs.cli import main  # noqa: E402
from jobs.submit import (  # noqa: E402
    PACKAGES, SPEC_FILE, build_working_dir, connect, credential_paths, entrypoint_for, runtime_env_for,
    wait_until_done,
)
from schemas.spec import load_spec, parse_spec  # noqa: E402

# One xdist worker runs this whole module: its module-scoped fixtures are costly runs.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("submit")]

TICK = "2026-11-22T03:00:00+00:00"
SECRET_NAME, SECRET_VALUE = "TESSERA_TEST_FORWARDED", "s3cr3t-forwarded-value-4711"
IMAGE_IDS = ["img-000", "img-001", "img-002"]
DEMO_SPEC = str(Path(__file__).resolve().parent.parent / "jobs" / "examples" / "demo-moderation.yaml")


@pytest.fixture(scope="module")
def head():
    with pytest.MonkeyPatch.context() as patch:
        # Both sides explicit: a token in ~/.ray would otherwise switch the head to token auth.
        patch.setenv("RAY_AUTH_MODE", "disabled")
        patch.delenv("RAY_ADDRESS", raising=False)
        patch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
        ray_head = RayHead()
        ray_head.start()
        try:
            yield ray_head
        finally:
            ray_head.stop()
    assert not ray_head.our_processes(), "the head left processes behind"


def cli(*args: str, env: dict | None = None):
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


@pytest.fixture(scope="module")
def day_corpus(tmp_path_factory):
    """Three images and one missing file under corpus/2026-11-22/, as a nightly job would find them."""
    from jobs.sample import write_sample_corpus

    root = tmp_path_factory.mktemp("lake")
    day = root / "2026-11-22"
    full = write_sample_corpus(day, n_images=3, n_videos=0)
    rows = [json.loads(line) for line in full.read_text().splitlines()]
    keep = [r for r in rows if r.get("id") in (*IMAGE_IDS, "missing-file")]
    full.write_text("".join(json.dumps(r) + "\n" for r in keep))
    return root


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory, day_corpus):
    path = tmp_path_factory.mktemp("spec") / "nightly.yaml"
    path.write_text(yaml.safe_dump({
        "name": "nightly-test",
        "input": {"manifest": str(day_corpus) + "/{{ tick.strftime('%Y-%m-%d') }}/manifest.jsonl"},
        "output": {"path": str(path.parent / "out")},
        "model": {"path": "builtin:tiny"},
        "task": {"preset": "moderation", "sampling": {"max_new_tokens": 256}},  # short: the answers mean nothing
        "schedule": {"cron": "0 3 * * *"},
    }))
    return path


@pytest.fixture(scope="module")
def finished_job(head, spec_file, tiny_model_path):
    """Submit the spec for one tick with a forwarded variable and wait for the job to end."""
    env = {SECRET_NAME: SECRET_VALUE}
    result = cli("submit", str(spec_file), "--address", head.dashboard_url, "--tick", TICK,
                 "--forward-env", SECRET_NAME, "--wait", env=env)
    submission_id = result.stdout.split()[0]
    return submission_id, result


def test_submitted_job_succeeds_and_its_parquet_reads_back(finished_job, spec_file, head):
    submission_id, result = finished_job
    assert result.exit_code == 0, result.output + connect(head.dashboard_url).get_job_logs(submission_id)[-5000:]
    assert result.stdout.strip().splitlines()[-1] == "SUCCEEDED"
    spec = load_spec(spec_file)
    rows = duckdb.sql(
        f"SELECT id, status, error_code, job FROM read_parquet('{spec.output.path}/**/*.parquet') ORDER BY id"
    ).fetchall()
    assert [r[0] for r in rows] == sorted([*IMAGE_IDS, "missing-file"])
    assert {r[0]: r[2] for r in rows}["missing-file"] == "fetch.not_found"
    assert {r[1] for r in rows} <= {"ok", "error"}  # an image may be `error` (random weights); never lost
    assert {r[3] for r in rows} == {"nightly-test"}


def test_status_shows_the_run(finished_job, head):
    submission_id, _ = finished_job
    result = cli("status", submission_id, "--address", head.dashboard_url, "--json")
    assert result.exit_code == 0, result.output
    described = json.loads(result.stdout)
    assert described["status"] == "SUCCEEDED"
    assert described["job"] == "nightly-test"
    assert described["tick"] == TICK
    assert described["run_id"] in described["entrypoint"]
    assert Path(described["summary"]).exists()
    summary = json.loads(Path(described["summary"]).read_text())
    assert summary["invariant"]["ok"] and summary["rows_out"] == 4

    listed = cli("list", "--address", head.dashboard_url)
    assert listed.exit_code == 0
    assert any(line.startswith(submission_id) and "SUCCEEDED" in line for line in listed.stdout.splitlines())


def test_logs_are_json_lines_with_job_run_id_and_tick(finished_job, head):
    submission_id, _ = finished_job
    for follow in ((), ("--follow",)):  # --follow on an ended job prints everything and returns
        result = cli("logs", submission_id, "--address", head.dashboard_url, *follow)
        assert result.exit_code == 0, result.output
        ours = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        assert any(event["event"] == "run_finished" for event in ours)
        for event in ours:
            assert event["job"] == "nightly-test" and event["tick"] == TICK and event["run_id"], event


def test_forwarded_variable_is_not_shown_by_ray(finished_job, head):
    submission_id, _ = finished_job
    client = connect(head.dashboard_url)
    info = client.get_job_info(submission_id)
    shown = json.dumps({"runtime_env": info.runtime_env, "entrypoint": info.entrypoint, "metadata": info.metadata})
    assert SECRET_VALUE not in shown
    assert SECRET_NAME not in json.dumps(info.runtime_env.get("env_vars") or {})
    assert SECRET_VALUE not in client.get_job_logs(submission_id)


def test_forwarded_variable_reaches_driver_and_workers(head, tmp_path, monkeypatch):
    """The same working dir and setup hook as `tessera submit`, with a probe for an entrypoint."""
    from jobs.forward_env import collect

    monkeypatch.setenv(SECRET_NAME, SECRET_VALUE)
    staging = tmp_path / "wd"
    staging.mkdir()
    spec = parse_spec({"name": "probe", "input": {"manifest": "m.jsonl"}, "output": {"path": "o"}, "task": {"preset": "caption"}})
    build_working_dir(staging, spec, ship_code=True, forwarded=collect([SECRET_NAME]))
    (staging / "probe.py").write_text(
        "import hashlib, os, ray\n"
        "from jobs.forward_env import load_env_file, ENV_FILE\n"
        "load_env_file(ENV_FILE)\n"
        "digest = lambda: hashlib.sha256(os.environ.get(%r, '').encode()).hexdigest()\n"
        "ray.init()\n"
        "print('driver', digest())\n"
        "print('worker', ray.get(ray.remote(num_cpus=0)(digest).remote()))\n" % SECRET_NAME
    )
    client = connect(head.dashboard_url)
    submission_id = client.submit_job(entrypoint="python probe.py", runtime_env=runtime_env_for(staging, forwarded=True))
    assert wait_until_done(client, submission_id, poll_s=1, timeout_s=300) == "SUCCEEDED", client.get_job_logs(submission_id)
    import hashlib

    expected = hashlib.sha256(SECRET_VALUE.encode()).hexdigest()
    logs = client.get_job_logs(submission_id)
    assert f"driver {expected}" in logs and f"worker {expected}" in logs, logs


def test_failing_job_reports_failed_with_its_error(head, tmp_path, tiny_model_path):
    result = cli("submit", DEMO_SPEC, "--address", head.dashboard_url,
                 "--set", f"input.manifest={tmp_path}/nowhere/*.jsonl", "--set", f"output.path={tmp_path}/out", "--wait")
    assert result.exit_code == 1, result.output
    assert result.stdout.strip().splitlines()[-1] == "FAILED"
    submission_id = result.stdout.split()[0]
    status = cli("status", submission_id, "--address", head.dashboard_url)
    assert "FAILED" in status.stdout
    assert "no manifest files match" in status.stdout  # Ray's message carries the driver's last lines
    assert "no manifest files match" in cli("logs", submission_id, "--address", head.dashboard_url).stdout


def test_stop_a_running_job(head):
    client = connect(head.dashboard_url)
    submission_id = client.submit_job(entrypoint="sleep 600", metadata={"tessera.job": "sleeper"})
    result = cli("stop", submission_id, "--address", head.dashboard_url, "--wait")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == "STOPPED"
    again = cli("stop", submission_id, "--address", head.dashboard_url)
    assert "already ended: STOPPED" in again.stdout


def test_follow_prints_logs_as_they_come_until_the_job_ends(head):
    client = connect(head.dashboard_url)
    submission_id = client.submit_job(entrypoint="echo first; sleep 3; echo second")
    result = cli("logs", submission_id, "--address", head.dashboard_url, "--follow")
    assert result.exit_code == 0, result.output
    assert result.stdout.index("first") < result.stdout.index("second")
    assert client.get_job_status(submission_id) == "SUCCEEDED"


def test_unknown_id_is_a_usage_error(head):
    result = CliRunner().invoke(main, ["status", "no-such-job", "--address", head.dashboard_url])
    assert result.exit_code == 2
    assert "no job 'no-such-job' on this cluster" in result.stderr


def test_credentials_in_the_spec_are_refused_before_submitting(head, tmp_path):
    result = CliRunner().invoke(main, [
        "submit", DEMO_SPEC, "--address", head.dashboard_url,
        "--set", "input.manifest=https://user:hunter22@example.com/m.jsonl",
    ])
    assert result.exit_code == 2
    assert "input.manifest" in result.stderr and "--forward-env" in result.stderr


def test_missing_forwarded_variable_is_a_usage_error(head, monkeypatch):
    monkeypatch.delenv("TESSERA_NOT_SET", raising=False)
    result = CliRunner().invoke(main, ["submit", DEMO_SPEC, "--address", head.dashboard_url,
                                       "--forward-env", "TESSERA_NOT_SET"])
    assert result.exit_code == 2
    assert "TESSERA_NOT_SET: the variable is not set" in result.stderr


# --- without a cluster ----------------------------------------------------------------------


def test_no_address_says_how_to_give_one(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    result = CliRunner().invoke(main, ["list"])
    assert result.exit_code == 2
    assert "--address http://HEAD:8265" in result.stderr


def test_unreachable_cluster_is_a_failure_with_a_hint():
    from ray_head import free_ports

    (port,) = free_ports(1)
    result = CliRunner().invoke(main, ["list", "--address", f"http://127.0.0.1:{port}"])
    assert result.exit_code == 1
    assert "cannot reach the Ray Job Submission API" in result.stderr


def test_working_dir_carries_code_and_the_spec_only(tmp_path):
    spec = parse_spec({"name": "wd", "input": {"manifest": "s3://b/m.jsonl"}, "output": {"path": "s3://b/out"},
                       "task": {"preset": "caption"}, "ray": {"address": "ray://elsewhere:10001"}})
    from jobs.submit import spec_for_cluster

    build_working_dir(tmp_path, spec_for_cluster(spec, None), ship_code=True, forwarded={})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*PACKAGES, SPEC_FILE])
    assert not list(tmp_path.rglob("__pycache__"))
    shipped = load_spec(tmp_path / SPEC_FILE)
    assert shipped.ray.address is None  # the job joins the cluster it runs on
    assert shipped.input.manifest == "s3://b/m.jsonl"
    assert runtime_env_for(tmp_path, forwarded=False) == {"working_dir": str(tmp_path)}

    code_less = tmp_path / "no-code"
    code_less.mkdir()
    build_working_dir(code_less, spec, ship_code=False, forwarded={})
    assert [p.name for p in code_less.iterdir()] == [SPEC_FILE]


def test_working_dir_carries_a_custom_output_schema(tmp_path):
    """A user's schema lives beside the spec, not on the cluster: it travels with the job."""
    from jobs.submit import SCHEMA_FILE

    import custom_output  # noqa: F401  (tests/: imported as the CLI imports it when loading the spec)

    base = {"name": "wd", "input": {"manifest": "s3://b/m.jsonl"}, "output": {"path": "s3://b/out"}}
    module_spec = parse_spec({**base, "task": {"prompt": "Describe.", "output_schema": "custom_output:ProductListing"}})
    with_module = tmp_path / "module"
    with_module.mkdir()
    build_working_dir(with_module, module_spec, ship_code=False, forwarded={})
    assert sorted(p.name for p in with_module.iterdir()) == sorted(["custom_output.py", SPEC_FILE])
    assert load_spec(with_module / SPEC_FILE).task.output_schema == "custom_output:ProductListing"

    schema_file = tmp_path / "listing.json"
    schema_file.write_text(json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}))
    file_spec = parse_spec({**base, "task": {"prompt": "Describe.", "output_schema": str(schema_file)}})
    with_file = tmp_path / "file"
    with_file.mkdir()
    build_working_dir(with_file, file_spec, ship_code=False, forwarded={})
    assert load_spec(with_file / SPEC_FILE).task.output_schema == SCHEMA_FILE
    assert json.loads((with_file / SCHEMA_FILE).read_text()) == json.loads(schema_file.read_text())

    installed = parse_spec({**base, "task": {"prompt": "Describe.", "output_schema": "schemas.presets:Caption"}})
    with_installed = tmp_path / "installed"
    with_installed.mkdir()
    build_working_dir(with_installed, installed, ship_code=False, forwarded={})
    assert [p.name for p in with_installed.iterdir()] == [SPEC_FILE]


def test_entrypoint_is_the_documented_run_command():
    assert entrypoint_for("R1", None, env_file=False) == f"python -m jobs.cli run {SPEC_FILE} --run-id R1"
    from datetime import datetime, timezone

    tick = datetime(2026, 11, 22, 3, tzinfo=timezone.utc)
    assert entrypoint_for("R1", tick, env_file=True).endswith(
        "--tick 2026-11-22T03:00:00+00:00 --env-file .tessera-forwarded-env.json")


def test_credential_detection_is_by_whole_key_parts():
    plain = parse_spec({"name": "c", "input": {"manifest": "m.jsonl"}, "output": {"path": "o"}, "task": {"preset": "caption"}})
    assert credential_paths(plain) == []  # max_batch_tokens, max_new_tokens… are not credentials
    with_url = plain.model_copy(deep=True)
    with_url.output.path = "s3://AKIA:abc@bucket/out"
    assert credential_paths(with_url) == ["output.path"]


def test_submit_help_explains_the_command():
    result = CliRunner().invoke(main, ["submit", "--help"])
    assert "Job Submission" in result.output or "Ray cluster" in result.output
    for option in ("--address", "--forward-env", "--tick", "--wait", "--follow"):
        assert option in result.output
