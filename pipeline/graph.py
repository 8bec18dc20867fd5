"""The Ray Data graph of a job: read -> select due (dedupe + resume) -> prepare (CPU) ->
infer (actors) -> commit.

Everything streams: the driver only ever sees one small stats row per committed file.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import ray
import ray.data

from actors.loading import ResolvedModel
from actors.predictor import Predictor
from pipeline import storage
from pipeline.manifests import ManifestDatasource
from pipeline.prepare import PrepareContext, prepare_batch
from pipeline.resume import (
    COMMITTED_COLUMNS, RESULT_FILES_PER_READ_TASK, CommittedColumns, ResumePolicy, committed_to_union, decide,
    manifest_to_union,
)
from pipeline.sink import SinkContext, commit_batch
from schemas.spec import JobSpec
from schemas.tasks import Task

# Rows per CPU task: enough that Ray's per-task overhead is small, few enough to spread a
# short manifest over the CPU workers and the replicas.
PREPARE_BATCH_ROWS = 32
# Ray fuses a task stage into the next actor stage when their remote args are equal; the CPU
# stage must stay separate so decoding overlaps inference. Its own retry policy keeps them apart.
PREPARE_MAX_RETRIES = 3
# Rough size of one result row in Parquet, to turn output.target_file_mb into rows per file.
_RESULT_ROW_BYTES = 4096
# Commit tasks claim no CPU: writing a file is I/O, and a sink that waits for a CPU slot held
# by decode and the replicas lets results pile up in the object store until decoding ends
# (seen on 2 CPUs: every file of a 66 s run committed in its last 4 s). Their count is capped.
SINK_TASKS = 2


@dataclass(frozen=True)
class Plan:
    """Resources the graph asks Ray for, decided once from the spec and the cluster."""

    replicas: tuple[int, int]
    gpus_per_replica: float
    cpus_per_replica: float
    cpu_concurrency: int
    rows_per_file: int
    shuffle_partitions: int
    # "actor": the actor itself holds its GPUs (one resource request, so one node);
    # "placement_group": a STRICT_PACK group per replica whose GPU bundles vLLM's tensor-
    # parallel workers fill (the actor holds no GPU itself).
    placement: str = "actor"
    # Below 1 when ray.cpu_concurrency asks for more decode tasks than free CPUs.
    cpus_per_decode_task: float = 1.0


def make_plan(spec: JobSpec, manifest_bytes: int, resources: dict | None = None) -> Plan:
    """The plan for this cluster (`resources`: Ray's cluster resources, asked for when not given)."""
    resources = ray.cluster_resources() if resources is None else resources
    cpus = int(resources.get("CPU", 1))
    gpus = spec.model.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if resources.get("GPU", 0) > 0 else 0.0
    low, high = (spec.model.replicas,) * 2 if isinstance(spec.model.replicas, int) else spec.model.replicas
    cpus_per_replica = 1.0
    # Decode gets the CPUs the replicas (at most `high` of them) leave free: one task per CPU,
    # or more tasks sharing them when ray.cpu_concurrency asks for more.
    decode_cpus = max(1.0, cpus - high * cpus_per_replica)
    cpu_concurrency = spec.ray.cpu_concurrency or int(decode_cpus)
    rows_per_file = spec.output.rows_per_file or max(1, int(spec.output.target_file_mb * 1e6 / _RESULT_ROW_BYTES))
    return Plan(
        replicas=(low, high),
        gpus_per_replica=gpus,
        cpus_per_replica=cpus_per_replica,
        placement="placement_group" if spec.model.backend == "vllm" and gpus > 1 else "actor",
        cpu_concurrency=cpu_concurrency,
        cpus_per_decode_task=min(1.0, decode_cpus / cpu_concurrency),
        rows_per_file=rows_per_file,
        # ~64 MB of manifest per shuffle partition keeps each partition's memory bounded.
        shuffle_partitions=max(2, min(1000, max(cpus, math.ceil(manifest_bytes / 64e6)))),
    )


def build_dataset(
    spec: JobSpec,
    run_id: str,
    files: list[str],
    model: ResolvedModel,
    task: Task,
    plan: Plan,
    policy: ResumePolicy,
    committed: list[str],
    limit: int | None = None,
) -> ray.data.Dataset:
    ds = select_due(read_manifest(spec, files, limit), committed, policy, plan.shuffle_partitions, spec.storage)
    # The shuffle may hand on a few large blocks (one per partition): cut them to a CPU task's
    # worth, streaming, so decoding spreads over the CPU workers and the actor pool gets many
    # small batches to spread over its replicas (else one replica takes a whole partition).
    ds = ds.repartition(target_num_rows_per_block=PREPARE_BATCH_ROWS)
    ds = ds.map_batches(
        prepare_batch,
        fn_kwargs={"ctx": PrepareContext(run_id=run_id, spec=spec, model=model, task=task)},
        batch_size=PREPARE_BATCH_ROWS,
        batch_format="pyarrow",
        num_cpus=plan.cpus_per_decode_task,
        compute=ray.data.TaskPoolStrategy(size=plan.cpu_concurrency),
        max_retries=PREPARE_MAX_RETRIES,
    )
    low, high = plan.replicas
    ds = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"resolved": model, "model_spec": spec.model, "task": task, "run_id": run_id, "job": spec.name},
        batch_size=spec.model.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(
            min_size=low, max_size=high, max_tasks_in_flight_per_actor=spec.model.batches_in_flight
        ),
        num_cpus=plan.cpus_per_replica,
        **replica_resources(plan, spec.model.accelerator_type),
    )
    sink = SinkContext(
        run_id=run_id,
        spec=spec,
        model_uri=model.uri,
        model_revision=model.revision,
        prompt_sha256=task.prompt_sha256,
        json_schema=task.json_schema,
    )
    return ds.map_batches(
        commit_batch,
        fn_kwargs={"ctx": sink},
        batch_size=plan.rows_per_file,
        batch_format="pyarrow",
        num_cpus=0,
        compute=ray.data.TaskPoolStrategy(size=SINK_TASKS),
    )


def replica_resources(plan: Plan, accelerator_type: str | None) -> dict:
    """Ray resources of one model replica (see Plan.placement)."""
    if plan.placement == "placement_group":
        gpus = int(plan.gpus_per_replica)
        return {
            "num_gpus": 0,
            "ray_remote_args_fn": functools.partial(
                replica_placement_group, gpus, plan.cpus_per_replica, accelerator_type
            ),
        }
    args: dict = {"num_gpus": plan.gpus_per_replica}
    if accelerator_type:
        args["accelerator_type"] = accelerator_type
    return args


def replica_placement_bundles(gpus: int, cpus: float, accelerator_type: str | None) -> list[dict]:
    """One bundle per tensor-parallel worker; the first also holds the actor's CPU."""
    bundles = [{"GPU": 1.0, "CPU": cpus if index == 0 else 0.0} for index in range(gpus)]
    for bundle in bundles:
        if bundle["CPU"] == 0:
            del bundle["CPU"]
        if accelerator_type:
            bundle[f"accelerator_type:{accelerator_type}"] = 0.001
    return bundles


def replica_placement_group(gpus: int, cpus: float, accelerator_type: str | None) -> dict:
    """Called by Ray Data for each replica it starts: a fresh STRICT_PACK placement group
    (all bundles on one node), and the actor scheduled into it capturing its child tasks,
    so the engine's workers land in the same group (Ray Data LLM does the same)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = ray.util.placement_group(replica_placement_bundles(gpus, cpus, accelerator_type), strategy="STRICT_PACK")
    return {
        "scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)
    }


def read_manifest(spec: JobSpec, files: list[str], limit: int | None = None) -> ray.data.Dataset:
    # One read task per manifest file, each streaming small blocks. Left to itself Ray Data
    # aims for 200 read blocks and splits every small block further, down to one row each:
    # then every stage until the shuffle runs a task per row.
    ds = ray.data.read_datasource(ManifestDatasource(files, spec.input, spec.storage), override_num_blocks=len(files))
    return ds.limit(limit) if limit else ds


def read_results(files: list[str], storage_spec, columns: list[str]) -> ray.data.Dataset:
    """`columns` of committed result files (local or object storage) as a Ray Dataset."""
    tasks = math.ceil(len(files) / RESULT_FILES_PER_READ_TASK)
    return ray.data.read_datasource(CommittedColumns(files, columns, storage_spec), override_num_blocks=tasks)


def select_due(
    manifest: ray.data.Dataset, committed: list[str], policy: ResumePolicy, partitions: int, storage_spec
) -> ray.data.Dataset:
    """One hash-partitioned pass over manifest rows and earlier results: dedupe and resume."""
    union = manifest.map_batches(manifest_to_union, batch_format="pyarrow")
    if committed:
        earlier = read_results(committed, storage_spec, COMMITTED_COLUMNS)
        union = union.union(earlier.map_batches(committed_to_union, batch_format="pyarrow"))
    return union.groupby("id", num_partitions=partitions).map_groups(
        decide, fn_kwargs={"policy": policy}, batch_format="pyarrow"
    )


def manifest_bytes(files: list[str], spec: JobSpec) -> int:
    return sum(storage.size(uri, spec.storage) for uri in files)
