"""The CPU stage: ManifestRow -> PreparedRow. Fetch the media, decode and tile it, render the
prompt, and build the model's inputs so that only token ids and uint8 pixels cross to the actor.

Decoding (and tiling, where pipeline/tiling.py reproduces the model's processor) runs in an
isolated child process (pipeline/isolation.py) unless media.isolation is `none`, so a file
that crashes or hangs a native decoder is one error row. With media.pdf.mode `page`, a row
whose media are PDFs leaves as one row per page, with ids `<id>#p<N>`.

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
from actors.logs import log_item_error
from pipeline import decode, storage
from pipeline.decode import ModelMedia, Shaping
from pipeline.isolation import IsolatedCaller
from pipeline.tiling import AnyresPlan
from schemas.errors import SKIPPED, ErrorCode, ItemError
from schemas.rows import PREPARED_SCHEMA
from schemas.spec import JobSpec, MediaSpec
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
        self.run_id = ctx.run_id
        # Only the processor's files: a CPU worker never downloads the weights.
        self.processor = load_processor(ctx.model.local_path(weights=False), ctx.model.trust_remote_code)
        self.adapter = adapter_for(ctx.model.model_type)
        # vLLM runs the model's processor itself: the worker decodes and downscales, never tiles.
        self.for_engine = ctx.spec.model.backend == "vllm"
        tiles = self.adapter.accepts_tiles and not self.for_engine
        plan = AnyresPlan.from_processor(self.processor.image_processor) if tiles else None
        # Without a plan the decoder still decodes only what the processor keeps (fit).
        shaping = Shaping(self.adapter.frame_size(self.processor), plan, fit=self.adapter.fit(self.processor))
        self.decoder = MediaDecoder(ctx.spec.media, shaping)
        # A family that takes video natively gets each video as a video part (the vLLM engine
        # path sends frames as images).
        self.native_video = self.adapter.native_video and not self.for_engine
        self.task = ctx.task
        self.template = _JINJA.from_string(self.task.prompt_template)
        self.fetch_policy = storage.FetchPolicy.from_spec(ctx.spec)

    def prepare_batch(self, batch: pa.Table) -> pa.Table:
        out = [prepared for row in batch.to_pylist() for prepared in self.prepare_rows(row)]
        return pa.Table.from_pylist(out, schema=PREPARED_SCHEMA)

    def prepare_rows(self, row: dict) -> list[dict]:
        """The row, prepared or carrying its error; one row per page in PDF page mode."""
        for name in PREPARED_SCHEMA.names:
            row.setdefault(name, None)
        row["manifest_id"] = row["id"]
        if row["error_code"] == ErrorCode.MANIFEST_INVALID_ROW.value:
            self._log_error(row, "read")  # the read stage has no run to name: its failures are logged here
        if row["error_code"] is not None:
            return [row]
        try:
            return self._prepare(row)
        except ItemError as exc:
            # Messages name objects by display uri; redact also catches a uri inside an exception's text.
            row["error_code"], row["error_message"] = exc.code.value, storage.redact(exc.message)
            self._log_error(row, "prepare")
            return [row]

    def _log_error(self, row: dict, stage: str) -> None:
        log_item_error(self.run_id, self.spec.name, row["id"], stage, row["error_code"], row["error_message"])

    def close(self) -> None:
        self.decoder.close()

    def _prepare(self, row: dict) -> list[dict]:
        if row["resume_version"] is not None and self._unchanged(row):
            row["error_code"] = SKIPPED  # committed by an earlier run, and the media did not change
            return [row]
        items, versions, fetch_ms, decode_ms = [], [], 0.0, 0.0
        for uri in row["uris"]:
            started = time.perf_counter()
            fetched = storage.fetch(uri, self.spec.storage, self.fetch_policy)
            fetch_ms += (time.perf_counter() - started) * 1000
            versions.append(fetched.version or "")
            started = time.perf_counter()
            items.append(self.decoder(fetched.data, row["media_type"], uri))
            decode_ms += (time.perf_counter() - started) * 1000
        row["media_type"] = row["media_type"] or items[0].kind
        row.update(content_version="|".join(versions) if any(versions) else None, fetch_ms=fetch_ms)
        if self.spec.media.pdf.mode == "page" and all(item.kind == "pdf" for item in items):
            pages = [page for item in items for page in item.split()]
            # Each page row gets its share of the document's fetch and decode time.
            rows = [dict(row, id=f"{row['id']}#p{number}", manifest_id=row["id"]) for number in range(1, len(pages) + 1)]
            for page_row, page in zip(rows, pages):
                page_row.update(fetch_ms=fetch_ms / len(pages))
                self._fill(page_row, [page], decode_ms / len(pages))
            return rows
        self._fill(row, items, decode_ms)
        return [row]

    def _unchanged(self, row: dict) -> bool:
        try:
            versions = [storage.current_version(uri, self.spec.storage, self.fetch_policy) or "" for uri in row["uris"]]
        except (OSError, ItemError):
            return False  # cannot tell, or may not ask: process it again (the fetch will name the problem)
        return "|".join(versions) == row["resume_version"]

    def _fill(self, row: dict, items: list[ModelMedia], decode_ms: float) -> None:
        """Prompt and model inputs for the row's media, in order: images (a video's frames among
        them), or one video part per video for a family that takes video natively."""
        started = time.perf_counter()
        sizes = [size for item in items for size in item.sizes]
        as_video = [self.native_video and item.as_frames for item in items]
        parts = [kind for item, video in zip(items, as_video) for kind in (["video"] if video else ["image"] * len(item.sizes))]
        text = self.render_prompt(row, parts)
        try:
            if self.for_engine:
                images = [image for item in items for image in item.images]
                inputs = self.adapter.prepare_for_engine(self.processor, images, text)
            elif all(item.tiles is not None for item in items):
                tiles = [tile for item in items for tile in item.tiles]
                inputs = self.adapter.prepare_tiled(self.processor, tiles, sizes, text)
            else:
                images = [image for item, video in zip(items, as_video) if not video for image in item.images]
                videos = [item.images for item, video in zip(items, as_video) if video]
                kind = "video" if all(item.as_frames for item in items) else "image"
                inputs = self.adapter.prepare(self.processor, images, kind, text, videos=videos or None)
        except Exception as exc:
            raise ItemError(ErrorCode.PREPARE_ERROR, f"the model's processor rejected the input: {exc}") from None
        row.update(
            model_inputs=inputs.to_bytes(),
            n_tiles=inputs.n_tiles,
            n_frames=sum(item.n_frames or 0 for item in items) or None,
            n_pages=sum(item.n_pages or 0 for item in items) or None,
            input_tokens=len(inputs.input_ids),
            pixel_bytes=inputs.pixel_bytes,
            decode_ms=decode_ms + (time.perf_counter() - started) * 1000,
        )

    def render_prompt(self, row: dict, media: int | list[str]) -> str:
        """The task's Jinja template over the row's fields, in the model's chat template."""
        fields = json.loads(row["fields_json"] or "{}")
        try:
            prompt = self.template.render(**fields, id=row["id"], uris=row["uris"], uri=row["uris"][0])
        except TemplateError as exc:
            raise ItemError(ErrorCode.PROMPT_ERROR, f"cannot render task.prompt for this row: {exc}") from None
        return build_chat_text(self.processor, prompt, media, self.task.system_prompt)


def build_chat_text(processor, prompt: str, media: int | list[str], system_prompt: str | None = None) -> str:
    """Chat messages (system?, user: media then text) through the processor's chat template.
    `media`: that many images, or the parts in order ("image" / "video")."""
    messages = []
    if system_prompt:
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    kinds = ["image"] * media if isinstance(media, int) else media
    content = [{"type": kind} for kind in kinds] + [{"type": "text", "text": prompt}]
    messages.append({"role": "user", "content": content})
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


class MediaDecoder:
    """`decode.prepare_media` for one item: in an isolated child process (media.isolation =
    process: a crash or hang is this item's error row) or in this worker (none)."""

    def __init__(self, media: MediaSpec, shaping: Shaping):
        self.media, self.shaping = media, shaping
        self.isolated = IsolatedCaller() if media.isolation == "process" else None

    def __call__(self, data: bytes, media_type: str | None, uri: str) -> ModelMedia:
        try:
            if self.isolated is None:
                return decode.prepare_media(data, media_type, self.media, self.shaping)
            return self.isolated.call(
                decode.prepare_media, data, media_type, self.media, self.shaping,
                timeout_s=self.media.decode_timeout_s, what="this item",
            )
        except ItemError as exc:
            raise ItemError(exc.code, f"{storage.display_uri(uri)}: {exc.message}") from None

    def close(self) -> None:
        if self.isolated is not None:
            self.isolated.close()


_PREPARERS: dict[str, Preparer] = {}


def prepare_batch(batch: pa.Table, ctx: PrepareContext) -> pa.Table:
    """Entry point for `map_batches`: one Preparer per worker process and run."""
    preparer = _PREPARERS.get(ctx.run_id)
    if preparer is None:
        for old in _PREPARERS.values():
            old.close()
        _PREPARERS.clear()
        preparer = _PREPARERS[ctx.run_id] = Preparer(ctx)
    return preparer.prepare_batch(batch)
