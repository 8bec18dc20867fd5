"""The model stage: a Ray Data callable class, one model replica per actor.

For each block of PreparedRows: error rows pass through untouched; the rest are grouped into
batches by token budget (visual + text tokens + the generation budget), generated, parsed and
validated against the task's schema. An invalid answer (e.g. cut at `max_new_tokens`) is
re-asked once with a larger budget (batched by the token budget at that size), then becomes
`model.invalid_output` with its raw text kept. A batch that raises, first pass or re-ask, is
retried item by item (after an OOM, with the CUDA cache emptied first), so one bad item never
fails its batch: it alone becomes `model.oom` or `model.error`, as does a row whose inputs do
not load. The model loads on the first block with a row for it, so a replica that sees only
error rows (or a rerun with nothing due) never loads it.
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


# The switch of pipeline/decode.py's test hooks too; production never sets it.
TEST_HOOKS_ENV = "TESSERA_TEST_HOOKS"
TEST_FAULT_PREFIX = "tessera-test-fault-"
SLOW_HOOK_S = 0.25  # per `slow` item: a 32-row block keeps its replica busy for 8 s


@dataclass
class _Item:
    row: dict
    inputs: ModelInputs

    @property
    def cost(self) -> int:
        return len(self.inputs.input_ids)


@dataclass
class _Failed:
    """Why the model raised for an item, as text: the exception's frames hold tensors."""

    code: ErrorCode
    reason: str

    @staticmethod
    def of(exc: Exception) -> "_Failed":
        code = ErrorCode.MODEL_OOM if _is_oom(exc) else ErrorCode.MODEL_ERROR
        return _Failed(code, f"{type(exc).__name__}: {str(exc)[:300]}")


class Predictor:
    def __init__(
        self, resolved: ResolvedModel, model_spec: ModelSpec, task: Task, run_id: str | None = None, job: str | None = None
    ):
        self.resolved = resolved
        self._backend = None
        self.task = task
        self.model_spec = model_spec
        self.replica = replica_identity()
        self.run_id, self.job = run_id, job  # named on item_error log lines

    @property
    def backend(self):
        """The model, loaded on the first block that has a row for it: a replica that only
        ever sees error rows (a rerun with nothing due, a manifest of missing files) loads
        nothing, which on a GPU cluster saves minutes per replica."""
        if self._backend is None:
            self._backend = make_backend(self.resolved, self.model_spec)
        return self._backend

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        items = []
        for row in rows:
            blob = row.pop("model_inputs", None)
            _defaults(row)
            if row["error_code"] is None and (item := self._item_of(row, blob)) is not None:
                items.append(item)
        max_new_tokens = self.task.sampling.max_new_tokens
        for chunk in self._chunks(items, max_new_tokens):
            started = time.perf_counter()
            self._finish(chunk, self._generate_isolated(chunk, max_new_tokens), started)
        for item in items:
            item.row["replica"] = self.replica
        return pa.Table.from_pylist(rows, schema=INFERRED_SCHEMA)

    def _item_of(self, row: dict, blob: bytes | None) -> _Item | None:
        """The row's model inputs; a blob that does not load fails its own row, not the block."""
        try:
            return _Item(row, ModelInputs.from_bytes(blob))
        except Exception as exc:
            self._fail(row, ErrorCode.MODEL_ERROR, f"model inputs unreadable: {type(exc).__name__}: {str(exc)[:200]}")
            return None

    def _chunks(self, items: list[_Item], max_new_tokens: int) -> list[list[_Item]]:
        if not items:
            return []
        # The first use of self.backend loads the model: here, outside _generate_isolated, so a
        # model that does not load fails the job instead of each row as model.error.
        if getattr(self.backend, "schedules_itself", False):
            return [items]  # e.g. vLLM: it batches and schedules by itself
        return token_budget_chunks(items, self.model_spec, max_new_tokens)

    def _generate_isolated(self, chunk: list[_Item], max_new_tokens: int) -> list[Generation | _Failed]:
        """One result per item. A batch that raises is retried item by item, so only the items
        that make the model fail on their own come back as _Failed."""
        try:
            return self._generate(chunk, max_new_tokens)
        except Exception as exc:
            failed = _Failed.of(exc)
        if len(chunk) == 1:
            return [failed]
        if failed.code is ErrorCode.MODEL_OOM:
            # Only out here: the exception's frames held the batch's tensors until the block ended.
            _release_cached_memory()
        return [result for item in chunk for result in self._generate_isolated([item], max_new_tokens)]

    def _generate(self, chunk: list[_Item], max_new_tokens: int) -> list[Generation]:
        _run_test_hook(chunk, reask=max_new_tokens > self.task.sampling.max_new_tokens)
        return self.backend.generate(
            [item.inputs for item in chunk], self.task.sampling, max_new_tokens, self.task.json_schema
        )

    def _finish(self, chunk: list[_Item], results: list[Generation | _Failed], started: float) -> None:
        retry = []
        for item, result in zip(chunk, results):
            if isinstance(result, _Failed):
                self._fail(item.row, result.code, f"generation failed: {result.reason}")
            elif not self._accept(item, result):
                retry.append(item)
        sampling = self.task.sampling
        if retry and sampling.reask:
            self._reask(retry, int(sampling.max_new_tokens * sampling.reask_factor))
        else:
            for item in retry:
                self._accept(item, _generation_of(item.row), last_try=True)
        elapsed = (time.perf_counter() - started) * 1000
        for item in chunk:
            item.row["infer_ms"] = elapsed

    def _reask(self, items: list[_Item], budget: int) -> None:
        """Once more with a larger budget, in batches that fit max_batch_tokens at that budget."""
        for chunk in self._chunks(items, budget):
            for item, result in zip(chunk, self._generate_isolated(chunk, budget)):
                item.row["reasks"] = 1
                if isinstance(result, _Failed):
                    self._fail(item.row, result.code, f"re-ask failed: {result.reason}")
                else:
                    self._accept(item, result, last_try=True)

    def _accept(self, item: _Item, generation: Generation, last_try: bool = False) -> bool:
        row = item.row
        row["raw_text"] = generation.text
        row["output_tokens"] = generation.output_tokens
        row["truncated"] = not generation.finished
        if row["first_truncated"] is None:  # what the summary counts, even when a re-ask fixed it
            row["first_truncated"] = row["truncated"]
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
    for name in ("raw_text", "output_json", "output_tokens", "truncated", "first_truncated", "infer_ms", "replica"):
        row.setdefault(name, None)
    row.setdefault("reasks", 0)


def _generation_of(row: dict) -> Generation:
    return Generation(text=row["raw_text"] or "", output_tokens=row["output_tokens"] or 0, finished=not row["truncated"])


def _is_oom(exc: Exception) -> bool:
    return "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError"


def _release_cached_memory() -> None:
    """After an OOM, give the allocator's cached blocks back before the items go one by one."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _run_test_hook(chunk: list[_Item], reask: bool) -> None:
    """TEST-ONLY: lets tests make the model really raise for one item of a batch, to prove
    per-item isolation, or make a replica slow, to queue work without burning CPU. Inert
    unless the environment has TESSERA_TEST_HOOKS=1 *and* a row id in the batch starts with
    `tessera-test-fault-<action>`: `oom` raises torch's OutOfMemoryError, `error` a
    RuntimeError, `reask` a RuntimeError on the re-ask only, `slow` waits SLOW_HOOK_S first."""
    if os.environ.get(TEST_HOOKS_ENV) != "1":
        return
    for item in chunk:
        row_id = item.row["id"]
        action = row_id[len(TEST_FAULT_PREFIX) :].split("-", 1)[0] if row_id.startswith(TEST_FAULT_PREFIX) else None
        if action == "slow":
            time.sleep(SLOW_HOOK_S)
        if action == "oom":
            import torch

            raise torch.OutOfMemoryError(f"CUDA out of memory (test hook: {row_id})")
        if action == "error" or (action == "reask" and reask):
            raise RuntimeError(f"test hook: {row_id}")
