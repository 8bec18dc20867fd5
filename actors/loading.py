"""Where a model comes from, and loading it: the embedded tiny models, a local checkpoint dir.

`resolve_model` runs once on the driver (it builds the tiny model before any worker needs
it, and fixes the revision that every result row records); `ResolvedModel.local_path()`
runs on each worker and returns a directory `from_pretrained` can read on that node.

A checkpoint in object storage is the pipeline's business (actors never import pipeline/):
pipeline/model_cache.py resolves it and puts a `fetch` callable into the ResolvedModel, which
downloads it once per node into a local cache; here it is only called.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from actors.tiny import TINY_MODELS, ensure_tiny_model, tiny_model_revision
from schemas.spec import ModelSpec


@dataclass(frozen=True)
class ResolvedModel:
    uri: str  # as the spec gave it
    path: str  # a local checkpoint directory
    revision: str
    model_type: str
    trust_remote_code: bool = False
    # For a remote checkpoint: fetch(weights: bool) -> a local directory on this node.
    fetch: Callable[..., str] | None = None

    def local_path(self, weights: bool = True) -> str:
        """A checkpoint directory on this node. Without `weights`, only what a processor
        needs (config, tokenizer, templates): CPU workers never download the weights."""
        if self.fetch is not None:
            return self.fetch(weights=weights)
        if self.uri in TINY_MODELS and not (Path(self.path) / "config.json").exists():
            ensure_tiny_model(Path(self.path), self.uri)  # another node: build it here (seeded, identical)
        return self.path


def resolve_model(spec: ModelSpec) -> ResolvedModel:
    if spec.path in TINY_MODELS:
        path = ensure_tiny_model(uri=spec.path)
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
    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ImportError:
        # e.g. Qwen2VLProcessor type-checks a video processor that needs torchvision, which
        # cannot be installed beside this torch build: assemble the parts the adapters use.
        return PartsProcessor.load(path, trust_remote_code)
    return with_pil_image_processor(processor, path, trust_remote_code)


def with_pil_image_processor(processor, path: str, trust_remote_code: bool = False):
    """The processor with its image processor on the PIL backend.

    transformers picks the torchvision image-processor class whenever torchvision is
    importable (GPU images have it, vLLM needs it). CPU workers hand it PIL images, and
    pipeline/tiling.py reproduces the PIL class pixel for pixel, so the pixels (and the fast
    tiling path) must not depend on whether torchvision happens to be installed. Only the
    image processor is swapped: the video processor has no PIL backend.
    """
    current = getattr(processor, "image_processor", None)
    if current is None or getattr(current, "backend", "pil") == "pil":
        return processor
    from transformers import AutoImageProcessor

    try:
        pil = AutoImageProcessor.from_pretrained(path, backend="pil", trust_remote_code=trust_remote_code)
    except (ImportError, ValueError, OSError):
        return processor  # no PIL class for it (e.g. remote code): keep what transformers chose
    if getattr(pil, "backend", None) == "pil":
        processor.image_processor = pil
    return processor


class PartsProcessor:
    """A processor made of its tokenizer, (PIL) image processor and chat template, for a
    family whose own processor class cannot be built here. The family's adapter does the
    placeholder expansion the processor would have done."""

    def __init__(self, tokenizer, image_processor, chat_template: str | None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template or tokenizer.chat_template

    @staticmethod
    def load(path: str, trust_remote_code: bool = False) -> "PartsProcessor":
        from transformers import AutoImageProcessor, AutoTokenizer

        template_file = Path(path) / "chat_template.jinja"
        return PartsProcessor(
            AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code),
            AutoImageProcessor.from_pretrained(path, backend="pil", trust_remote_code=trust_remote_code),
            template_file.read_text() if template_file.is_file() else None,
        )

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False, **kwargs):
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, add_generation_prompt=add_generation_prompt,
            tokenize=tokenize, **kwargs,
        )
