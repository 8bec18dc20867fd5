"""The closed set of error codes a result row can carry, and the exception that carries one.

A failure is a row, not a crash: the stage that can name the cause raises `ItemError` with
one of these codes, its caller turns it into the row's `error_code` / `error_message`, and
later stages pass the row along untouched. Codes are stable: dashboards and `redrive
--codes` depend on them. Add a code here (and to docs/errors.md) before using it.
"""

from __future__ import annotations

from enum import Enum


class ErrorCode(str, Enum):
    # The manifest row itself is unusable (no id, no uri, bad types).
    MANIFEST_INVALID_ROW = "manifest.invalid_row"
    # Fetching bytes from storage.
    FETCH_NOT_FOUND = "fetch.not_found"
    FETCH_DENIED = "fetch.denied"
    FETCH_TIMEOUT = "fetch.timeout"
    FETCH_TOO_LARGE = "fetch.too_large"
    FETCH_ERROR = "fetch.error"
    # Decoding media on CPU workers.
    DECODE_UNSUPPORTED = "decode.unsupported"
    DECODE_CORRUPT = "decode.corrupt"
    DECODE_TOO_MANY_PIXELS = "decode.too_many_pixels"
    DECODE_TIMEOUT = "decode.timeout"
    DECODE_CRASHED = "decode.crashed"
    VIDEO_TOO_LONG = "video.too_long"
    VIDEO_NO_VIDEO_STREAM = "video.no_video_stream"
    PDF_ENCRYPTED = "pdf.encrypted"
    # Building the model's inputs: the prompt template over the row's fields, the processor.
    PROMPT_ERROR = "prompt.error"
    PREPARE_ERROR = "prepare.error"
    # The model stage.
    MODEL_INVALID_OUTPUT = "model.invalid_output"
    MODEL_OOM = "model.oom"
    MODEL_ERROR = "model.error"

    @property
    def family(self) -> str:
        """`fetch.denied` -> `fetch`: the unit the error budget is counted in."""
        return self.value.split(".", 1)[0]


# Not row codes: internal markers. Rows carrying them flow through the stages untouched and
# are counted by the sink, never written. Duplicate manifest ids are listed in the run
# summary under DUPLICATE_ID; SKIPPED rows were committed by an earlier run (resume).
DUPLICATE_ID = "manifest.duplicate_id"
SKIPPED = "resume.already_committed"
MARKERS = (DUPLICATE_ID, SKIPPED)


class ItemError(Exception):
    """One item failed for a reason we can name. Becomes the row's error fields."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message

    def __reduce__(self):  # survive pickling across Ray processes
        return (ItemError, (self.code, self.message))
