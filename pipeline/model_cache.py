"""Model checkpoints in object storage (`model.path: s3://bucket/models/x/`, or any fsspec
URI): resolved once on the driver, downloaded once per node.

- **Revision.** The driver lists the checkpoint's objects; the revision is a hash of their
  names, sizes and versions (ETags where the store has them), so a re-uploaded file is a new
  revision. It keys the local cache and is written into every result row (`model_revision`,
  unless `model.revision` names one), and resume compares it.
- **Once per node.** Every process that needs the files (the model actors, the CPU workers
  that only need the processor's files) calls the same `RemoteCheckpoint`; the first takes a
  file lock next to the cache folder, downloads into a temporary folder beside it, checks
  sizes and that the listing has not changed, and renames the folder into place (atomic on
  one filesystem). The others wait on the lock, then find the folder. A killed download
  leaves only a temporary folder, never a half checkpoint under the final name.
- **Weights only where needed.** CPU workers ask for the checkpoint without its weight
  files (config, tokenizer, processor, template): a separate, small cache folder.

The split keeps imports one way: actors/loading.py knows only that `ResolvedModel.fetch`
is a callable returning a local folder; this module (pipeline/, which does all storage I/O)
provides it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from actors.loading import ResolvedModel, resolve_model
from actors.tiny import cache_root
from pipeline import storage
from schemas.spec import ModelSpec, StorageSpec

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5", ".onnx")


def resolve(spec: ModelSpec, storage_spec: StorageSpec) -> ResolvedModel:
    """The model a job uses, resolved on the driver: built-in, local directory, or remote."""
    if not storage.is_remote(spec.path) or spec.path.startswith("builtin:"):
        return resolve_model(spec)
    uri = spec.path.rstrip("/")
    objects = storage.list_objects(uri, storage_spec)
    if "config.json" not in objects:
        raise FileNotFoundError(f"model.path {storage.display_uri(spec.path)}: no config.json there (expected a checkpoint directory)")
    checkpoint = RemoteCheckpoint(
        uri=uri,
        revision=checkpoint_revision(objects),
        storage=storage_spec,
        files=tuple(sorted((name, meta["size"]) for name, meta in objects.items())),
    )
    config = json.loads(storage.read_bytes(storage.join(uri, "config.json"), storage_spec))
    return ResolvedModel(
        uri=spec.path,
        path=str(checkpoint.folder(weights=True)),
        revision=spec.revision or checkpoint.revision,
        model_type=config.get("model_type", "unknown"),
        trust_remote_code=spec.trust_remote_code,
        fetch=checkpoint,
    )


def checkpoint_revision(objects: dict[str, dict]) -> str:
    digest = hashlib.sha256()
    for name in sorted(objects):
        digest.update(f"{name}\t{objects[name]['size']}\t{objects[name]['version'] or ''}\n".encode())
    return digest.hexdigest()[:16]


def is_weights(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES)


@dataclass(frozen=True)
class RemoteCheckpoint:
    """A checkpoint folder in object storage at one revision; calling it returns a local
    copy on this node (downloading it first if this node has none)."""

    uri: str
    revision: str
    storage: StorageSpec
    files: tuple[tuple[str, int], ...]  # (path relative to uri, size) as the driver listed them

    def folder(self, weights: bool = True) -> Path:
        key = hashlib.sha256(self.uri.encode()).hexdigest()[:12]
        name = f"{key}-{self.revision}" + ("" if weights else "-processor")
        return cache_root() / "models" / "remote" / name

    def __call__(self, weights: bool = True) -> str:
        full = self.folder(weights=True)
        if full.is_dir():
            return str(full)
        target = full if weights else self.folder(weights=False)
        if target.is_dir():
            return str(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(target.parent / f".{target.name}.lock"):
            if not target.is_dir():  # another process finished it while we waited
                self._download(target, weights)
        return str(target)

    def _download(self, target: Path, weights: bool) -> None:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.download-", dir=target.parent))
        try:
            for name, size in self.files:
                if not weights and is_weights(name):
                    continue
                local = staging / name
                storage.download(storage.join(self.uri, name), str(local), self.storage)
                if local.stat().st_size != size:
                    raise RuntimeError(f"{storage.display_uri(self.uri)}/{name} changed while it was downloaded")
            now = checkpoint_revision(storage.list_objects(self.uri, self.storage))
            if now != self.revision:
                raise RuntimeError(
                    f"the checkpoint at {storage.display_uri(self.uri)} changed during the run "
                    f"(revision {self.revision} when the job started, {now} now); rerun the job"
                )
            os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock between processes on this node (flock: released if the holder dies)."""
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
