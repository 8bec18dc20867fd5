"""Scaling: the same job on N and on 10N mixed items, with a fixed object-store size.

Prints the wall-time ratio (linear would be 10) and the peak memory of the whole process
tree (the `tessera` driver, Ray's daemons, every worker and actor) as PSS, which counts the
shared object store and shared libraries once instead of once per process. Streaming means
the peak should not grow with the job: the goal is 10N ÷ N ≤ 1.2. Asserts nothing.

The model's share of the work is kept small (`--max-new-tokens 8` by default): this
benchmark is about what the pipeline holds in memory as the job grows, not about the model.

    python -m benchmarks.scaling --n 2000
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import yaml

from benchmarks.common import BENCH_DIR, emit, machine, read_summary, run_tessera, write_result
from benchmarks.corpus import CorpusSpec, describe, make_corpus, plan_pool

MIXED_CORPUS = CorpusSpec()  # JPEGs, PNGs and videos


def scaling_spec(manifest: Path, output: Path, max_new_tokens: int, object_store_mb: int) -> dict:
    return {
        "name": "bench-scaling",
        "input": {"manifest": str(manifest)},
        "output": {"path": str(output), "mode": "overwrite", "rows_per_file": 200},
        "model": {"path": "builtin:tiny"},
        "task": {"prompt": "Describe the image.", "sampling": {"max_new_tokens": max_new_tokens, "reask": False}},
        "ray": {"object_store_memory_mb": object_store_mb},
    }


def run_size(workdir: Path, n: int, max_new_tokens: int, object_store_mb: int) -> dict:
    manifest = make_corpus(BENCH_DIR / "corpus", n, MIXED_CORPUS)
    output = workdir / f"out-{n}"
    spec_path = workdir / f"spec-{n}.yaml"
    spec_path.write_text(yaml.safe_dump(scaling_spec(manifest, output, max_new_tokens, object_store_mb)))
    run_id = f"bench-scaling-{n}-{int(time.time())}"
    measured = run_tessera(spec_path, run_id, workdir / f"tessera-{n}.log", sample_memory=True)
    summary = read_summary(output, run_id)
    return {
        "n": n,
        "wall_s": measured["wall_s"],
        "items_per_s": round(summary["rows_out"] / measured["wall_s"], 3),
        "peak_pss_mib": measured["peak_pss_mib"],
        "pss_samples": measured["pss_samples"],
        "peak_pss_mib_by_role": measured["peak_pss_mib_by_role"],
        "ok": summary["ok"],
        "errors_by_code": summary["errors_by_code"],
        "invariant_ok": summary["invariant"]["ok"],
        "summary": str(output / "_runs" / run_id / "summary.json"),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="wall time and peak PSS at N and 10N items")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--factor", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--object-store-mb", type=int, default=512)
    parser.add_argument("--workdir", type=Path, default=BENCH_DIR / "scaling")
    args = parser.parse_args(argv)

    args.workdir.mkdir(parents=True, exist_ok=True)
    host = machine()
    small = run_size(args.workdir, args.n, args.max_new_tokens, args.object_store_mb)
    large = run_size(args.workdir, args.n * args.factor, args.max_new_tokens, args.object_store_mb)
    result = {
        "benchmark": "scaling",
        "factor": args.factor,
        "max_new_tokens": args.max_new_tokens,
        "object_store_mb": args.object_store_mb,
        "corpus": describe(plan_pool(MIXED_CORPUS), args.n * args.factor),
        "machine": host,
        "small": small,
        "large": large,
        "wall_ratio": round(large["wall_s"] / small["wall_s"], 2),
        "pss_ratio": round(large["peak_pss_mib"] / small["peak_pss_mib"], 3),
        "goal_pss_ratio": 1.2,
    }
    write_result(result, "scaling")
    emit(result, table_rows(result))
    return result


def table_rows(result: dict) -> list[tuple[str, str]]:
    rows = []
    for key in ("small", "large"):
        run = result[key]
        rows.append(
            (f"{run['n']:,} items", f"{run['wall_s']:.1f} s, {run['items_per_s']:.2f} items/s, peak PSS {run['peak_pss_mib']:,.0f} MiB"
             f" ({run['pss_samples']} samples), invariant {'ok' if run['invariant_ok'] else 'BROKEN'}")
        )  # fmt: skip
        rows.append(("  at its peak", roles_line(run["peak_pss_mib_by_role"])))
    corpus = result["corpus"]
    return rows + [
        ("wall time ratio", f"{result['wall_ratio']:.2f} (linear: {result['factor']})"),
        ("peak PSS ratio", f"{result['pss_ratio']:.3f} (goal ≤ {result['goal_pss_ratio']})"),
        ("corpus", f"{corpus['rows_by_kind']} over {corpus['distinct_files']} distinct files"),
        ("settings", f"object store {result['object_store_mb']} MiB, max_new_tokens {result['max_new_tokens']}"),
        ("machine", f"{result['machine']['cpus']} CPUs, GPU {result['machine']['gpu']}, load {result['machine']['load_avg_1m_at_start']} at start"),
    ]


def roles_line(by_role: dict[str, dict], top: int = 6) -> str:
    """The largest kinds of process at the peak, e.g. `worker MapWorker x1 812`, in MiB."""
    ranked = list(by_role.items())[:top]
    return ", ".join(f"{role} x{entry['processes']} {entry['mib']:,.0f}" for role, entry in ranked)


if __name__ == "__main__":
    main()
