"""Run jobs on a Ray cluster through its Job Submission API, and follow them there.

`tessera submit SPEC.yaml --address http://HEAD:8265` packs a small working dir — our four
packages and the resolved spec as `tessera-job.yaml` — into the job's runtime env, and the
cluster runs `python -m jobs.cli run tessera-job.yaml --run-id …` as the job's driver. The
cluster's image provides the dependencies (infra/Dockerfile); the code comes with the job, so
what runs is what was submitted. Each job carries `tessera.*` metadata (job name, run id,
tick, output path), which is how `tessera list` and the scheduler recognise our jobs.

Credentials never travel in the spec or in the runtime env's variables (Ray's dashboard shows
both): a spec that carries one is refused, and variables the user names with `--forward-env`
go through jobs/forward_env.py instead.

Deliberately light on imports (no torch, no Ray Data): these commands only talk HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import re
import secrets
import shlex
import shutil
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlparse

import requests
import structlog
import yaml

from jobs import forward_env
from jobs.ticks import render_for_tick, tick_iso, tick_stamp
from schemas.spec import JobSpec

log = structlog.get_logger("tessera")

PACKAGES = ("schemas", "pipeline", "actors", "jobs")
SPEC_FILE = "tessera-job.yaml"
SCHEMA_FILE = "tessera-output-schema.json"
ACTIVE = frozenset({"PENDING", "RUNNING"})
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
META_JOB, META_RUN_ID, META_TICK, META_OUTPUT = "tessera.job", "tessera.run_id", "tessera.tick", "tessera.output"
# Key parts that name a credential (`aws_secret_access_key`, `token`, `key`…); whole parts
# only, so `max_batch_tokens` or `id_column` are not mistaken for one.
_CREDENTIAL_PARTS = {"secret", "password", "passwd", "token", "credential", "credentials", "key"}
_URL_USERINFO = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/@\s]+:[^/@\s]+@")


class SubmitError(RuntimeError):
    """Talking to the cluster failed, or what was asked cannot be done. Says what to do."""


class BadRequest(SubmitError):
    """What was asked is wrong (no address, credentials in the spec, an unknown id): fix the input."""


class AlreadySubmitted(BadRequest):
    """A job with this submission id exists on the cluster already."""


class ClusterUnreachable(SubmitError):
    """The cluster did not answer (the head is down or restarting, a network blip): try again later."""


@dataclass(frozen=True)
class Submission:
    submission_id: str
    run_id: str
    tick: datetime | None = None


# --- the cluster ---------------------------------------------------------------------------


def resolve_address(address: str | None) -> str:
    """--address, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS (Ray's own order)."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise BadRequest(
            "no cluster address: pass --address http://HEAD:8265 (the head's dashboard) or set RAY_ADDRESS"
        )
    return address.rstrip("/")


def connect(address: str | None):
    """A JobSubmissionClient for the cluster at `address`, or a SubmitError that says why not."""
    from ray.job_submission import JobSubmissionClient

    address = resolve_address(address)
    try:
        with _explicit_address():
            return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise SubmitError(
            f"cannot reach the Ray Job Submission API at {address}: {exc}\n"
            "Is the head running, and is this its dashboard address (http://HEAD:8265)? "
            "If the cluster uses token authentication, set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN."
        ) from None


@contextlib.contextmanager
def _explicit_address():
    """Ray lets RAY_ADDRESS override the address a client is given (it is set inside every Ray
    job, for one); the address we resolved already honours it, so hide it while connecting."""
    saved = {name: os.environ.pop(name) for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@contextlib.contextmanager
def cluster_call(what: str):
    """Around every call that goes over HTTP to the cluster: Ray's client lets requests'
    exceptions through as they are, and a scheduler must see them as one error it can retry."""
    try:
        yield
    except (requests.RequestException, ConnectionError) as exc:
        raise ClusterUnreachable(f"cannot reach the cluster to {what}: {exc}") from None


def is_loopback(address: str) -> bool:
    host = urlparse(address if "://" in address else f"http://{address}").hostname or ""
    return host in ("localhost", "127.0.0.1", "::1")


# --- what a submission carries ------------------------------------------------------------


def new_run_id() -> str:
    # The shape of pipeline.run.new_run_id, not imported from there: that module pulls in
    # torch and Ray Data, seconds of start-up for a command that only talks HTTP.
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def scheduled_submission_id(job_name: str, tick: datetime) -> str:
    """Deterministic: the same job and tick always give the same id, so Ray itself refuses a
    second submission of a tick (a restarted scheduler, or two schedulers at once)."""
    return f"{job_name}-{tick_stamp(tick)}"


def credential_paths(spec: JobSpec) -> list[str]:
    """Spec keys that look like credentials, and URLs with a user:password part."""
    found: list[str] = []

    def walk(node, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                where = f"{path}.{key}" if path else str(key)
                parts = set(re.split(r"[_.\-]", str(key).lower()))
                if parts & _CREDENTIAL_PARTS and value not in (None, "", {}, []):
                    found.append(where)
                else:
                    walk(value, where)
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{path}[{index}]")
        elif isinstance(node, str) and _URL_USERINFO.match(node):
            found.append(path)

    walk(spec.model_dump(mode="json"), "")
    return found


def check_no_credentials(spec: JobSpec) -> None:
    if paths := credential_paths(spec):
        raise BadRequest(
            f"the spec carries what looks like credentials ({', '.join(paths)}); Ray's dashboard shows "
            "every submitted spec, so they must not travel in it. Remove them and let the cluster use "
            "its own credentials (instance role, Kubernetes secret), or forward a variable with "
            "--forward-env NAME."
        )


def local_paths(spec: JobSpec) -> list[str]:
    manifests = spec.input.manifest if isinstance(spec.input.manifest, list) else [spec.input.manifest]
    return [p for p in [*manifests, spec.output.path] if "://" not in p and not p.startswith("builtin:")]


def spec_for_cluster(spec: JobSpec, tick: datetime | None) -> JobSpec:
    """The spec as the cluster runs it: rendered for its tick, on the cluster it runs on."""
    # A rendered relative path resolves here, as the spec's other paths did when it was loaded.
    shipped = render_for_tick(spec, tick).resolved() if tick else spec.model_copy(deep=True)
    shipped.ray.address = None  # the job's driver joins its own cluster (Ray sets RAY_ADDRESS)
    return shipped


def job_metadata(spec: JobSpec, run_id: str, tick: datetime | None) -> dict[str, str]:
    meta = {META_JOB: spec.name, META_RUN_ID: run_id, META_OUTPUT: spec.output.path}
    if tick is not None:
        meta[META_TICK] = tick_iso(tick)
    return meta


def entrypoint_for(run_id: str, tick: datetime | None, env_file: bool) -> str:
    command = ["python", "-m", "jobs.cli", "run", SPEC_FILE, "--run-id", run_id]
    if tick is not None:
        command += ["--tick", tick_iso(tick)]
    if env_file:
        command += ["--env-file", forward_env.ENV_FILE]
    return shlex.join(command)


def build_working_dir(directory: Path, spec: JobSpec, *, ship_code: bool, forwarded: dict[str, str]) -> None:
    """The job's working dir: the spec, a custom output schema, our packages (unless the image's
    are to be used), and the forwarded variables (only when asked for)."""
    spec = ship_output_schema(directory, spec)
    (directory / SPEC_FILE).write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    if ship_code:
        for package in PACKAGES:
            source = Path(__import__(package).__file__).parent
            shutil.copytree(source, directory / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if forwarded:
        forward_env.write_env_file(directory, forwarded)


def ship_output_schema(directory: Path, spec: JobSpec) -> JobSpec:
    """A custom `task.output_schema` lives beside the spec, not on the cluster: copy it into the
    working dir, where the job's driver runs and the schema loader looks (schemas/tasks.py).
    A JSON Schema file goes as SCHEMA_FILE; a `module:Model` as the module's source, unless it
    comes from an installed package (the cluster's image provides those)."""
    ref = spec.task.output_schema
    if not ref:
        return spec
    if ref.endswith(".json") or Path(ref).is_file():
        shutil.copyfile(ref, directory / SCHEMA_FILE)
        spec = spec.model_copy(deep=True)
        spec.task.output_schema = SCHEMA_FILE
        return spec
    source = _module_source(ref.partition(":")[0])
    if source is not None:
        copy = shutil.copytree if source.is_dir() else shutil.copyfile
        copy(source, directory / source.name)
    return spec


def _module_source(module_name: str) -> Path | None:
    """The file (or top-level package folder) of a user's schema module, already imported when
    the spec was loaded (jobs.cli resolves the task); None for an installed package."""
    top = module_name.partition(".")[0]
    if top in PACKAGES:  # ours: shipped with the code, or in the cluster's image
        return None
    module = sys.modules.get(top)
    origin = getattr(module, "__file__", None) if module else getattr(importlib.util.find_spec(top), "origin", None)
    if origin is None:
        return None
    path = Path(origin).resolve()
    source = path.parent if path.name == "__init__.py" else path
    installed = {Path(p).resolve() for p in (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"])}
    return None if any(source.is_relative_to(root) for root in installed) else source


def runtime_env_for(directory: Path, *, forwarded: bool) -> dict:
    """No `env_vars` here on purpose: the dashboard shows them (see jobs/forward_env.py)."""
    runtime_env: dict = {"working_dir": str(directory)}
    if forwarded:
        runtime_env["worker_process_setup_hook"] = forward_env.SETUP_HOOK
    return runtime_env


def submit_spec(
    client,
    spec: JobSpec,
    *,
    run_id: str | None = None,
    submission_id: str | None = None,
    tick: datetime | None = None,
    forward: tuple[str, ...] = (),
    ship_code: bool = True,
    entrypoint_num_cpus: float | None = None,
) -> Submission:
    """Submit `spec` (already loaded and resolved) to the cluster behind `client`."""
    check_no_credentials(spec)
    forwarded = forward_env.collect(forward)
    run_id = run_id or new_run_id()
    submission_id = submission_id or f"{spec.name}-{run_id}"
    shipped = spec_for_cluster(spec, tick)
    address = client.get_address()
    if not is_loopback(address) and (paths := local_paths(shipped)):
        log.warning("local_paths", paths=paths, hint="every node of the cluster must see these paths; use s3:// on a real cluster")
    with tempfile.TemporaryDirectory(prefix="tessera-submit-") as staging:
        build_working_dir(Path(staging), shipped, ship_code=ship_code, forwarded=forwarded)
        submit_job(
            client,
            entrypoint=entrypoint_for(run_id, tick, env_file=bool(forwarded)),
            submission_id=submission_id,
            runtime_env=runtime_env_for(Path(staging), forwarded=bool(forwarded)),
            metadata=job_metadata(shipped, run_id, tick),
            entrypoint_num_cpus=entrypoint_num_cpus,
        )
    log.info(
        "job_submitted", submission_id=submission_id, run_id=run_id, tick=tick_iso(tick) if tick else None,
        address=address, forwarded_env=sorted(forwarded) or None, manifest=shipped.input.manifest,
    )
    return Submission(submission_id, run_id, tick)


def submit_job(client, *, submission_id: str, **kwargs) -> None:
    """`client.submit_job`, with Ray's refusal of a taken submission id as AlreadySubmitted."""
    with cluster_call(f"submit {submission_id}"):
        try:
            client.submit_job(submission_id=submission_id, **kwargs)
        except RuntimeError as exc:
            if "already exists" in str(exc):
                raise AlreadySubmitted(f"a job with submission id {submission_id} exists already") from None
            raise SubmitError(f"the cluster refused the job: {exc}") from None


# --- following jobs ------------------------------------------------------------------------


def find_job(client, submission_id: str):
    """The job's details, or None if the cluster has no job with this id."""
    with cluster_call(f"ask about {submission_id}"):
        try:
            return client.get_job_info(submission_id)
        except RuntimeError as exc:
            if "does not exist" in str(exc):
                return None
            raise SubmitError(f"cannot ask the cluster about {submission_id}: {exc}") from None


def job_info(client, submission_id: str):
    if (info := find_job(client, submission_id)) is None:
        raise BadRequest(f"no job {submission_id!r} on this cluster (`tessera list` shows its jobs)")
    return info


def status_of(client, submission_id: str) -> str:
    return str(job_info(client, submission_id).status.value)


def wait_until_done(client, submission_id: str, poll_s: float = 2.0, timeout_s: float | None = None) -> str:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED; its final status."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while (status := status_of(client, submission_id)) not in TERMINAL:
        if deadline is not None and time.monotonic() > deadline:
            raise SubmitError(f"job {submission_id} is still {status} after {timeout_s:.0f} s")
        time.sleep(poll_s)
    return status


def job_logs(client, submission_id: str) -> str:
    job_info(client, submission_id)  # a clear error for an unknown id
    with cluster_call(f"read the logs of {submission_id}"):
        return client.get_job_logs(submission_id)


def follow_logs(client, submission_id: str, write) -> None:
    """Stream the job's logs to `write` until the job ends (Ray closes the stream then)."""
    job_info(client, submission_id)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            write(chunk)

    asyncio.run(tail())


def stop_job(client, submission_id: str) -> bool:
    """True if the job was running and is being stopped, False if it had ended already."""
    job_info(client, submission_id)
    with cluster_call(f"stop {submission_id}"):
        try:
            return bool(client.stop_job(submission_id))
        except RuntimeError as exc:
            raise SubmitError(f"the cluster did not stop {submission_id}: {exc}") from None


def tessera_jobs(client, job_name: str | None = None, include_all: bool = False) -> list:
    """Submitted jobs, oldest first: ours (with tessera metadata) unless `include_all`."""
    with cluster_call("list its jobs"):
        try:
            listed = client.list_jobs()
        except RuntimeError as exc:  # an answer other than 200 (a head still starting, a proxy's 502)
            raise SubmitError(f"cannot list the cluster's jobs: {exc}") from None
    jobs = [j for j in listed if j.submission_id]
    if not include_all:
        jobs = [j for j in jobs if (j.metadata or {}).get(META_JOB)]
    if job_name:
        jobs = [j for j in jobs if (j.metadata or {}).get(META_JOB) == job_name]
    return sorted(jobs, key=lambda j: (j.start_time or 0, j.submission_id))


def _time(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if ms else "-"


def describe(info) -> dict:
    """What `tessera status` shows about one job, as plain data."""
    meta = info.metadata or {}
    described = {
        "submission_id": info.submission_id,
        "status": str(info.status.value),
        "job": meta.get(META_JOB),
        "run_id": meta.get(META_RUN_ID),
        "tick": meta.get(META_TICK),
        "started": _time(info.start_time),
        "ended": _time(info.end_time),
        "message": info.message,
        "entrypoint": info.entrypoint,
    }
    if meta.get(META_OUTPUT):
        described["output"] = meta[META_OUTPUT]
        if meta.get(META_RUN_ID):
            described["summary"] = f"{meta[META_OUTPUT].rstrip('/')}/_runs/{meta[META_RUN_ID]}/summary.json"
    return described


def format_status(described: dict) -> str:
    width = max(len(key) for key in described)
    return "\n".join(f"{key + ':':<{width + 1}} {value}" for key, value in described.items() if value is not None)


def format_table(jobs) -> str:
    header = ("SUBMISSION ID", "STATUS", "JOB", "TICK", "STARTED", "ENDED")
    rows = [header]
    for info in jobs:
        meta = info.metadata or {}
        rows.append((
            info.submission_id, str(info.status.value), meta.get(META_JOB, "-"), meta.get(META_TICK, "-"),
            _time(info.start_time), _time(info.end_time),
        ))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)
