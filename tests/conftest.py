"""Shared fixtures: a local Ray cluster, the tiny model, a sample corpus, spec builders.

Tests start the real components themselves and stop exactly what they started. A test that
needs a cluster of its own shape (several nodes, fake GPUs) calls `ray.shutdown()` first; the
`ray_local` fixture starts the shared one again for the next test that wants it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from local_ray import shared_cluster

REPO = Path(__file__).resolve().parent.parent
# The tiny model is built once into the repository's cache and reused across runs.
os.environ.setdefault("TESSERA_CACHE_DIR", str(REPO / ".cache" / "tessera-test"))
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests run many short jobs on each cluster. Ray keeps as many idle workers as the node has
# CPUs and stops the rest after a second idle, so each job started its commit and verify
# workers again (each importing pyarrow, s3fs, transformers: seconds of CPU on two cores).
os.environ.setdefault("RAY_num_workers_soft_limit", "6")


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    from actors.tiny import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture
def ray_local():
    """The shared local Ray cluster (2 CPUs; started if none is running; kept for later tests)."""
    yield shared_cluster()


def pytest_sessionfinish(session, exitstatus):
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:
        pass


@pytest.fixture(scope="session")
def sample_corpus(tmp_path_factory) -> Path:
    """A small corpus (8 images of several formats, 2 videos, a PDF, broken items); the manifest path."""
    from jobs.sample import write_sample_corpus

    return write_sample_corpus(tmp_path_factory.mktemp("corpus"), n_images=8, n_videos=2)


@pytest.fixture
def make_spec(tmp_path):
    """make_spec(manifest, **sections) -> a validated JobSpec writing under tmp_path.
    Sections merge into the defaults, except `task`, which replaces the default task."""
    from schemas.spec import parse_spec

    def build(manifest, name: str = "test-job", **sections):
        data = {
            "name": name,
            "input": {"manifest": str(manifest)},
            "output": {"path": str(tmp_path / "out")},
            "model": {"path": "builtin:tiny"},
            "task": {"preset": "moderation"},
        }
        for key, value in sections.items():
            if key != "task" and isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        return parse_spec(data).resolved()

    return build
