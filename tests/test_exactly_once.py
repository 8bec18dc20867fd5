"""Exactly-once across runs, with real processes: resume, version-aware recompute, re-drive,
output modes, compaction, the error budget, and fault injection (a killed model actor, a
removed worker node, a SIGKILLed driver). Every fault is triggered by progress (committed
files), never by a timer."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from local_ray import shared_cluster

from jobs.sample import encode_image, synthetic_image
from pipeline.graph import PREPARE_BATCH_ROWS

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def write_corpus(root: Path, n: int, missing: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(n):
        name = f"img{index:03d}.png"
        (root / name).write_bytes(encode_image(synthetic_image(96 + 8 * (index % 5), 72, seed=index), "png"))
        rows.append({"id": f"item-{index:03d}", "uri": name})
    for index in range(missing):
        rows.append({"id": f"gone-{index:03d}", "uri": f"missing-{index:03d}.png"})
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def free_text(prompt="Describe it.", tokens=6):
    return {"prompt": prompt, "sampling": {"max_new_tokens": tokens}}


def result_ids(output: Path) -> list[str]:
    from pipeline.results import current_results

    return current_results(str(output)).column("id").to_pylist()


def committed(output: Path) -> list[Path]:
    return sorted(output.glob("run-*/*.parquet"))


def raw_ids(output: Path) -> list[str]:
    """Every row id in every run's files, duplicates kept (the current table would hide them)."""
    import pyarrow.parquet as pq

    return sorted(i for path in committed(output) for i in pq.read_table(path, columns=["id"]).column("id").to_pylist())


def committed_rows(output: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.read_metadata(path).num_rows for path in committed(output))


def when_committed(output: Path, count: int, action, timeout_s: float = 600) -> threading.Thread:
    """Run `action` (in a thread) once `count` result files are committed under `output`."""

    def watch():
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if len(committed(output)) >= count:
                action()
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One finished run of 6 items (free text, one row per file), run once for the tests that
    start from a finished run: each works on its own copy of the output (`copy_of`)."""
    from pipeline.run import run_job
    from schemas.spec import parse_spec

    shared_cluster()
    root = tmp_path_factory.mktemp("finished")
    manifest = write_corpus(root / "corpus", 6)
    spec = parse_spec({
        "name": "test-job", "input": {"manifest": str(manifest)}, "output": {"path": str(root / "out"), "rows_per_file": 1},
        "model": {"path": "builtin:tiny"}, "task": free_text(),
    }).resolved()
    summary = run_job(spec)
    assert (summary["processed"], summary["skipped"], summary["invariant"]["ok"]) == (6, 0, True)
    return manifest, Path(spec.output.path), summary


def copy_of(finished_run, tmp_path: Path) -> Path:
    """The finished run's output copied to tmp_path/out (where make_spec writes)."""
    _, output, _ = finished_run
    shutil.copytree(output, tmp_path / "out")
    return tmp_path / "out"


# The tests that read `finished_run` stay on one test worker, which runs it once.
from_finished_run = pytest.mark.xdist_group("exactly_once_finished_run")


@from_finished_run
def test_rerun_after_success_processes_nothing_and_a_new_prompt_everything(tmp_path, make_spec, ray_local, finished_run):
    from pipeline.run import run_job

    manifest, _, _ = finished_run
    copy_of(finished_run, tmp_path)
    spec = make_spec(manifest, task=free_text(), output={"rows_per_file": 2})
    again = run_job(spec)
    assert (again["processed"], again["skipped"], again["rows_out"], again["invariant"]["ok"]) == (0, 6, 6, True)
    assert not list((Path(spec.output.path) / f"run-{again['run_id']}").glob("*.parquet"))

    changed = make_spec(manifest, task=free_text("Describe it briefly."), output={"rows_per_file": 2})
    third = run_job(changed)
    assert (third["processed"], third["skipped"]) == (6, 0)
    ids = result_ids(Path(spec.output.path))
    assert sorted(ids) == [f"item-{i:03d}" for i in range(6)]  # the latest row per id, once each


def test_changed_media_is_processed_again(tmp_path, make_spec, ray_local):
    from pipeline.results import current_results
    from pipeline.run import run_job

    manifest = write_corpus(tmp_path / "corpus", 4)
    spec = make_spec(manifest, task=free_text())
    run_job(spec)
    changed = manifest.parent / "img002.png"
    changed.write_bytes(encode_image(synthetic_image(120, 90, seed=99), "png"))
    again = run_job(spec)
    assert (again["processed"], again["skipped"]) == (1, 3)
    table = current_results(spec.output.path)
    latest = dict(zip(table.column("id").to_pylist(), table.column("run_id").to_pylist()))
    assert latest["item-002"] == again["run_id"] and latest["item-000"] != again["run_id"]


def test_redrive_by_code(tmp_path, make_spec, ray_local):
    from pipeline.results import current_results
    from pipeline.run import run_job

    manifest = write_corpus(tmp_path / "corpus", 3, missing=2)
    (manifest.parent / "notes.txt").write_text("x")
    lines = manifest.read_text() + json.dumps({"id": "not-media", "uri": "notes.txt"}) + "\n"
    manifest.write_text(lines)
    spec = make_spec(manifest, task=free_text())
    first = run_job(spec)
    assert first["errors_by_code"] == {"fetch.not_found": 2, "decode.unsupported": 1}

    plain = run_job(spec)  # error rows count as committed: a plain rerun does not retry them
    assert plain["processed"] == 0

    for index in range(2):  # the missing objects arrive
        (manifest.parent / f"missing-{index:03d}.png").write_bytes(encode_image(synthetic_image(64, 64, seed=index), "png"))
    # An id no run ever committed (as after a killed run) is due in a re-drive too.
    (manifest.parent / "late.png").write_bytes(encode_image(synthetic_image(64, 64, seed=7), "png"))
    manifest.write_text(manifest.read_text() + json.dumps({"id": "late", "uri": "late.png"}) + "\n")
    redriven = run_job(spec, redrive_codes=("fetch.not_found",))
    assert (redriven["processed"], redriven["ok"], redriven["skipped"]) == (3, 3, 4)
    assert redriven["invariant"]["ok"] and redriven["invariant"]["missing"] == 0
    table = current_results(spec.output.path)
    status = dict(zip(table.column("id").to_pylist(), table.column("error_code").to_pylist()))
    assert status == {"item-000": None, "item-001": None, "item-002": None, "gone-000": None, "gone-001": None,
                      "not-media": "decode.unsupported", "late": None}


@from_finished_run
def test_the_invariant_counts_the_files_not_the_stats(tmp_path, make_spec, ray_local, finished_run):
    import pyarrow.parquet as pq

    from pipeline.manifests import manifest_files
    from pipeline.resume import ResumePolicy
    from pipeline.run import verify

    manifest, _, summary = finished_run
    copy_of(finished_run, tmp_path)
    spec = make_spec(manifest, task=free_text())
    model = summary["model"]
    policy = ResumePolicy(prompt_sha256=summary["prompt_sha256"], model_uri=model["uri"], model_revision=model["revision"])

    def check():
        return verify(spec, summary["run_id"], manifest_files(spec.input, spec.storage), [], policy, None, 2)

    files = committed(Path(spec.output.path))
    copied, lost = (pq.read_metadata(path).num_rows for path in files[:2])
    shutil.copy(files[0], files[0].with_name("part-copy.parquet"))  # the same rows twice
    counts = check()
    assert not counts["ok"] and (counts["ids_written_twice"], counts["missing"]) == (copied, 0)
    files[0].unlink()
    files[1].unlink()  # a file lost after its commit: its ids have no row
    counts = check()
    assert not counts["ok"] and (counts["rows_in"], counts["rows_out"], counts["missing"]) == (6, 6 - lost, lost)


@from_finished_run
def test_output_modes(tmp_path, make_spec, ray_local, finished_run):
    from pipeline.run import OutputExists, run_job

    manifest, _, _ = finished_run
    output = copy_of(finished_run, tmp_path)
    with pytest.raises(OutputExists, match="error_if_exists"):
        run_job(make_spec(manifest, task=free_text(), output={"mode": "error_if_exists"}))
    fresh = run_job(make_spec(manifest, task=free_text(), output={"mode": "overwrite"}))
    assert fresh["processed"] == 6
    assert {p.parent.name for p in committed(output)} == {f"run-{fresh['run_id']}"}


@from_finished_run
def test_compaction_keeps_the_table(tmp_path, finished_run):
    from pipeline.results import compact, current_results

    output = str(copy_of(finished_run, tmp_path))
    before = current_results(output).sort_by("id")
    assert len(committed(Path(output))) == 6
    report = compact(output)
    assert report["files_merged"] == 6 and report["files_written"] == 1
    assert len(committed(Path(output))) == 1
    after = current_results(output).sort_by("id")
    assert after.select(["id", "raw_text", "run_id"]).equals(before.select(["id", "raw_text", "run_id"]))


def test_error_budget_stops_the_run_and_a_rerun_resumes(tmp_path, make_spec, ray_local):
    from pipeline.run import run_job
    from pipeline.stats import ErrorBudgetExceeded

    manifest = write_corpus(tmp_path / "corpus", 0, missing=1500)
    spec = make_spec(
        manifest, task=free_text(), output={"max_error_rate": 0.2, "error_rate_window": 1000, "rows_per_file": 250}
    )
    with pytest.raises(ErrorBudgetExceeded, match=r"most of them fetch\.not_found"):
        run_job(spec)
    kept = committed_rows(Path(spec.output.path))
    assert kept >= 1000  # what was committed before the stop is kept
    rerun = run_job(make_spec(manifest, task=free_text(), output={"rows_per_file": 250}))
    assert rerun["skipped"] == kept and rerun["processed"] == 1500 - kept
    assert rerun["invariant"]["ok"]


def _descendants_named(fragment: str) -> list[psutil.Process]:
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if fragment in " ".join(child.cmdline()) or fragment in child.name():
                found.append(child)
        except psutil.Error:
            pass
    return found


def test_killed_model_actor_loses_nothing(tmp_path, make_spec, ray_local):
    from pipeline.run import run_job

    # Rows reach the actor in blocks of PREPARE_BATCH_ROWS (32), and a block's results leave it
    # together: with three blocks, the first files commit while the actor holds the next block,
    # so the kill lands mid-inference (with one block it would only kill an actor done with its work).
    total = 3 * PREPARE_BATCH_ROWS
    manifest = write_corpus(tmp_path / "corpus", total)
    spec = make_spec(manifest, task=free_text(tokens=8), output={"rows_per_file": 8}, model={"batch_size": 8})
    killed, files_at_kill = [], []

    def kill_actor():
        files_at_kill.append(len(committed(Path(spec.output.path))))
        for process in _descendants_named("Predictor"):
            process.kill()  # SIGKILL: no clean-up, as when a node's OOM killer strikes
            killed.append(process.pid)

    watcher = when_committed(Path(spec.output.path), 1, kill_actor)
    summary = run_job(spec)
    watcher.join(timeout=5)
    assert killed, "the model actor was never found to kill"
    assert files_at_kill[0] < len(committed(Path(spec.output.path))), "the run was done before the kill"
    assert summary["invariant"]["ok"] and summary["rows_out"] == total
    assert raw_ids(Path(spec.output.path)) == [f"item-{i:03d}" for i in range(total)]  # in the raw files, once each


def test_removed_worker_node_loses_nothing(tmp_path, make_spec):
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.run import run_job

    ray.shutdown()  # this test needs a cluster of its own shape
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 150 * 2**20})
    workers = [cluster.add_node(num_cpus=1, object_store_memory=150 * 2**20) for _ in range(2)]
    try:
        ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
        cluster.wait_for_nodes()
        total = 3 * PREPARE_BATCH_ROWS  # several blocks: the node goes with work still ahead of it
        manifest = write_corpus(tmp_path / "corpus", total)
        spec = make_spec(manifest, task=free_text(tokens=8), output={"rows_per_file": 8}, model={"batch_size": 8})
        output = Path(spec.output.path)
        files_at_removal = []
        watcher = when_committed(output, 1, lambda: (files_at_removal.append(len(committed(output))), cluster.remove_node(workers[0])))
        summary = run_job(spec)
        watcher.join(timeout=30)
        assert files_at_removal, "the worker node was never removed"
        assert files_at_removal[0] < len(committed(output)), "the run was done before the node went"
        assert summary["invariant"]["ok"] and summary["rows_out"] == total
        assert raw_ids(output) == [f"item-{i:03d}" for i in range(total)]  # in the raw files, once each
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_killed_driver_then_rerun_does_only_the_rest(tmp_path, ray_local):
    # Kill once about half the files are committed (one row per file, one row per batch:
    # commits come one at a time, never all at once, so half is a count we can stop at).
    TOTAL, KILL_AT = 60, 30
    manifest = write_corpus(tmp_path / "corpus", TOTAL)
    output = tmp_path / "out"
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump({
        "name": "kill-driver",
        "input": {"manifest": str(manifest)},
        "output": {"path": str(output), "rows_per_file": 1},
        "model": {"batch_size": 1},
        "task": free_text(tokens=32),
        "ray": {"num_cpus": 2},
    }))
    env = {**os.environ, "RAY_ADDRESS": ""}
    driver = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "run", str(spec_path)], cwd=REPO, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.time() + 600
        while len(committed(output)) < KILL_AT and driver.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert driver.poll() is None, "the run ended before it could be killed"
        started = psutil.Process(driver.pid).children(recursive=True)  # its Ray processes
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        for process in locals().get("started", []):
            try:
                process.kill()
            except psutil.Error:
                pass
        if driver.poll() is None:
            driver.kill()
    done_before = committed_rows(output)
    assert KILL_AT <= done_before < TOTAL

    # The rerun: a new driver (this process, on the shared cluster) with the same spec.
    from pipeline.run import run_job
    from schemas.spec import load_spec

    summary = run_job(load_spec(spec_path))
    assert summary["skipped"] == done_before
    assert summary["processed"] == TOTAL - done_before
    assert summary["invariant"]["ok"]
    assert sorted(result_ids(output)) == [f"item-{i:03d}" for i in range(TOTAL)]
    assert raw_ids(output) == [f"item-{i:03d}" for i in range(TOTAL)]  # both runs' files: each id once
