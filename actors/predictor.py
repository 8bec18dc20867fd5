"""The model stage: a Ray Data callable class, one model replica per actor.

For each block of PreparedRows: error rows pass through untouched; the rest are grouped into
batches by token budget (visual + text tokens + the generation budget), generated, parsed and
validated against the task's schema. An invalid answer (e.g. cut at `max_new_tokens`) is
re-asked once with a larger budget, then becomes `model.invalid_output` with its raw text
kept. A batch that raises is retried item by item, so one bad item never fails its batch.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import pyarrow as pa

from actors.backends import Generation, make_backend
from actors.constrained import parse_output
from actors.inputs import ModelInputs
from actors.loading import ResolvedModel
from actors.logs import log_item_error
from schemas.errors import ErrorCode
from schemas.rows import INFERRED_SCHEMA
from schemas.spec import ModelSpec
from schemas.tasks import Task


@dataclass
class _Item:
    row: dict
    inputs: ModelInputs

    @property
    def cost(self) -> int:
        return len(self.inputs.input_ids)


class Predictor:
    def __init__(
        self, resolved: ResolvedModel, model_spec: ModelSpec, task: Task, run_id: str | None = None, job: str | None = None
    ):
        self.backend = make_backend(resolved, model_spec)
        self.task = task
        self.model_spec = model_spec
        self.replica = replica_identity()
        self.run_id, self.job = run_id, job  # named on item_error log lines

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        items = []
        for row in rows:
            blob = row.pop("model_inputs", None)
            _defaults(row)
            if row["error_code"] is None:
                items.append(_Item(row, ModelInputs.from_bytes(blob)))
        if getattr(self.backend, "schedules_itself", False):
            chunks = [items] if items else []  # e.g. vLLM: it batches and schedules by itself
        else:
            chunks = token_budget_chunks(items, self.model_spec, self.task.sampling.max_new_tokens)
        for chunk in chunks:
            self._run_chunk(chunk)
        for item in items:
            item.row["replica"] = self.replica
        return pa.Table.from_pylist(rows, schema=INFERRED_SCHEMA)

    def _run_chunk(self, chunk: list[_Item]) -> None:
        started = time.perf_counter()
        try:
            generations = self._generate(chunk, self.task.sampling.max_new_tokens)
        except Exception:  # isolate: the batch failed, find the item(s) that did it
            for item in chunk:
                self._run_alone(item)
            return
        self._finish(chunk, generations, started)

    def _run_alone(self, item: _Item) -> None:
        started = time.perf_counter()
        try:
            generations = self._generate([item], self.task.sampling.max_new_tokens)
        except Exception as exc:
            code = ErrorCode.MODEL_OOM if _is_oom(exc) else ErrorCode.MODEL_ERROR
            self._fail(item.row, code, f"generation failed: {type(exc).__name__}: {str(exc)[:300]}")
            item.row["infer_ms"] = (time.perf_counter() - started) * 1000
            return
        self._finish([item], generations, started)

    def _generate(self, chunk: list[_Item], max_new_tokens: int) -> list[Generation]:
        return self.backend.generate(
            [item.inputs for item in chunk], self.task.sampling, max_new_tokens, self.task.json_schema
        )

    def _finish(self, chunk: list[_Item], generations: list[Generation], started: float) -> None:
        retry = []
        for item, generation in zip(chunk, generations):
            if not self._accept(item, generation):
                retry.append(item)
        sampling = self.task.sampling
        if retry and sampling.reask:
            budget = int(sampling.max_new_tokens * sampling.reask_factor)
            try:
                again = self._generate(retry, budget)
            except Exception as exc:
                again = [None] * len(retry)
                reason = f"{type(exc).__name__}: {str(exc)[:200]}"
            for item, generation in zip(retry, again):
                item.row["reasks"] = 1
                if generation is None:
                    self._fail(item.row, ErrorCode.MODEL_ERROR, f"re-ask failed: {reason}")
                else:
                    self._accept(item, generation, last_try=True)
        elif retry:
            for item in retry:
                self._accept(item, _generation_of(item.row), last_try=True)
        elapsed = (time.perf_counter() - started) * 1000
        for item in chunk:
            item.row["infer_ms"] = elapsed

    def _accept(self, item: _Item, generation: Generation, last_try: bool = False) -> bool:
        row = item.row
        row["raw_text"] = generation.text
        row["output_tokens"] = generation.output_tokens
        row["truncated"] = not generation.finished
        if not self.task.structured:
            return True
        try:
            parsed = parse_output(generation.text, self.task)
        except ValueError as exc:
            if last_try:
                cut = " (cut at the token limit)" if not generation.finished else ""
                self._fail(row, ErrorCode.MODEL_INVALID_OUTPUT, f"model output {exc}{cut}")
            return False
        row["output_json"] = parsed.output_json
        return True

    def _fail(self, row: dict, code: ErrorCode, message: str) -> None:
        row["error_code"] = code.value
        row["error_message"] = message
        row["output_json"] = None
        log_item_error(self.run_id, self.job, row["id"], "infer", code.value, message)


def replica_identity() -> dict:
    """This replica as the run summary reports it: actor id, node id, the GPU ids Ray gave it."""
    import ray

    if not ray.is_initialized():
        return {"id": f"local-{os.getpid()}", "node_id": None, "gpu_ids": []}
    context = ray.get_runtime_context()
    return {
        "id": context.get_actor_id() or f"task-{os.getpid()}",
        "node_id": context.get_node_id(),
        "gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()],
    }


def token_budget_chunks(items: list[_Item], spec: ModelSpec, max_new_tokens: int) -> list[list[_Item]]:
    """Batches of at most `batch_size` rows whose (prompt + generation) tokens, padded to the
    longest, fit `max_batch_tokens`. Similar lengths go together (less padding)."""
    chunks: list[list[_Item]] = []
    current: list[_Item] = []
    longest = 0
    for item in sorted(items, key=lambda it: it.cost):
        cost = item.cost + max_new_tokens
        fits = (len(current) + 1) * max(longest, cost) <= spec.max_batch_tokens
        if current and (len(current) >= spec.batch_size or not fits):
            chunks.append(current)
            current, longest = [], 0
        current.append(item)
        longest = max(longest, cost)
    if current:
        chunks.append(current)
    return chunks


def _defaults(row: dict) -> None:
    for name in ("raw_text", "output_json", "output_tokens", "truncated", "infer_ms", "replica"):
        row.setdefault(name, None)
    row.setdefault("reasks", 0)


def _generation_of(row: dict) -> Generation:
    return Generation(text=row["raw_text"] or "", output_tokens=row["output_tokens"] or 0, finished=not row["truncated"])


def _is_oom(exc: Exception) -> bool:
    return "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError"
