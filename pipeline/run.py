"""Run one job: connect to Ray, build the graph, stream it to the end, verify, summarise.

The driver iterates only over stats rows (one per committed file). After the stream ends it
checks the invariant independently of the stats: distinct ids in the manifest (a
hash-partitioned count, bounded memory) against the ids committed by this run (read back
from the Parquet files), each exactly once.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from datetime import datetime, timezone

import ray
import ray.data
import structlog

from actors.constrained import unbounded_paths
from actors.loading import resolve_model
from pipeline import storage
from pipeline.graph import build_dataset, make_plan, manifest_bytes, read_manifest
from pipeline.manifests import manifest_files
from pipeline.sink import run_dir
from pipeline.stats import STAGES, BatchStats
from schemas.spec import JobSpec
from schemas.tasks import resolve_task

log = structlog.get_logger("tessera")


class JobFailed(RuntimeError):
    """The job could not run to its end (not: some rows are errors)."""


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def connect_ray(spec: JobSpec, cli_address: str | None = None) -> str:
    """--ray-address, else ray.address in the spec, else RAY_ADDRESS, else a local cluster."""
    address = cli_address or spec.ray.address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized():
        return "existing"
    ray.data.DataContext.get_current().enable_progress_bars = True
    kwargs = dict(include_dashboard=False, log_to_driver=True, logging_level="WARNING")
    if address:
        ray.init(address=address, **kwargs)
        return address
    ray.init(
        num_cpus=spec.ray.num_cpus,
        object_store_memory=spec.ray.object_store_memory_mb * 2**20 if spec.ray.object_store_memory_mb else None,
        **kwargs,
    )
    return "local"


def run_job(
    spec: JobSpec,
    *,
    run_id: str | None = None,
    ray_address: str | None = None,
    limit: int | None = None,
) -> dict:
    run_id = run_id or new_run_id()
    bound = log.bind(job=spec.name, run_id=run_id)
    started = time.time()
    model = resolve_model(spec.model)
    task = resolve_task(spec.task)
    if task.json_schema and (loose := unbounded_paths(task.json_schema)):
        bound.warning("unbounded_schema_paths", paths=loose, hint="bound them or the model may never finish")
    address = connect_ray(spec, ray_address)
    files = manifest_files(spec.input, spec.storage)
    plan = make_plan(spec, manifest_bytes(files, spec))
    bound.info("run_started", ray=address, manifests=len(files), model=model.uri, revision=model.revision, plan=plan.__dict__)
    ds = build_dataset(spec, run_id, files, model, task, plan, limit)

    totals, timeline, files_written = BatchStats(), [], []
    last_log = time.time()
    for stats_row in ds.iter_rows():
        batch = BatchStats.from_dict(json.loads(stats_row["stats_json"]))
        totals.merge(batch)
        if stats_row["file"]:
            files_written.append(stats_row["file"])
        timeline.append([round(stats_row["committed_at"] - started, 3), totals.rows])
        if time.time() - last_log > 10:
            bound.info("progress", rows=totals.rows, ok=totals.ok, errors=sum(totals.errors.values()))
            last_log = time.time()

    verified = verify(spec, files, files_written, limit, plan.shuffle_partitions)
    summary = build_summary(spec, run_id, model, task.prompt_sha256, plan, totals, timeline, verified, started)
    write_summary(spec, run_id, summary)
    bound.info("run_finished", rows=totals.rows, ok=totals.ok, invariant_ok=verified["ok"], wall_s=summary["wall_s"])
    return summary


def verify(spec: JobSpec, manifests: list[str], written: list[str], limit: int | None, partitions: int) -> dict:
    """Rows in (distinct manifest ids) against rows out (ids committed by this run)."""
    ids_in = read_manifest(spec, manifests, limit).select_columns(["id"])
    rows_in = ids_in.groupby("id", num_partitions=partitions).count().count()
    if written:
        results_fs = storage.arrow_filesystem(written[0], spec.storage)  # the spec's endpoint, not pyarrow's default
        counts = ray.data.read_parquet(written, columns=["id"], filesystem=results_fs).groupby("id", num_partitions=partitions).count()
        rows_out = counts.count()
        repeated = counts.filter(lambda r: r["count()"] > 1).count() if rows_out else 0
    else:
        rows_out = repeated = 0
    return {"rows_in": rows_in, "rows_out": rows_out, "ids_written_twice": repeated, "ok": rows_in == rows_out and not repeated}


def build_summary(spec, run_id, model, prompt_sha256, plan, totals: BatchStats, timeline, verified, started) -> dict:
    wall = time.time() - started
    return {
        "job": spec.name,
        "run_id": run_id,
        "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "wall_s": round(wall, 3),
        "rows_in": verified["rows_in"],
        "rows_out": verified["rows_out"],
        "ok": totals.ok,
        "errors": sum(totals.errors.values()),
        "errors_by_code": dict(sorted(totals.errors.items())),
        "invariant": verified,
        "duplicates": {"count": totals.duplicates, "examples": totals.duplicate_examples},
        "throughput_rows_per_s": round(totals.rows / wall, 3) if wall > 0 else None,
        "timeline": timeline,
        "latency_ms": {
            stage: {"p50": totals.latency[stage].quantile(0.5), "p95": totals.latency[stage].quantile(0.95)}
            for stage in STAGES
        },
        "tokens": {"input": totals.input_tokens, "output": totals.output_tokens},
        "pixel_bytes_to_actor": totals.pixel_bytes,
        "reasks": totals.reasks,
        "truncated": totals.truncated,
        "model": {"uri": model.uri, "revision": model.revision, "type": model.model_type},
        "prompt_sha256": prompt_sha256,
        "spec_sha256": spec_hash(spec),
        "plan": plan.__dict__,
        "output": {"path": spec.output.path, "run_dir": run_dir(spec.output.path, run_id)},
    }


def spec_hash(spec: JobSpec) -> str:
    import hashlib

    return hashlib.sha256(spec.model_dump_json().encode()).hexdigest()


def summary_uri(output_path: str, run_id: str) -> str:
    return storage.join(output_path, "_runs", run_id, "summary.json")


def write_summary(spec: JobSpec, run_id: str, summary: dict) -> None:
    storage.write_bytes(summary_uri(spec.output.path, run_id), json.dumps(summary, indent=2).encode(), spec.storage)
