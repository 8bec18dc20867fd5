"""Placement of model replicas on real Ray clusters started by the tests, with fake GPUs
(Ray hands out GPU ids and sets CUDA_VISIBLE_DEVICES; torch has no CUDA here, so each
replica runs on CPU): replicas sharded over 2 GPUs each, an autoscaling pool, several nodes.
Every assertion reads what the run itself reports (summary.json's `replicas`).

The rows are `slow` under the predictor's test hook (each waits SLOW_HOOK_S on its replica,
then the real model runs): a replica stays busy with a block while the next one queues, on
any machine load, without the CPU a long real workload would cost.

Each test starts the cluster shape it needs and shuts down exactly that.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from actors.predictor import TEST_FAULT_PREFIX, TEST_HOOKS_ENV
from pipeline.graph import PREPARE_BATCH_ROWS

pytestmark = pytest.mark.slow


SLOW = f"{TEST_FAULT_PREFIX}slow"


def _manifest(folder: Path, rows: int, images: int = 4) -> Path:
    """`rows` slow manifest rows over `images` distinct PNGs (ids are distinct)."""
    media = folder / "media"
    media.mkdir(parents=True, exist_ok=True)
    for index in range(images):
        Image.new("RGB", (64 + 16 * index, 48), (40 * index % 255, 90, 160)).save(media / f"img-{index}.png")
    manifest = folder / "manifest.jsonl"
    with manifest.open("w") as out:
        for row in range(rows):
            out.write(json.dumps({"id": f"{SLOW}-{row:04d}", "uri": str(media / f"img-{row % images}.png")}) + "\n")
    return manifest


def _run(make_spec, manifest: Path, model: dict) -> dict:
    from pipeline.run import run_job

    spec = make_spec(
        manifest,
        model={"path": "builtin:tiny", **model},
        task={"prompt": "Describe the image.", "sampling": {"max_new_tokens": 4}},
        media={"isolation": "none"},
        output={"rows_per_file": 8},
        # One decode task keeps up with slow replicas; each more is a worker to start (and to
        # import transformers in) on a machine with two real cores.
        ray={"cpu_concurrency": 1},
    )
    summary = run_job(spec)
    assert summary["invariant"]["ok"], summary["invariant"]
    return summary


@pytest.fixture
def fresh_ray(monkeypatch):
    """No Ray connection before the test (the shared local cluster is stopped) or after it;
    the processes the test starts see the test hooks switched on."""
    import ray

    ray.shutdown()
    monkeypatch.setenv(TEST_HOOKS_ENV, "1")
    yield ray
    ray.shutdown()


def test_two_replicas_of_two_gpus_each(fresh_ray, make_spec, tmp_path, tiny_model_path, monkeypatch):
    fresh_ray.init(address="local", num_cpus=6, num_gpus=4, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    # Start the pool's two actors before any work, so that both of them get some (else the
    # first one up may finish the few rows of a test before the second has loaded the model).
    monkeypatch.setattr(fresh_ray.data.DataContext.get_current(), "wait_for_min_actors_s", 300)
    # Three blocks of 32 slow rows, one batch in flight per replica: a busy replica takes no
    # second block while the other is idle (with two in flight, one could queue both blocks).
    summary = _run(
        make_spec, _manifest(tmp_path, rows=96), {"gpus_per_replica": 2, "replicas": 2, "batch_size": 2, "batches_in_flight": 1},
    )

    assert summary["processed"] == summary["ok"] == 96
    replicas = summary["replicas"]
    assert len(replicas) == 2 == summary["placement"]["replicas"], replicas
    held = [set(entry["gpu_ids"]) for entry in replicas.values()]
    assert all(len(gpus) == 2 for gpus in held), held  # each actor holds its bundle of two
    assert held[0].isdisjoint(held[1]) and held[0] | held[1] <= {"0", "1", "2", "3"}
    assert sum(entry["rows"] for entry in replicas.values()) == 96
    assert summary["plan"]["gpus_per_replica"] == 2 and summary["plan"]["placement"] == "actor"


def test_autoscaling_pool_grows_with_queued_work(fresh_ray, make_spec, tmp_path, tiny_model_path):
    fresh_ray.init(address="local", num_cpus=6, num_gpus=3, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    # Eight blocks of 32 slow rows (8 s each on a replica), two in flight per replica: the
    # queue is deep at once (Ray Data adds a replica when in-flight blocks reach 1.75 per
    # replica), and the first replica alone would be busy for over a minute, longer than a new
    # one takes to start on a loaded 2-core machine (a fresh worker imports torch, loads the model).
    summary = _run(
        make_spec,
        _manifest(tmp_path, rows=8 * PREPARE_BATCH_ROWS),
        {"gpus_per_replica": 1, "replicas": [1, 3], "batch_size": 4, "batches_in_flight": 2},
    )

    assert summary["processed"] == 8 * PREPARE_BATCH_ROWS
    assert tuple(summary["plan"]["replicas"]) == (1, 3)
    # Started with one replica; the queue made Ray Data add at least one more. (Over a run the
    # pool may also shrink when the queue drains and grow again: the summary counts every
    # replica that took rows, at most 3 of them at a time, each on one of the 3 GPUs.)
    assert summary["placement"]["replicas"] >= 2, summary["replicas"]
    assert all(len(entry["gpu_ids"]) == 1 and entry["gpu_ids"][0] in {"0", "1", "2"} for entry in summary["replicas"].values())


def test_multi_node_cluster_spreads_replicas(make_spec, tmp_path, tiny_model_path, monkeypatch):
    import ray
    import ray.data
    from ray.cluster_utils import Cluster

    ray.shutdown()
    monkeypatch.setenv(TEST_HOOKS_ENV, "1")  # the nodes' processes inherit it when they start
    waited = ray.data.DataContext.get_current().wait_for_min_actors_s
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "num_gpus": 0, "include_dashboard": False},
    )
    try:
        workers = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
        context = ray.data.DataContext.get_current()
        waited, context.wait_for_min_actors_s = context.wait_for_min_actors_s, 300
        summary = _run(make_spec, _manifest(tmp_path, rows=48), {"gpus_per_replica": 1, "replicas": 2, "batch_size": 2})
        worker_ids = {node.node_id for node in workers}
    finally:
        ray.data.DataContext.get_current().wait_for_min_actors_s = waited
        ray.shutdown()
        cluster.shutdown()

    assert summary["processed"] == 48
    nodes = {entry["node_id"] for entry in summary["replicas"].values()}
    # One GPU per worker node and two replicas of one GPU each: one replica on each worker.
    assert nodes == worker_ids and summary["placement"]["nodes"] == 2, summary["replicas"]


def test_ray_address_order(monkeypatch, make_spec, tmp_path):
    from pipeline.run import choose_ray_address

    manifest = tmp_path / "m.jsonl"
    manifest.write_text("")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert choose_ray_address(make_spec(manifest)) is None  # local
    monkeypatch.setenv("RAY_ADDRESS", "ray://env:10001")
    assert choose_ray_address(make_spec(manifest)) == "ray://env:10001"
    in_spec = make_spec(manifest, ray={"address": "ray://spec:10001"})
    assert choose_ray_address(in_spec) == "ray://spec:10001"
    assert choose_ray_address(in_spec, "ray://cli:10001") == "ray://cli:10001"


def test_decode_tasks_take_the_cpus_the_replicas_leave(make_spec, tmp_path):
    """The CPU stage's plan is a pure function of the spec and the cluster's resources."""
    from pipeline.graph import make_plan

    manifest = tmp_path / "m.jsonl"
    on_laptop = make_plan(make_spec(manifest), 0, {"CPU": 2.0})
    assert (on_laptop.cpu_concurrency, on_laptop.cpus_per_decode_task) == (1, 1.0)
    on_gpu_node = make_plan(make_spec(manifest, model={"replicas": 2, "gpus_per_replica": 1}), 0, {"CPU": 16.0, "GPU": 2.0})
    assert (on_gpu_node.cpu_concurrency, on_gpu_node.cpus_per_decode_task) == (14, 1.0)
    # More decode tasks than free CPUs: they share them, so Ray can still run them all at once.
    shared = make_plan(make_spec(manifest, ray={"cpu_concurrency": 4}), 0, {"CPU": 2.0})
    assert (shared.cpu_concurrency, shared.cpus_per_decode_task) == (4, 0.25)
    assert shared.cpu_concurrency * shared.cpus_per_decode_task + shared.replicas[1] * shared.cpus_per_replica <= 2.0
