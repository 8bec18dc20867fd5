"""`make bench`: every benchmark in benchmarks/, one after another, each in a fresh process.

A benchmark is any module here that is not a helper (HELPERS) and runs as
`python -m benchmarks.<name>`. Each prints a human table and one machine-readable JSON object
per benchmark, on a line that starts with `BENCH_JSON ` (a line that is a JSON object with a
"benchmark" key counts too). This collects those objects into
`.cache/bench/results.jsonl` and ends with a short table of the headline numbers. A
benchmark that cannot run on this machine (e.g. the GPU benchmark without CUDA) exits with
status 2 and no result: it is listed as skipped, not failed.

    python -m benchmarks.run_all               # e2e at 2,000 items; scaling at 300 and 3,000
    python -m benchmarks.run_all --scaling-n 1000   # scaling at 1,000 and 10,000 (14 minutes more)
    python -m benchmarks.run_all --n 50 --scaling-n 50   # a quick look
    python -m benchmarks.run_all --only e2e
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import BENCH_DIR, JSON_PREFIX, REPO, bench_env

HELPERS = {"__init__", "common", "corpus", "run_all"}
NOT_HERE = 2  # the exit status of a benchmark that cannot run on this machine
# Slowest last, so that a quick look at the others comes first.
ORDER = ["e2e", "scaling"]


def discover() -> list[str]:
    names = [path.stem for path in (REPO / "benchmarks").glob("*.py") if path.stem not in HELPERS and not path.stem.startswith("_")]
    return sorted(names, key=lambda name: (name in ORDER, ORDER.index(name) if name in ORDER else 0, name))


def run_one(name: str, n: int | None) -> tuple[list[dict], int, float, str]:
    """Run one benchmark (with `--n n` when it takes a job size), echoing its output as it
    comes; its JSON objects, exit code, seconds, and its last line of output."""
    command = [sys.executable, "-m", f"benchmarks.{name}"] + (["--n", str(n)] if n is not None else [])
    print(f"\n### {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=bench_env())
    objects, last = [], ""
    for line in process.stdout:
        found = parse_result(line)
        if found is not None:
            objects.append(found)
        if not line.startswith(JSON_PREFIX):
            sys.stdout.write(line)
            last = line.strip() or last
    return objects, process.wait(), time.perf_counter() - started, last


def parse_result(line: str) -> dict | None:
    text = line[len(JSON_PREFIX) :] if line.startswith(JSON_PREFIX) else line.strip()
    if not text.startswith("{"):
        return None
    try:
        found = json.loads(text)
    except json.JSONDecodeError:
        return None
    return found if isinstance(found, dict) and "benchmark" in found else None


def headline(result: dict) -> str:
    """One line per benchmark for the closing table; the full object is in results.jsonl."""
    if result["benchmark"] == "e2e":
        return (f"tessera {result['tessera']['items_per_s']:.2f} items/s vs reference loop "
                f"{result['sequential']['items_per_s']:.2f} items/s: {result['speedup']:.2f}x (goal 4x), N={result['n']}")
    if result["benchmark"] == "scaling":
        return (f"{result['small']['n']:,} -> {result['large']['n']:,} items: wall x{result['wall_ratio']:.2f}, "
                f"peak PSS x{result['pss_ratio']:.3f} (goal <= 1.2)")
    numbers = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return ", ".join(f"{k} {v}" for k, v in list(numbers.items())[:6]) or "(see results.jsonl)"  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="run every benchmark in benchmarks/")
    parser.add_argument("--n", type=int, default=2000, help="items for e2e")
    # 300 and 3,000 keep `make bench` under 15 minutes here (1,000 and 10,000 took 809 s alone,
    # for a peak PSS ratio of 1.011; the e2e reference loop on all 2,000 items took 494 s).
    parser.add_argument("--scaling-n", type=int, default=300, help="N for scaling, which also runs 10N")
    parser.add_argument("--only", help="comma-separated benchmark names (default: all)")
    args = parser.parse_args(argv)

    # The benchmarks that take a job size; the others run with their own defaults.
    sizes = {"e2e": args.n, "scaling": args.scaling_n}
    names = discover()
    if args.only:
        wanted = [name.strip() for name in args.only.split(",")]
        names = [name for name in names if name in wanted]
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    results_path = BENCH_DIR / "results.jsonl"
    started = time.perf_counter()
    closing, failed = [], []
    with open(results_path, "w") as out:
        for name in names:
            objects, code, seconds, last = run_one(name, sizes.get(name))
            if code == NOT_HERE and not objects:
                closing.append((name, f"skipped: {last[:100]}", seconds))
                continue
            if code != 0:
                failed.append(name)
            for result in objects:
                out.write(json.dumps(result, sort_keys=True) + "\n")
                closing.append((result["benchmark"], headline(result), seconds))
            if not objects:
                closing.append((name, f"no result (exit {code})", seconds))
    print(f"\n=== benchmarks: {time.perf_counter() - started:.0f} s in all; JSON objects in {results_path} ===")
    width = max((len(name) for name, _, _ in closing), default=10)
    for name, line, seconds in closing:
        print(f"  {name:<{width}}  {line}   [{seconds:.0f} s]")
    if failed:
        print(f"  failed: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
