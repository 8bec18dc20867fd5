"""Where a model comes from, and loading it: the embedded tiny model, a local checkpoint dir.

`resolve_model` runs once on the driver (it builds the tiny model before any worker needs
it, and fixes the revision that every result row records); `local_model_path` runs on each
worker and returns a directory `from_pretrained` can read.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from actors.tiny import TINY_MODEL_URI, ensure_tiny_model, tiny_model_revision
from schemas.spec import ModelSpec


@dataclass(frozen=True)
class ResolvedModel:
    uri: str  # as the spec gave it
    path: str  # a local checkpoint directory
    revision: str
    model_type: str
    trust_remote_code: bool = False


def resolve_model(spec: ModelSpec) -> ResolvedModel:
    if spec.path == TINY_MODEL_URI:
        path = ensure_tiny_model()
        revision = tiny_model_revision(path)
    else:
        path = Path(os.path.expanduser(spec.path)).resolve()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.path {spec.path}: no config.json there (expected a checkpoint directory)")
        revision = spec.revision or _local_revision(path)
    config = json.loads((Path(path) / "config.json").read_text())
    return ResolvedModel(
        uri=spec.path,
        path=str(path),
        revision=revision,
        model_type=config.get("model_type", "unknown"),
        trust_remote_code=spec.trust_remote_code,
    )


def _local_revision(path: Path) -> str:
    """Hash of the config and of each weight file's name, size and mtime (cheap, no full read)."""
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        stat = weights.stat()
        digest.update(f"{weights.name}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    return digest.hexdigest()[:12]


@functools.lru_cache(maxsize=4)
def load_processor(path: str, trust_remote_code: bool = False):
    from transformers import AutoProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # e.g. "falling back to the PIL image processor", once per worker
    return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
