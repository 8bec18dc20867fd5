"""Run one job: connect to Ray, build the graph, stream it to the end, verify, summarise.

The driver iterates only over stats rows (one per committed file). After the stream ends it
checks the invariant independently of those stats, from the files themselves: every distinct
manifest id has exactly one current row, written by this run (its `run-<run_id>/` folder,
listed) or, where this run skipped it, committed earlier for the same key (a
hash-partitioned pass, bounded memory).

Output layout under `output.path` (docs/results.md):
    run-<run_id>/part-<digest>.parquet   committed results, one folder per run
    _staging/<run_id>/…parquet.tmp       files being written (hidden; renamed when complete)
    _runs/<run_id>/spec.json             the resolved spec, written when the run starts
    _runs/<run_id>/summary.json          the run summary, published when it ends
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import ray
import ray.data
import structlog
from ray.data.context import ShuffleStrategy

from actors.constrained import unbounded_paths
from pipeline import model_cache, storage
from pipeline.graph import build_dataset, make_plan, manifest_bytes, read_manifest, read_results
from pipeline.manifests import manifest_files
from pipeline.resume import (
    EARLIER, THIS_RUN, VERIFY_COLUMNS, VERIFY_COUNTS, ResumePolicy, check_id, committed_files, sum_counts,
    tag_manifest_ids, tag_result_rows,
)
from pipeline.sink import run_dir, staging_dir
from pipeline.stats import MAX_LISTED_DUPLICATES, STAGES, BatchStats, ErrorBudget, ErrorBudgetExceeded
from schemas.errors import DUPLICATE_ID
from schemas.spec import JobSpec
from schemas.tasks import resolve_task

log = structlog.get_logger("tessera")

# Staging files of a run older than this are leftovers of a killed run (a live run renames
# each file within seconds of writing it).
STALE_STAGING_S = 6 * 3600


class JobFailed(RuntimeError):
    """The job could not run to its end (not: some rows are errors)."""


class OutputExists(JobFailed):
    """`output.mode: error_if_exists` and the output already holds results."""


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def choose_ray_address(spec: JobSpec, cli_address: str | None = None) -> str | None:
    """--ray-address, else ray.address in the spec, else RAY_ADDRESS, else None (local)."""
    return cli_address or spec.ray.address or os.environ.get("RAY_ADDRESS") or None


def connect_ray(spec: JobSpec, cli_address: str | None = None) -> str:
    """Connect to the cluster `choose_ray_address` names, else start a local one."""
    address = choose_ray_address(spec, cli_address)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = True
    # Our groupbys (select, verify) as task-based sort shuffles: they reuse warm worker
    # processes, where hash shuffles start aggregator actors each time (seconds per run).
    context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    if ray.is_initialized():
        return "existing"
    kwargs = dict(include_dashboard=False, log_to_driver=True, logging_level="WARNING")
    if address:
        ray.init(address=address, **kwargs)
        return address
    ray.init(
        address="local",  # a new local cluster, never one a `ray start` left on this machine
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
    redrive_codes: tuple[str, ...] | None = None,
) -> dict:
    """Run `spec` to its end and return its summary. `redrive_codes` (a tuple, empty for all
    codes) re-runs only the error rows of earlier runs instead of a normal resume."""
    run_id = run_id or new_run_id()
    bound = log.bind(job=spec.name, run_id=run_id)
    started = time.time()
    model = model_cache.resolve(spec.model, spec.storage)
    task = resolve_task(spec.task)
    if task.json_schema and (loose := unbounded_paths(task.json_schema)):
        bound.warning("unbounded_schema_paths", paths=loose, hint="bound them or the model may never finish")
    # A manifest path that matches nothing is a usage error: found before an overwrite
    # clears the output and before a local Ray cluster starts.
    files = manifest_files(spec.input, spec.storage)
    committed = prepare_output(spec, redrive=redrive_codes is not None)
    policy = ResumePolicy(
        prompt_sha256=task.prompt_sha256,
        model_uri=model.uri,
        model_revision=model.revision,
        check_versions=spec.output.check_versions,
        redrive_codes=redrive_codes,
    )
    address = connect_ray(spec, ray_address)
    plan = make_plan(spec, manifest_bytes(files, spec))
    write_run_record(spec, run_id, "spec.json", spec.model_dump(mode="json"))
    bound.info(
        "run_started", ray=address, manifests=len(files), committed_files=len(committed),
        model=model.uri, revision=model.revision, plan=plan.__dict__,
    )
    ds = build_dataset(spec, run_id, files, model, task, plan, policy, committed, limit)
    streaming = time.time()
    try:
        totals, timeline = stream(ds, spec, started, bound)
    except ErrorBudgetExceeded as exc:
        write_run_record(spec, run_id, "summary.json", aborted_summary(spec, run_id, str(exc), started))
        bound.error("error_budget_exceeded", reason=str(exc))
        raise
    streamed = time.time()

    bound.info("verifying", hint="counting distinct manifest ids against the rows committed")
    verified = verify(spec, run_id, files, committed, policy, limit, plan.shuffle_partitions)
    summary = build_summary(spec, run_id, model, task.prompt_sha256, plan, totals, timeline, verified, started,
                            stream_window=(streaming, streamed))
    summary["mode"] = "redrive" if redrive_codes is not None else spec.output.mode
    write_run_record(spec, run_id, "summary.json", summary)
    storage.remove(staging_dir(spec.output.path, run_id), spec.storage, recursive=True)
    bound.info("run_finished", rows=totals.rows, ok=totals.ok, skipped=totals.skipped, invariant_ok=verified["ok"], wall_s=summary["wall_s"])
    return summary


def stream(ds, spec: JobSpec, started: float, bound) -> tuple[BatchStats, list]:
    """Drive the dataset to its end, merging the per-file stats; enforce the error budget."""
    totals, timeline = BatchStats(), []
    budget = ErrorBudget(spec.output.max_error_rate, spec.output.error_rate_window) if spec.output.max_error_rate else None
    last_log = time.time()
    for stats_row in ds.iter_rows():
        batch = BatchStats.from_dict(json.loads(stats_row["stats_json"]))
        totals.merge(batch)
        timeline.append([round(stats_row["committed_at"] - started, 3), totals.rows])
        if budget:
            budget.add(batch)
            budget.check()  # raises ErrorBudgetExceeded: the caller exits 1
        if time.time() - last_log > 10:
            bound.info("progress", rows=totals.rows, ok=totals.ok, errors=sum(totals.errors.values()), skipped=totals.skipped)
            last_log = time.time()
    return totals, timeline


def prepare_output(spec: JobSpec, redrive: bool = False) -> list[str]:
    """Apply output.mode; clean staging left by killed runs; return the committed files."""
    output = spec.output
    committed = committed_files(output.path, spec.storage)
    if committed and output.mode == "error_if_exists" and not redrive:
        raise OutputExists(
            f"{output.path} already holds results ({len(committed)} files) and output.mode is "
            "error_if_exists: choose another output.path, or set output.mode to resume or overwrite"
        )
    if output.mode == "overwrite" and not redrive:
        for path in {f.rsplit("/", 1)[0] for f in committed}:
            storage.remove(path, spec.storage, recursive=True)
        storage.remove(storage.join(output.path, "_runs"), spec.storage, recursive=True)
        committed = []
    remove_stale_staging(output.path, spec.storage)
    return committed


def remove_stale_staging(output_path: str, storage_spec, older_than_s: float = STALE_STAGING_S) -> int:
    """Delete staging files of killed runs (never those a live run may still rename)."""
    removed = 0
    for path in storage.list_files(storage.join(output_path, "_staging"), storage_spec):
        fs, inner = storage.filesystem(path, storage_spec)
        try:
            modified = fs.modified(inner).timestamp()
        except (OSError, NotImplementedError):
            continue
        if time.time() - modified > older_than_s:
            storage.remove(path, storage_spec)
            removed += 1
    return removed


def verify(
    spec: JobSpec, run_id: str, manifests: list[str], earlier: list[str], policy: ResumePolicy, limit: int | None, partitions: int
) -> dict:
    """Rows in (distinct manifest ids) = rows out, counted from the files, not the stats: the
    manifest is read again, this run's folder is listed, and the earlier runs' files (as
    select saw them) cover the ids this run skipped. One hash-partitioned pass, by manifest id."""
    mine = storage.list_files(run_dir(spec.output.path, run_id), spec.storage, suffix=".parquet")
    tagged = read_manifest(spec, manifests, limit).map_batches(tag_manifest_ids, batch_format="pyarrow")
    for files, kind in ((mine, THIS_RUN), (sorted(set(earlier) - set(mine)), EARLIER)):
        if files:
            rows = read_results(files, spec.storage, VERIFY_COLUMNS)
            tagged = tagged.union(rows.map_batches(tag_result_rows, fn_kwargs={"kind": kind}, batch_format="pyarrow"))
    per_id = tagged.groupby("manifest_id", num_partitions=partitions).map_groups(
        check_id, fn_kwargs={"policy": policy}, batch_format="pyarrow"
    )
    # One small row per block back to the driver (not one per id), summed here.
    partial = per_id.map_batches(sum_counts, batch_format="pyarrow", batch_size=None)
    context = ray.data.DataContext.get_current()
    shown, context.enable_progress_bars = context.enable_progress_bars, False  # the job's bars were the story
    try:
        counts = {name: 0 for name in VERIFY_COUNTS}
        for row in partial.iter_rows():
            for name in VERIFY_COUNTS:
                counts[name] += row[name]
    finally:
        context.enable_progress_bars = shown
    rows_out = counts["written"] + counts["already_committed"]
    bad = counts["missing"] or counts["ids_written_twice"] or counts["ids_not_in_manifest"]
    return {**counts, "rows_out": rows_out, "ok": counts["rows_in"] == rows_out and not bad}


def build_summary(spec, run_id, model, prompt_sha256, plan, totals: BatchStats, timeline, verified, started,
                  stream_window: tuple[float, float]) -> dict:
    finished = time.time()
    wall = finished - started
    streaming, streamed = stream_window
    return {
        "job": spec.name,
        "run_id": run_id,
        "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(),
        "finished_at": datetime.fromtimestamp(finished, timezone.utc).isoformat(),
        "wall_s": round(wall, 3),
        # prepare: model, Ray, manifests, plan; stream: the Ray Data job; verify: the invariant check.
        "phases_s": {
            "prepare": round(streaming - started, 3),
            "stream": round(streamed - streaming, 3),
            "verify": round(finished - streamed, 3),
        },
        "rows_in": verified["rows_in"],
        "rows_out": verified["rows_out"],
        "processed": totals.rows,
        "skipped": totals.skipped,
        "ok": totals.ok,
        "errors": sum(totals.errors.values()),
        "errors_by_code": dict(sorted(totals.errors.items())),
        "invariant": verified,
        DUPLICATE_ID: {"count": totals.duplicates, "listed": totals.duplicate_examples, "listed_max": MAX_LISTED_DUPLICATES},
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
        "replicas": totals.replicas,
        "placement": {
            "replicas": len(totals.replicas),
            "nodes": len({entry["node_id"] for entry in totals.replicas.values()}),
        },
        "model": {"uri": model.uri, "revision": model.revision, "type": model.model_type},
        "prompt_sha256": prompt_sha256,
        "spec_sha256": spec_hash(spec),
        "plan": plan.__dict__,
        "output": {"path": spec.output.path, "run_dir": run_dir(spec.output.path, run_id)},
    }


def aborted_summary(spec: JobSpec, run_id: str, reason: str, started: float) -> dict:
    """What a run that stopped early can say: why, and when (so `tessera report` finds it as
    the latest run). Its committed files stay; the next run resumes from them."""
    return {
        "job": spec.name,
        "run_id": run_id,
        "aborted": reason,
        "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "wall_s": round(time.time() - started, 3),
        "output": {"path": spec.output.path, "run_dir": run_dir(spec.output.path, run_id)},
    }


def spec_hash(spec: JobSpec) -> str:
    return hashlib.sha256(spec.model_dump_json().encode()).hexdigest()


def run_record_uri(output_path: str, run_id: str, name: str) -> str:
    return storage.join(output_path, "_runs", run_id, name)


def summary_uri(output_path: str, run_id: str) -> str:
    return run_record_uri(output_path, run_id, "summary.json")


def write_run_record(spec: JobSpec, run_id: str, name: str, data: dict) -> None:
    storage.write_bytes(run_record_uri(spec.output.path, run_id, name), json.dumps(data, indent=2).encode(), spec.storage)
