"""Model weights in object storage (pipeline/model_cache.py), against the S3-protocol server
on loopback (tests/s3server.py): the revision comes from the objects' ETags and sizes; several
processes of one node asking at once download each file once (file lock + atomic rename);
CPU workers get the checkpoint without its weights; a job with `model.path: s3://…` runs and
writes that revision into every row."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import duckdb
import pytest
from s3server import S3Server, credentials_env
from local_ray import init_ray

BUCKET = "tessera-models"


@pytest.fixture
def s3_model(tiny_model_path, tmp_path, monkeypatch):
    """The tiny model uploaded to a bucket; a fresh, empty model cache for this test."""
    for name, value in credentials_env().items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TESSERA_CACHE_DIR", str(tmp_path / "cache"))
    with S3Server() as server:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", server.endpoint_url)
        fs = server.filesystem()
        if not fs.exists(BUCKET):
            fs.mkdir(BUCKET)
        for file in sorted(Path(tiny_model_path).iterdir()):
            fs.put_file(str(file), f"{BUCKET}/tiny/{file.name}")
        yield server, f"s3://{BUCKET}/tiny"


def _resolve(uri: str):
    from pipeline import model_cache
    from schemas.spec import ModelSpec, StorageSpec

    return model_cache.resolve(ModelSpec(path=uri), StorageSpec())


def _fetch_in_child(checkpoint, weights: bool, queue) -> None:
    queue.put(checkpoint(weights=weights))


def test_revision_and_one_download_per_node(s3_model, tiny_model_path):
    server, uri = s3_model
    model = _resolve(uri)
    assert model.model_type == "llava_next" and len(model.revision) == 16
    assert _resolve(uri + "/").revision == model.revision  # stable

    server.requests.clear()
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    children = [context.Process(target=_fetch_in_child, args=(model.fetch, True, queue)) for _ in range(3)]
    for child in children:
        child.start()
    paths = {queue.get(timeout=240) for _ in children}
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0

    assert len(paths) == 1
    local = Path(paths.pop())
    assert (local / "model.safetensors").read_bytes() == (Path(tiny_model_path) / "model.safetensors").read_bytes()
    # three processes, one download of the weights
    assert server.requests.count("GET", "/tiny/model.safetensors") == 1
    leftovers = [p.name for p in local.parent.iterdir() if ".download-" in p.name]
    assert not leftovers
    # later calls (and processor-only calls) use the full copy: no request at all
    server.requests.clear()
    assert model.local_path() == model.local_path(weights=False) == str(local)
    assert server.requests.count() == 0


def test_processor_only_copy_has_no_weights(s3_model):
    server, uri = s3_model
    model = _resolve(uri)
    light = Path(model.local_path(weights=False))
    assert (light / "config.json").is_file() and (light / "tokenizer.json").is_file()
    assert not list(light.glob("*.safetensors"))
    assert server.requests.count("GET", "model.safetensors") == 0


def test_a_new_upload_is_a_new_revision(s3_model):
    server, uri = s3_model
    before = _resolve(uri).revision
    server.filesystem().pipe_file(f"{BUCKET}/tiny/generation_config.json", json.dumps({"max_length": 7}).encode())
    assert _resolve(uri).revision != before


def test_missing_checkpoint_is_a_clear_error(s3_model):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        _resolve(f"s3://{BUCKET}/nothing-here")


@pytest.mark.slow
def test_job_with_model_on_s3(s3_model, make_spec, tmp_path):
    import ray

    from pipeline.run import run_job

    server, uri = s3_model
    media = tmp_path / "media"
    media.mkdir()
    from PIL import Image

    rows = []
    for index in range(3):
        Image.new("RGB", (80 + 20 * index, 60), (30 * index, 120, 200)).save(media / f"{index}.png")
        rows.append(json.dumps({"id": f"img-{index}", "uri": str(media / f"{index}.png")}))
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(rows) + "\n")
    spec = make_spec(
        manifest, model={"path": uri}, media={"isolation": "none"},
        task={"prompt": "Describe it.", "sampling": {"max_new_tokens": 8}},  # where the model comes from is the test
    )

    ray.shutdown()  # workers inherit the environment (credentials, endpoint, cache dir) at start
    init_ray(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        summary = run_job(spec)
    finally:
        ray.shutdown()

    revision = _resolve(uri).revision
    assert summary["invariant"]["ok"] and summary["ok"] == 3
    assert summary["model"] == {"uri": uri, "revision": revision, "type": "llava_next"}
    got = duckdb.sql(f"SELECT DISTINCT model, model_revision FROM read_parquet('{spec.output.path}/**/*.parquet')").fetchall()
    assert got == [(uri, revision)]
    cached = sorted(p.name for p in (Path(os.environ["TESSERA_CACHE_DIR"]) / "models" / "remote").iterdir() if not p.name.startswith("."))
    assert len(cached) in (1, 2) and all(revision in name for name in cached)
    assert server.requests.count("GET", "/tiny/model.safetensors") == 1
