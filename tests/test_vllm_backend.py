"""The vLLM backend. Its CPU-side parts run everywhere: the plan (a STRICT_PACK placement
group per tensor-parallel replica), the engine and sampling arguments, what the CPU stage
sends (prompt text + downscaled uint8 images), and the clear error where vLLM is missing.
The engine itself runs only where vLLM is importable (a CUDA image, or vLLM's CPU build):
there, schema-constrained generation must give valid JSON for every row; elsewhere those
tests are reported as skipped."""

from __future__ import annotations

import importlib.util
import json
import time

import numpy as np
import pytest
from PIL import Image
from local_ray import init_ray

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed here (optional extra: tessera[vllm])")


def _spec(**model):
    from schemas.spec import parse_spec

    return parse_spec(
        {"name": "v", "input": {"manifest": "m.jsonl"}, "output": {"path": "out"}, "task": {"preset": "moderation"},
         "model": {"backend": "vllm", **model}}
    )


def test_tensor_parallel_replica_gets_a_placement_group():
    from pipeline.graph import Plan, replica_placement_bundles, replica_resources

    plan = Plan(replicas=(2, 2), gpus_per_replica=4, cpus_per_replica=1.0, cpu_concurrency=4, rows_per_file=10,
                shuffle_partitions=2, placement="placement_group")
    args = replica_resources(plan, "H100")
    assert args["num_gpus"] == 0 and callable(args["ray_remote_args_fn"])
    bundles = replica_placement_bundles(4, 1.0, "H100")
    assert [b["GPU"] for b in bundles] == [1.0] * 4 and bundles[0]["CPU"] == 1.0
    assert all(b["accelerator_type:H100"] == 0.001 for b in bundles)
    # one actor on one GPU (or a share of one) holds it itself
    single = Plan(replicas=(1, 4), gpus_per_replica=0.5, cpus_per_replica=1.0, cpu_concurrency=4, rows_per_file=10,
                  shuffle_partitions=2)
    assert replica_resources(single, None) == {"num_gpus": 0.5}
    assert replica_resources(single, "A100") == {"num_gpus": 0.5, "accelerator_type": "A100"}


def test_engine_arguments():
    from actors.loading import ResolvedModel
    from actors.vllm_backend import engine_arguments, sampling_arguments

    resolved = ResolvedModel(uri="s3://m/x", path="/cache/x", revision="r", model_type="llava_next", trust_remote_code=True)
    args = engine_arguments(resolved, _spec(gpus_per_replica=8, quantization="int4", engine_kwargs={"max_model_len": 8192}).model, "/cache/x")
    assert args["tensor_parallel_size"] == 8 and args["distributed_executor_backend"] == "ray"
    assert args["trust_remote_code"] and args["quantization"] == "bitsandbytes" and args["max_model_len"] == 8192
    small = engine_arguments(resolved, _spec(gpus_per_replica=0.5).model, "/cache/x")
    assert small["tensor_parallel_size"] == 1 and small["distributed_executor_backend"] == "uni"
    assert small["gpu_memory_utilization"] == 0.45
    with pytest.raises(ValueError, match="pre-quantised"):
        engine_arguments(resolved, _spec(quantization="int8").model, "/cache/x")
    from schemas.spec import SamplingSpec

    assert sampling_arguments(SamplingSpec(), 64, None) == {"max_tokens": 64, "skip_special_tokens": True, "temperature": 0.0}


def test_cpu_stage_sends_text_and_downscaled_uint8_images(tiny_model_path):
    from actors.adapters import adapter_for
    from actors.inputs import ModelInputs
    from actors.loading import load_processor
    from pipeline.prepare import build_chat_text

    processor = load_processor(str(tiny_model_path))
    adapter = adapter_for("llava_next")
    big = Image.new("RGB", (1600, 900), (200, 10, 10))
    text = build_chat_text(processor, "Describe.", 1)
    inputs = ModelInputs.from_bytes(adapter.prepare_for_engine(processor, [big], text).to_bytes())
    assert inputs.text == text and inputs.pixels is None
    (image,) = inputs.images
    assert image.dtype == np.uint8 and image.shape[2] == 3
    height, width = image.shape[:2]
    assert height * width <= adapter.max_pixels(processor) and abs(width / height - 16 / 9) < 0.02


def test_missing_vllm_is_a_clear_error(tiny_model_path, monkeypatch):
    if HAS_VLLM:
        pytest.skip("vLLM is installed here")
    from actors.backends import make_backend
    from actors.loading import resolve_model

    spec = _spec(path=str(tiny_model_path)).model
    with pytest.raises(ImportError, match=r"tessera\[vllm\]"):
        make_backend(resolve_model(spec), spec)


@needs_vllm
def test_structured_output_constraint_applies(tiny_model_path):
    """With a random-weight model, unconstrained text is noise; with the task's schema every
    row is JSON that validates."""
    from actors.adapters import adapter_for
    from actors.backends import make_backend
    from actors.constrained import parse_output
    from actors.loading import load_processor, resolve_model
    from pipeline.prepare import build_chat_text
    from schemas.spec import TaskSpec
    from schemas.tasks import resolve_task

    spec = _spec(path=str(tiny_model_path), gpus_per_replica=1, engine_kwargs={"max_model_len": 4096, "enforce_eager": True}).model
    task = resolve_task(TaskSpec(preset="moderation", sampling={"max_new_tokens": 256}))
    backend = make_backend(resolve_model(spec), spec)
    processor = load_processor(str(tiny_model_path))
    rng = np.random.RandomState(0)
    items = [
        adapter_for("llava_next").prepare_for_engine(
            processor, [Image.fromarray(rng.randint(0, 255, (120, 160, 3), dtype=np.uint8))], build_chat_text(processor, task.prompt_template, 1)
        )
        for _ in range(4)
    ]
    constrained = backend.generate(items, task.sampling, 256, task.json_schema)
    for generation in constrained:
        parsed = parse_output(generation.text, task)
        assert json.loads(parsed.output_json)["verdict"] in {"allow", "review", "block"}
    free = backend.generate(items, task.sampling, 32, None)
    assert not all(_is_json(g.text) for g in free)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


@pytest.mark.slow
def test_placement_group_per_replica_holds_its_tensor_parallel_workers():
    """What vLLM's Ray executor relies on, with Ray Data and fake GPUs: each replica Ray Data
    starts gets its own STRICT_PACK group (via ray_remote_args_fn), and tasks the actor starts
    (vLLM's workers, here stand-ins asking for one GPU each) land in that group's bundles."""
    import ray
    import ray.data

    from pipeline.graph import Plan, replica_resources

    ray.shutdown()
    init_ray(address="local", num_cpus=4, num_gpus=4, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        plan = Plan(replicas=(2, 2), gpus_per_replica=2, cpus_per_replica=1.0, cpu_concurrency=1, rows_per_file=1,
                    shuffle_partitions=2, placement="placement_group")

        class Replica:
            def __init__(self):
                @ray.remote(num_gpus=1, num_cpus=0)
                def worker():
                    return ray.get_runtime_context().get_node_id(), ray.get_gpu_ids()

                group = ray.util.get_current_placement_group()
                self.group = group.id.hex() if group else None
                self.workers = ray.get([worker.remote() for _ in range(2)])
                self.actor = ray.get_runtime_context().get_actor_id()

            def __call__(self, batch):
                time.sleep(0.5)  # stands in for generation: a busy replica leaves the next block to the other
                gpus = sorted(str(g) for _, ids in self.workers for g in ids)
                return {"actor": [self.actor] * len(batch["id"]), "group": [self.group] * len(batch["id"]),
                        "gpus": [",".join(gpus)] * len(batch["id"])}

        context = ray.data.DataContext.get_current()
        waited, context.wait_for_min_actors_s = context.wait_for_min_actors_s, 120
        try:
            rows = ray.data.range(16, override_num_blocks=8).map_batches(
                Replica, batch_size=1, compute=ray.data.ActorPoolStrategy(size=2), num_cpus=1,
                **replica_resources(plan, None),
            ).take_all()
        finally:
            context.wait_for_min_actors_s = waited
    finally:
        ray.shutdown()
    replicas = {row["actor"]: (row["group"], row["gpus"]) for row in rows}
    groups = {group for group, _ in replicas.values()}
    assert None not in groups and len(groups) == len(replicas)  # a group per replica
    # Both replicas start before any work (wait_for_min_actors_s) and 16 one-row batches of
    # half a second each spread over the least-loaded actors: each replica takes some.
    assert len(replicas) == 2
    held = [set(gpus.split(",")) for _, gpus in replicas.values()]
    assert all(len(gpus) == 2 for gpus in held)  # two workers, two GPUs, inside the group
    assert held[0].isdisjoint(held[1])
