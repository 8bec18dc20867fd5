"""The job spec: one YAML file says what to read, which model and task, and where to write.

Every key and its default is documented in docs/spec.md; keep the two in step. Unknown keys
are errors that name the key (`extra="forbid"` everywhere), so a typo never silently falls
back to a default.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PRESETS = ("moderation", "document_extraction", "caption")
_REMOTE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


class SpecError(ValueError):
    """The spec (or an override) is invalid. The message says which key and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InputSpec(_Strict):
    manifest: str | list[str] = Field(
        description="Manifest path(s): a file, a directory or a glob; local, file:// or s3://. "
        "JSONL, CSV or Parquet. May use Jinja with `tick` in scheduled jobs."
    )
    format: Literal["auto", "jsonl", "csv", "parquet"] = "auto"
    id_column: str = "id"
    uri_column: str = "uri"
    keep_metadata: bool = True
    drop_columns: list[str] = Field(default_factory=list)
    allow_http: bool = False
    allow_private_http: bool = False


class OutputSpec(_Strict):
    path: str
    mode: Literal["resume", "overwrite", "error_if_exists"] = "resume"
    target_file_mb: float = Field(64.0, gt=0)
    rows_per_file: int | None = Field(None, gt=0)
    max_error_rate: float | None = Field(None, gt=0, le=1)
    error_rate_window: int = Field(1000, ge=1000)
    check_versions: bool = Field(
        True, description="On resume, re-check each committed item's ETag/size+mtime and redo it if it changed."
    )


class ModelSpec(_Strict):
    path: str = "builtin:tiny"
    backend: Literal["transformers", "vllm"] = "transformers"
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantization: Literal["int8", "int4"] | None = None
    trust_remote_code: bool = False
    gpus_per_replica: float | None = Field(
        None, ge=0, description="GPUs per model replica; unset = 1 when the cluster has GPUs, else 0 (CPU)."
    )
    replicas: int | tuple[int, int] = 1
    batch_size: int = Field(8, ge=1)
    max_batch_tokens: int = Field(32768, ge=1)
    batches_in_flight: int = Field(2, ge=1)
    accelerator_type: str | None = None
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="vLLM only: extra engine arguments, e.g. {max_model_len: 8192, gpu_memory_utilization: 0.85}.",
    )

    @field_validator("replicas")
    @classmethod
    def _replicas_range(cls, value):
        low, high = (value, value) if isinstance(value, int) else value
        if low < 1 or high < low:
            raise ValueError("replicas must be an int >= 1 or [min, max] with 1 <= min <= max")
        return value

    @field_validator("gpus_per_replica")
    @classmethod
    def _whole_gpus(cls, value):
        if value is not None and value > 1 and value != int(value):
            raise ValueError("gpus_per_replica above 1 must be a whole number of GPUs (a replica never straddles nodes)")
        return value

    @model_validator(mode="after")
    def _autoscaling_needs_a_queue(self):
        # Ray Data grows an actor pool when its queued batches per actor reach 1.75
        # (DataContext.autoscaling_config): with one batch in flight it never would.
        if not isinstance(self.replicas, int) and self.replicas[0] < self.replicas[1] and self.batches_in_flight < 2:
            raise ValueError("replicas [min, max] autoscales on queued batches: batches_in_flight must be at least 2")
        if self.engine_kwargs and self.backend != "vllm":
            raise ValueError("engine_kwargs are vLLM engine arguments: set backend: vllm, or drop them")
        return self


class SamplingSpec(_Strict):
    max_new_tokens: int = Field(1024, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    reask: bool = True
    reask_factor: float = Field(2.0, gt=1)


class TaskSpec(_Strict):
    preset: Literal["moderation", "document_extraction", "caption"] | None = None
    prompt: str | None = None
    system_prompt: str | None = None
    output_schema: str | None = None
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)

    @model_validator(mode="after")
    def _preset_or_prompt(self):
        if self.preset is None and self.prompt is None:
            raise ValueError("give task.preset (one of " + ", ".join(PRESETS) + ") or task.prompt")
        if self.preset is not None and self.output_schema is not None:
            raise ValueError("task.output_schema is fixed by task.preset; drop one of them")
        return self


class ImageSpec(_Strict):
    max_pixels: int | None = Field(None, ge=1)
    hard_max_pixels: int = Field(100_000_000, ge=1)
    gif_mode: Literal["first", "frames"] = "first"


class VideoSpec(_Strict):
    fps: float = Field(1.0, gt=0)
    max_seconds: float = Field(60.0, gt=0)
    max_frames: int = Field(60, ge=1)
    long_policy: Literal["uniform", "truncate"] = "uniform"
    hard_max_seconds: float = Field(4 * 3600.0, gt=0)
    threads: int = Field(2, ge=0, description="Decoder threads per video (0: as many as libav wants).")


class PdfSpec(_Strict):
    dpi: int = Field(150, ge=18, le=600)
    max_pages: int = Field(20, ge=1)
    mode: Literal["document", "page"] = "document"


class MediaSpec(_Strict):
    max_bytes: int = Field(64 * 1024 * 1024, ge=1)
    fetch_timeout_s: float = Field(30.0, gt=0)
    fetch_retries: int = Field(5, ge=0)
    decode_timeout_s: float = Field(60.0, gt=0)
    isolation: Literal["process", "none"] = Field(
        "process",
        description="process: native decoders run in a child process per CPU worker, so a file that crashes "
        "or hangs them becomes one error row (decode.crashed / decode.timeout); none: in the worker itself.",
    )
    image: ImageSpec = Field(default_factory=ImageSpec)
    video: VideoSpec = Field(default_factory=VideoSpec)
    pdf: PdfSpec = Field(default_factory=PdfSpec)


# Option names that hold credentials: those come from the environment, a profile or a role,
# never from a spec (specs are printed, hashed, logged and committed to git).
_CREDENTIAL_KEY = re.compile(
    r"^(key|secret|token|password|username)$|secret|passw|token|credential|account_key|sas|connection_string",
    re.IGNORECASE,
)


class StorageSpec(_Strict):
    """How to reach object storage. See docs/storage.md."""

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / AWS).")
    region: str | None = None
    profile: str | None = Field(None, description="A profile of ~/.aws/config (else AWS_PROFILE, else the default chain).")
    anonymous: bool = False
    requester_pays: bool = False
    client_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra botocore client kwargs (s3).")
    options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Extra fsspec options per protocol, e.g. {gs: {project: p}, az: {account_name: a}}."
    )
    retries: int = Field(8, ge=0, description="Retries of manifest and result I/O on throttling, 5xx and broken connections.")

    @field_validator("client_kwargs", "options")
    @classmethod
    def _no_credentials(cls, value: dict) -> dict:
        def walk(node: Any, where: str) -> None:
            if isinstance(node, dict):
                for key, child in node.items():
                    if _CREDENTIAL_KEY.search(str(key)):
                        raise ValueError(
                            f"{where}{key} looks like a credential; credentials never go in a spec: use the "
                            "environment, a profile (storage.profile) or an instance role (docs/storage.md)"
                        )
                    walk(child, f"{where}{key}.")

        walk(value, "")
        return value


class RaySpec(_Strict):
    address: str | None = None
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local cluster (unset: all).")
    object_store_memory_mb: int | None = Field(None, ge=64)
    cpu_concurrency: int | None = Field(None, ge=1, description="Decode tasks at once (unset: sized from the cluster).")


class ScheduleSpec(_Strict):
    cron: str
    timezone: str = "UTC"
    concurrency_policy: Literal["forbid", "allow", "replace"] = "forbid"
    starting_deadline_seconds: int | None = Field(None, ge=0)


class JobSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    input: InputSpec
    output: OutputSpec
    model: ModelSpec = Field(default_factory=ModelSpec)
    task: TaskSpec
    media: MediaSpec = Field(default_factory=MediaSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    ray: RaySpec = Field(default_factory=RaySpec)
    schedule: ScheduleSpec | None = None

    def resolved(self, base_dir: str | os.PathLike | None = None) -> "JobSpec":
        """Relative local paths made absolute against `base_dir` (default: the current directory)."""
        base = Path(base_dir or os.getcwd())
        spec = self.model_copy(deep=True)
        manifests = spec.input.manifest
        if isinstance(manifests, list):
            spec.input.manifest = [_absolute(m, base) for m in manifests]
        else:
            spec.input.manifest = _absolute(manifests, base)
        spec.output.path = _absolute(spec.output.path, base)
        return spec


def _absolute(path: str, base: Path) -> str:
    if _REMOTE.match(path) or path.startswith("builtin:") or "{{" in path:
        return path
    return str((base / os.path.expanduser(path)).resolve())


def load_spec(path: str | os.PathLike, overrides: list[str] | None = None) -> JobSpec:
    """Read a YAML spec, apply `key.path=value` overrides, validate. Raises SpecError."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise SpecError(f"cannot read spec {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise SpecError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: the spec must be a mapping of keys, got {type(data).__name__}")
    for override in overrides or []:
        apply_override(data, override)
    return parse_spec(data, source=str(path))


def parse_spec(data: dict, source: str = "spec") -> JobSpec:
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(f"{source} is invalid:\n{format_validation_error(exc)}") from None


def apply_override(data: dict, override: str) -> None:
    """`model.batch_size=16` sets data['model']['batch_size'] = 16 (the value parsed as YAML)."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"--set expects key.path=value, got {override!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SpecError(f"--set {key}: {part} is not a mapping")
        node = child
    node[parts[-1]] = value


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown key (check the spelling; docs/spec.md lists every key)")
        elif err["type"] == "missing":
            lines.append(f"  {where}: required key is missing")
        else:
            lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)
