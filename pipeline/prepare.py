"""The CPU stage: ManifestRow -> PreparedRow. Fetch the media, decode it, render the prompt,
and run the model's processor so that only token ids and uint8 pixels cross to the actor.

Runs as Ray tasks on CPU workers; the processor is loaded once per worker process. Every
failure becomes the row's error fields; rows that arrive as errors leave untouched.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import pyarrow as pa
from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment

from actors.adapters import adapter_for
from actors.loading import ResolvedModel, load_processor
from pipeline import decode, storage
from schemas.errors import ErrorCode, ItemError
from schemas.rows import PREPARED_SCHEMA
from schemas.spec import JobSpec
from schemas.tasks import Task

_JINJA = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)


@dataclass(frozen=True)
class PrepareContext:
    run_id: str
    spec: JobSpec
    model: ResolvedModel
    task: Task  # resolved once on the driver


class Preparer:
    """Holds what one worker process reuses across rows: processor, adapter, template."""

    def __init__(self, ctx: PrepareContext):
        self.spec = ctx.spec
        self.processor = load_processor(ctx.model.path, ctx.model.trust_remote_code)
        self.adapter = adapter_for(ctx.model.model_type)
        self.task = ctx.task
        self.template = _JINJA.from_string(self.task.prompt_template)
        self.fetch_policy = storage.FetchPolicy.from_spec(ctx.spec)

    def prepare_batch(self, batch: pa.Table) -> pa.Table:
        out = [self.prepare_row(row) for row in batch.to_pylist()]
        return pa.Table.from_pylist(out, schema=PREPARED_SCHEMA)

    def prepare_row(self, row: dict) -> dict:
        for name in PREPARED_SCHEMA.names:
            row.setdefault(name, None)
        if row["error_code"] is not None:
            return row
        try:
            self._prepare(row)
        except ItemError as exc:
            row["error_code"], row["error_message"] = exc.code.value, exc.message
        return row

    def _prepare(self, row: dict) -> None:
        media = self.spec.media
        images, versions, fetch_ms, decode_ms = [], [], 0.0, 0.0
        n_frames = n_pages = 0
        for uri in row["uris"]:
            started = time.perf_counter()
            fetched = storage.fetch(uri, self.spec.storage, self.fetch_policy)
            fetch_ms += (time.perf_counter() - started) * 1000
            versions.append(fetched.version or "")
            started = time.perf_counter()
            decoded = decode.decode(fetched.data, row["media_type"], media)
            if decoded.kind == "video":
                size = self.adapter.frame_size(self.processor)
                decoded.images = [frame.resize(size) for frame in decoded.images]
            decode_ms += (time.perf_counter() - started) * 1000
            images.extend(decoded.images)
            n_frames += decoded.n_frames or 0
            n_pages += decoded.n_pages or 0
            row["media_type"] = row["media_type"] or decoded.kind
        started = time.perf_counter()
        text = self.render_prompt(row, len(images))
        try:
            inputs = self.adapter.prepare(self.processor, images, "image", text)
        except Exception as exc:
            raise ItemError(ErrorCode.PREPARE_ERROR, f"the model's processor rejected the input: {exc}") from None
        decode_ms += (time.perf_counter() - started) * 1000
        row.update(
            content_version="|".join(versions) if any(versions) else None,
            model_inputs=inputs.to_bytes(),
            n_tiles=inputs.n_tiles,
            n_frames=n_frames or None,
            n_pages=n_pages or None,
            input_tokens=len(inputs.input_ids),
            pixel_bytes=inputs.pixel_bytes,
            fetch_ms=fetch_ms,
            decode_ms=decode_ms,
        )

    def render_prompt(self, row: dict, n_images: int) -> str:
        """The task's Jinja template over the row's fields, in the model's chat template."""
        fields = json.loads(row["fields_json"] or "{}")
        try:
            prompt = self.template.render(**fields, id=row["id"], uris=row["uris"], uri=row["uris"][0])
        except TemplateError as exc:
            raise ItemError(ErrorCode.PROMPT_ERROR, f"cannot render task.prompt for this row: {exc}") from None
        return build_chat_text(self.processor, prompt, n_images, self.task.system_prompt)


def build_chat_text(processor, prompt: str, n_images: int, system_prompt: str | None = None) -> str:
    """Chat messages (system?, user: images then text) through the processor's chat template."""
    messages = []
    if system_prompt:
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": prompt}]
    messages.append({"role": "user", "content": content})
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


_PREPARERS: dict[str, Preparer] = {}


def prepare_batch(batch: pa.Table, ctx: PrepareContext) -> pa.Table:
    """Entry point for `map_batches`: one Preparer per worker process and run."""
    preparer = _PREPARERS.get(ctx.run_id)
    if preparer is None:
        _PREPARERS.clear()
        preparer = _PREPARERS[ctx.run_id] = Preparer(ctx)
    return preparer.prepare_batch(batch)
