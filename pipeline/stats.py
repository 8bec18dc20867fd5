"""Small, mergeable run statistics: counts by code and latency histograms.

Each committed file reports its own stats; the driver merges them. Histograms have fixed
log-spaced buckets, so merging is addition and memory stays constant however many rows run.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

# Bucket i covers [BASE * GROWTH**(i-1), BASE * GROWTH**i) milliseconds; bucket 0 is < BASE.
_BASE_MS = 0.01
_GROWTH = 1.15
_BUCKETS = 160  # up to ~5e7 ms


def _bucket(value_ms: float) -> int:
    if value_ms < _BASE_MS:
        return 0
    return min(_BUCKETS - 1, 1 + int(math.log(value_ms / _BASE_MS, _GROWTH)))


def _upper(bucket: int) -> float:
    return _BASE_MS * _GROWTH**bucket


@dataclass
class Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * _BUCKETS)

    def add(self, value_ms: float | None) -> None:
        if value_ms is not None and value_ms == value_ms:  # skip None and NaN
            self.counts[_bucket(value_ms)] += 1

    def merge(self, other: "Histogram") -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]

    @property
    def total(self) -> int:
        return sum(self.counts)

    def quantile(self, q: float) -> float | None:
        """Upper edge of the bucket holding the q-quantile (within 15 %)."""
        total = self.total
        if not total:
            return None
        rank = q * total
        running = 0
        for index, count in enumerate(self.counts):
            running += count
            if running >= rank and count:
                return round(_upper(index), 3)
        return round(_upper(_BUCKETS - 1), 3)

    def to_sparse(self) -> dict[str, int]:
        return {str(i): c for i, c in enumerate(self.counts) if c}

    @staticmethod
    def from_sparse(sparse: dict[str, int]) -> "Histogram":
        hist = Histogram()
        for index, count in sparse.items():
            hist.counts[int(index)] += count
        return hist


STAGES = ("fetch_ms", "decode_ms", "infer_ms")
# The summary lists at most this many duplicate ids (it counts all of them): a manifest that
# repeats millions of ids must not make a summary of hundreds of MB.
MAX_LISTED_DUPLICATES = 1000


@dataclass
class BatchStats:
    """What one committed file contributes to the run summary."""

    rows: int = 0
    ok: int = 0
    errors: Counter = field(default_factory=Counter)
    input_tokens: int = 0
    output_tokens: int = 0
    pixel_bytes: int = 0
    reasks: int = 0
    truncated: int = 0  # rows whose first answer was cut at the token limit
    latency: dict[str, Histogram] = field(default_factory=lambda: {s: Histogram() for s in STAGES})
    skipped: int = 0  # committed by an earlier run (resume): not processed, not written
    duplicates: int = 0
    duplicate_examples: list[dict] = field(default_factory=list)  # {id, position, first}
    # Where the model ran: {replica id: {node_id, gpu_ids, rows}} (one entry per actor).
    replicas: dict[str, dict] = field(default_factory=dict)

    def add_duplicate(self, row: dict) -> None:
        self.duplicates += 1
        if len(self.duplicate_examples) < MAX_LISTED_DUPLICATES:
            # Positions as `<manifest file>#L<line>`: this occurrence, and the one processed.
            self.duplicate_examples.append({"id": row["id"], "position": row.get("source"), "first": row.get("error_message")})

    def add_row(self, row: dict) -> None:
        self.rows += 1
        if row.get("error_code"):
            self.errors[row["error_code"]] += 1
        else:
            self.ok += 1
        self.input_tokens += row.get("input_tokens") or 0
        self.output_tokens += row.get("output_tokens") or 0
        self.pixel_bytes += row.get("pixel_bytes") or 0
        self.reasks += row.get("reasks") or 0
        self.truncated += 1 if row.get("first_truncated") else 0
        for stage in STAGES:
            self.latency[stage].add(row.get(stage))
        replica = row.get("replica")
        if replica:
            self._count_replica(replica["id"], replica["node_id"], replica["gpu_ids"], 1)

    def _count_replica(self, replica_id: str, node_id: str, gpu_ids: list, rows: int) -> None:
        entry = self.replicas.setdefault(replica_id, {"node_id": node_id, "gpu_ids": list(gpu_ids or []), "rows": 0})
        entry["rows"] += rows

    def merge(self, other: "BatchStats") -> None:
        self.rows += other.rows
        self.ok += other.ok
        self.errors.update(other.errors)
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.pixel_bytes += other.pixel_bytes
        self.reasks += other.reasks
        self.truncated += other.truncated
        for stage in STAGES:
            self.latency[stage].merge(other.latency[stage])
        self.skipped += other.skipped
        self.duplicates += other.duplicates
        room = MAX_LISTED_DUPLICATES - len(self.duplicate_examples)
        self.duplicate_examples.extend(other.duplicate_examples[: max(0, room)])
        for replica_id, entry in other.replicas.items():
            self._count_replica(replica_id, entry["node_id"], entry["gpu_ids"], entry["rows"])

    def to_dict(self) -> dict:
        return {
            "rows": self.rows,
            "ok": self.ok,
            "errors": dict(self.errors),
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "pixel_bytes": self.pixel_bytes,
            "reasks": self.reasks,
            "truncated": self.truncated,
            "latency": {stage: hist.to_sparse() for stage, hist in self.latency.items()},
            "skipped": self.skipped,
            "duplicates": self.duplicates,
            "duplicate_examples": self.duplicate_examples,
            "replicas": self.replicas,
        }

    @staticmethod
    def from_dict(data: dict) -> "BatchStats":
        stats = BatchStats(
            rows=data["rows"],
            ok=data["ok"],
            errors=Counter(data["errors"]),
            input_tokens=data["input_tokens"],
            output_tokens=data["output_tokens"],
            pixel_bytes=data["pixel_bytes"],
            reasks=data["reasks"],
            truncated=data["truncated"],
            skipped=data.get("skipped", 0),
            duplicates=data.get("duplicates", 0),
            duplicate_examples=list(data.get("duplicate_examples", [])),
            replicas={key: dict(value) for key, value in data.get("replicas", {}).items()},
        )
        stats.latency = {stage: Histogram.from_sparse(data["latency"].get(stage, {})) for stage in STAGES}
        return stats


class ErrorBudgetExceeded(RuntimeError):
    """Too many rows of one error family in the recent window: stop before it costs more."""


@dataclass
class ErrorBudget:
    """`output.max_error_rate` over the last `window` (or more) rows, per error-code family.

    Expired credentials must not turn a 100-million-row backfill into 100 million
    `fetch.denied` rows: once a family's share of the window passes the rate, the run stops.
    Committed files stay; a rerun resumes.
    """

    max_rate: float
    window: int
    _entries: list[tuple[int, Counter]] = field(default_factory=list)

    def add(self, stats: BatchStats) -> None:
        if stats.rows:
            self._entries.append((stats.rows, Counter(stats.errors)))
        while len(self._entries) > 1 and self._rows() - self._entries[0][0] >= self.window:
            self._entries.pop(0)

    def _rows(self) -> int:
        return sum(rows for rows, _ in self._entries)

    def check(self) -> None:
        rows = self._rows()
        if rows < self.window:
            return
        codes: Counter = Counter()
        for _, errors in self._entries:
            codes.update(errors)
        families: Counter = Counter()
        for code, count in codes.items():
            families[code.split(".", 1)[0]] += count
        for family, count in families.most_common():
            if count / rows > self.max_rate:
                dominant, n = max(((c, k) for c, k in codes.items() if c.split(".", 1)[0] == family), key=lambda x: x[1])
                raise ErrorBudgetExceeded(
                    f"{count} of the last {rows} rows failed with {family}.* errors "
                    f"({count / rows:.0%} > output.max_error_rate {self.max_rate:.0%}); "
                    f"most of them {dominant} ({n}). Stopping; committed results are kept and a rerun resumes."
                )
