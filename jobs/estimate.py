"""`tessera run SPEC --dry-run --estimate [--gpus N]`: what the whole job needs, on paper.

Two halves, kept apart so each number says where it came from:

- measured here: the manifest is counted and ~200 rows are sampled from all of it (a
  reservoir sample, so the end of the manifest counts as much as its start); the sample goes
  through the real CPU stage (`pipeline.prepare.Preparer`: fetch, decode, tiling, prompt,
  token ids), which gives visual and text tokens per item from the model's own tiling, the
  CPU seconds of decode per item, the media and pixel bytes per item, and the error share.
- the GPU side: seconds of one model replica per item, either measured (`--rate`, items per
  second per replica from a GPU benchmark) or from a roofline with stated assumptions
  (`ROOFLINES`; docs/capacity.md explains every figure).

From the two: GPU-hours, CPU cores per GPU to keep the GPUs fed, object-store and storage
bandwidth, and wall time on N GPUs.
"""

from __future__ import annotations

import random
import statistics
from collections import Counter
from dataclasses import dataclass, field

import click

from pipeline import storage
from pipeline.manifests import iter_raw_rows, manifest_files, manifest_format, to_manifest_row
from schemas.spec import JobSpec

SAMPLE_ROWS = 200
# Counting stops here (like --dry-run); past it, pass --items with the manifest's real size.
MAX_COUNTED_ROWS = 1_000_000


@dataclass(frozen=True)
class Gpu:
    name: str
    dense_flops: float  # FLOP/s at the precision the model computes in (bf16 dense), per GPU
    hbm_bytes_per_s: float


# NVIDIA's H100 SXM datasheet: 989 TFLOP/s bf16 dense (no sparsity), 3.35 TB/s HBM3.
H100 = Gpu("H100 SXM", dense_flops=989e12, hbm_bytes_per_s=3.35e12)


@dataclass(frozen=True)
class Roofline:
    """A replica's time per item from first principles. Prefill is compute-bound (FLOPs at an
    assumed model FLOPs utilisation); decode is memory-bound (every step reads the weights,
    shared by the `decode_batch` sequences decoded together)."""

    name: str
    gpus_per_replica: int
    llm_active_params: float  # parameters each token is multiplied through
    decode_weight_bytes: float  # bytes read from HBM per decode step (MoE at batch: ~all experts)
    vision_params: float
    vision_patches_per_image: int | None  # None: one patch per visual token (anyres tiles)
    gpu: Gpu = H100
    prefill_mfu: float = 0.40  # assumption: a well-batched prefill reaches 40 % of peak
    decode_bandwidth_share: float = 0.60  # assumption: 60 % of peak HBM bandwidth in decode
    decode_batch: int = 32  # assumption: sequences decoded together per replica

    def replica_seconds(self, visual_tokens: float, text_tokens: float, output_tokens: float, images: float) -> float:
        patches = visual_tokens if self.vision_patches_per_image is None else self.vision_patches_per_image * images
        prefill_flops = 2 * self.llm_active_params * (visual_tokens + text_tokens) + 2 * self.vision_params * patches
        prefill_s = prefill_flops / (self.gpus_per_replica * self.gpu.dense_flops * self.prefill_mfu)
        step_s = self.decode_weight_bytes / (self.gpus_per_replica * self.gpu.hbm_bytes_per_s * self.decode_bandwidth_share)
        return prefill_s + output_tokens * step_s / self.decode_batch


ROOFLINES = {
    # M2S (1.8B): SigLIP encoder (~0.4B, 729 patches at 384 px), ~1.4B LLM in bf16, one H100.
    "m2s": Roofline("M2S-class 2B, bf16, 1 x H100", gpus_per_replica=1, llm_active_params=1.4e9,
                    decode_weight_bytes=1.8e9 * 2, vision_params=0.4e9, vision_patches_per_image=729),
    # MiniMax-VL-01: 303M ViT; MiniMax-Text-01 MoE, 45.9B active of 456B; int8 weights on 8 GPUs.
    # At a decode batch of 32 the routed tokens touch nearly every expert: each step reads ~all
    # 456 GB of int8 weights.
    "minimax-vl-01": Roofline("MiniMax-VL-01, int8, 8 x H100", gpus_per_replica=8, llm_active_params=45.9e9,
                              decode_weight_bytes=456e9 * 1, vision_params=0.303e9, vision_patches_per_image=None),
}  # fmt: skip


def default_roofline(model_type: str) -> str:
    return "minimax-vl-01" if "minimax" in model_type.lower() else "m2s"


@dataclass
class ManifestSample:
    rows: list[dict]  # valid ManifestRows, a uniform sample of them
    counted: int  # distinct valid ids counted
    invalid: int
    duplicates: int
    stopped_counting: bool


def sample_manifest(spec: JobSpec, size: int = SAMPLE_ROWS, seed: int = 0) -> ManifestSample:
    """Count the manifest's rows and keep a uniform reservoir sample of the valid ones."""
    rng = random.Random(seed)
    sample: list[dict] = []
    ids: set[str] = set()
    invalid = duplicates = 0
    for index, uri in enumerate(manifest_files(spec.input, spec.storage)):
        for line, raw in iter_raw_rows(uri, manifest_format(uri, spec.input.format), spec.storage):
            if len(ids) + invalid >= MAX_COUNTED_ROWS:
                return ManifestSample(sample, len(ids), invalid, duplicates, stopped_counting=True)
            row = to_manifest_row(raw, uri, line, index, spec.input)
            if row["error_code"]:
                invalid += 1
            elif row["id"] in ids:
                duplicates += 1
            else:
                ids.add(row["id"])
                _reservoir_add(sample, row, len(ids), size, rng)
    return ManifestSample(sample, len(ids), invalid, duplicates, stopped_counting=False)


def _reservoir_add(sample: list[dict], row: dict, seen: int, size: int, rng: random.Random) -> None:
    if len(sample) < size:
        sample.append(row)
    elif (slot := rng.randrange(seen)) < size:
        sample[slot] = row


@dataclass
class CpuStage:
    """Per item, as the real CPU stage produced it for the sampled rows."""

    items: int
    ok: int
    errors: Counter = field(default_factory=Counter)
    visual_tokens: float = 0.0  # means over the ok items
    text_tokens: float = 0.0
    images: float = 0.0  # images per item (video frames and PDF pages count)
    tiles: float = 0.0
    pixel_bytes: float = 0.0  # uint8 pixels that cross the object store to the model
    media_bytes: float = 0.0  # encoded bytes read from storage
    decode_s: float = 0.0  # CPU: decode + tiling + prompt, mean over every sampled item
    decode_p95_s: float = 0.0
    fetch_s: float = 0.0  # waiting on storage (not CPU)


def measure_cpu_stage(spec: JobSpec, rows: list[dict]) -> CpuStage:
    """Run the sampled rows through the real CPU stage, one at a time, in this process."""
    from actors.inputs import ModelInputs
    from pipeline.model_cache import resolve
    from pipeline.prepare import PrepareContext, Preparer
    from schemas.tasks import resolve_task

    model = resolve(spec.model, spec.storage)  # a model in object storage: its processor files only
    preparer = Preparer(PrepareContext(run_id="estimate", spec=spec, model=model, task=resolve_task(spec.task)))
    image_token = image_token_id(preparer.processor)
    errors, decode_s, fetch_s, per_ok = Counter(), [], [], []
    try:
        if rows:  # warm up: the first item also pays for starting the decoder process
            preparer.prepare_rows(dict(rows[0]))
        for row in rows:
            media_bytes = sum(_size(uri, spec) for uri in row["uris"])
            for prepared in preparer.prepare_rows(dict(row)):
                decode_s.append((prepared["decode_ms"] or 0) / 1000)
                fetch_s.append((prepared["fetch_ms"] or 0) / 1000)
                if prepared["error_code"]:
                    errors[prepared["error_code"]] += 1
                    continue
                inputs = ModelInputs.from_bytes(prepared["model_inputs"])
                visual = int((inputs.input_ids == image_token).sum())
                images = len(inputs.extras.get("image_sizes", [])) if inputs.extras else 0
                per_ok.append((visual, len(inputs.input_ids) - visual, images, inputs.n_tiles, inputs.pixel_bytes, media_bytes))
    finally:
        preparer.close()
    return _summarise(errors, decode_s, fetch_s, per_ok)


def _summarise(errors: Counter, decode_s: list[float], fetch_s: list[float], per_ok: list[tuple]) -> CpuStage:
    stage = CpuStage(items=len(decode_s), ok=len(per_ok), errors=errors)
    if decode_s:
        stage.decode_s = statistics.fmean(decode_s)
        stage.decode_p95_s = sorted(decode_s)[int(0.95 * (len(decode_s) - 1))]
        stage.fetch_s = statistics.fmean(fetch_s)
    if per_ok:
        columns = list(zip(*per_ok))
        (stage.visual_tokens, stage.text_tokens, stage.images, stage.tiles, stage.pixel_bytes, stage.media_bytes) = (
            statistics.fmean(column) for column in columns
        )
    return stage


def image_token_id(processor) -> int:
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None:
        token_id = processor.tokenizer.convert_tokens_to_ids(getattr(processor, "image_token", "<image>"))
    return int(token_id)


def _size(uri: str, spec: JobSpec) -> int:
    try:
        fs, path = storage.filesystem(uri, spec.storage)
        return int(fs.info(path).get("size") or 0)
    except OSError:
        return 0  # missing: the prepared row says why
    except ValueError:
        return 0  # http(s): only the guarded fetch may send it a request


@dataclass
class Estimate:
    job: str
    items: int
    items_source: str
    sample: CpuStage
    output_tokens: int
    output_tokens_source: str
    replica_s_per_item: float
    gpu_source: str
    gpus_per_replica: int
    gpus: int
    valid_share: float = 1.0  # manifest rows that are valid (the rest are manifest.invalid_row)

    @property
    def gpu_items(self) -> float:
        """Items that reach the model: invalid manifest rows and the sample's error share
        never get that far."""
        ok_share = self.sample.ok / self.sample.items if self.sample.items else 1.0
        return self.items * self.valid_share * ok_share

    @property
    def gpu_s_per_item(self) -> float:
        return self.replica_s_per_item * self.gpus_per_replica

    @property
    def gpu_hours(self) -> float:
        return self.gpu_items * self.gpu_s_per_item / 3600

    @property
    def replicas(self) -> int:
        return self.gpus // self.gpus_per_replica

    @property
    def items_per_s(self) -> float:
        """The whole cluster's rate when the GPUs are the bottleneck."""
        return self.replicas / self.replica_s_per_item if self.replica_s_per_item else 0.0

    @property
    def cpu_cores_per_gpu(self) -> float:
        # Every item is decoded, including those that then fail; only ok items use the GPU.
        return self.sample.decode_s * self.items / self.gpu_items / self.gpu_s_per_item if self.gpu_items else 0.0

    @property
    def wall_s(self) -> float:
        return self.gpu_items / self.items_per_s if self.items_per_s else float("inf")


def estimate(
    spec: JobSpec,
    gpus: int,
    *,
    sample_size: int = SAMPLE_ROWS,
    items: int | None = None,
    rate: float | None = None,
    roofline: str | None = None,
    output_tokens: int | None = None,
) -> Estimate:
    manifest = sample_manifest(spec, sample_size)
    stage = measure_cpu_stage(spec, manifest.rows)
    model_type = _model_type(spec)
    line = ROOFLINES[roofline or default_roofline(model_type)]
    gpus_per_replica = max(1, int(spec.model.gpus_per_replica or line.gpus_per_replica))
    if output_tokens is None:
        output_tokens, tokens_source = min(spec.task.sampling.max_new_tokens, 200), "assumed: min(max_new_tokens, 200)"
    else:
        tokens_source = "given (--output-tokens)"
    if rate:
        replica_s, gpu_source = 1.0 / rate, f"measured: {rate:g} items/s per replica (--rate)"
    else:
        replica_s = line.replica_seconds(stage.visual_tokens, stage.text_tokens, output_tokens, stage.images)
        gpu_source = f"roofline: {line.name} (assumptions in docs/capacity.md)"
    counted = manifest.counted + manifest.invalid
    if items is not None:
        items_source = "given (--items)"
    else:
        items = counted
        items_source = "counted" + (f", stopped at {MAX_COUNTED_ROWS:,}: pass --items" if manifest.stopped_counting else "")
    if gpus < gpus_per_replica:
        raise click.UsageError(f"--gpus {gpus} is fewer than the {gpus_per_replica} GPUs one replica needs")
    valid_share = manifest.counted / counted if counted else 1.0
    return Estimate(
        spec.name, items, items_source, stage, output_tokens, tokens_source, replica_s, gpu_source,
        gpus_per_replica, gpus, valid_share,
    )  # fmt: skip


def _model_type(spec: JobSpec) -> str:
    from pipeline.model_cache import resolve

    return resolve(spec.model, spec.storage).model_type


def print_estimate(est: Estimate) -> None:
    stage = est.sample
    echo = click.echo
    errors = ", ".join(f"{code} {count}" for code, count in stage.errors.most_common()) or "none"
    echo(f"estimate     {est.job}")
    echo(f"items        {est.items:,} ({est.items_source}); {est.gpu_items:,.0f} expected to reach the model")
    echo(f"sample       {stage.items} items through the real CPU stage; errors: {errors}")
    echo(f"tokens/item  {stage.visual_tokens:,.0f} visual + {stage.text_tokens:,.0f} text in "
         f"({stage.images:.2g} images, {stage.tiles:.3g} tiles); {est.output_tokens} out ({est.output_tokens_source})")
    echo(f"CPU/item     decode + tiling {_ms(stage.decode_s)} mean, {_ms(stage.decode_p95_s)} p95 (one core); "
         f"fetch wait {_ms(stage.fetch_s)}")
    echo(f"bytes/item   {_bytes(stage.media_bytes)} from storage, {_bytes(stage.pixel_bytes)} of uint8 pixels to the model")
    echo(f"GPU/item     {est.gpu_s_per_item:.3g} GPU-s ({est.replica_s_per_item:.3g} s on a replica of "
         f"{est.gpus_per_replica} GPU{'s' if est.gpus_per_replica > 1 else ''}); {est.gpu_source}")
    echo(f"GPU-hours    {_significant(est.gpu_hours)}")
    echo(f"CPU cores    {est.cpu_cores_per_gpu:.2f} per GPU to keep the GPUs fed (decode only; add headroom)")
    echo(f"wall time    {_duration(est.wall_s)} on {est.gpus} GPUs ({est.replicas} replica{'s' if est.replicas > 1 else ''}, "
         f"{est.items_per_s:,.1f} items/s)")
    echo(f"bandwidth    object store {_bytes(stage.pixel_bytes * est.items_per_s)}/s of pixels; "
         f"storage reads {_bytes(stage.media_bytes * est.items_per_s)}/s")


def _significant(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _bytes(value: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.0f} B"


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "never (no replica fits)"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
