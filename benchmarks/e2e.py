"""End to end: the same N images through (a) the reference loop and (b) `tessera run`.

(a) is DESIGN.md's reference loop, done sequentially in this process as a user of the seeds
would: for each item open the image with Pillow, apply the processor's chat template, run
the processor, `model.generate(max_new_tokens=…)` greedy, decode only the new tokens, append;
write one Parquet file at the end. (b) is the `tessera` command on a spec with the same
model (the built-in tiny one), prompt, `max_new_tokens` and greedy sampling, timed from
the command's start to its exit (Ray start-up and the rows-in = rows-out check included).

Prints items/s of each, the ratio, and where (b)'s time went. Asserts nothing about time.

(a) is sequential, so its time is a sum over items: by default it runs on the manifest's first
500 rows, which are the corpus's 500 distinct files once each (rows cycle over that pool, so
the N rows are the same mix; every k-th row would not be: it picks every k-th file of the
pool, 3.5 MP mean against 3.0). Its time for all N is the model load plus the subset's
per-item time N times over; the table says how many it ran. `--reference-n 0`
runs it on all N (8 minutes more at N = 2,000 here). (b) always runs all N.

    python -m benchmarks.e2e --n 2000
    python -m benchmarks.e2e --n 2000 --reference-n 0    # the reference loop on every item
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from benchmarks.common import BENCH_DIR, emit, machine, read_summary, run_tessera, write_result
from benchmarks.corpus import DEFAULT_POOL, CorpusSpec, describe, make_corpus, plan_pool
from jobs.report import write_report

PROMPT = "Describe the image in one sentence."
MAX_NEW_TOKENS = 32
# The reference loop opens images with Pillow: the e2e corpus holds images only.
E2E_CORPUS = CorpusSpec(video_share=0.0)


def read_manifest(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def reference_loop(manifest: Path, out_file: Path, prompt: str, max_new_tokens: int, limit: int = 0) -> dict:
    """DESIGN.md's reference loop, one item at a time, over the first `limit` rows (0: all);
    seconds spent in each of its steps."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from actors.tiny import ensure_tiny_model

    spent = dict.fromkeys(("load", "open", "processor", "generate", "decode", "write"), 0.0)
    started = clock = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        spent[step] += now - clock
        clock = now

    path = ensure_tiny_model()
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    lap("load")
    results, rows = [], read_manifest(manifest)
    for row in rows[: limit or None]:
        image = Image.open(row["uri"])
        image.load()
        lap("open")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=text, images=image, return_tensors="pt")
        lap("processor")
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        lap("generate")
        answer = processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        results.append({"id": row["id"], "uri": row["uri"], "text": answer})
        lap("decode")
    pq.write_table(pa.Table.from_pylist(results), out_file)
    lap("write")
    wall = time.perf_counter() - started
    # On a subset, the whole run's time is the model load plus the per-item time N times over.
    total = len(rows)
    whole_wall = spent["load"] + (wall - spent["load"]) * total / len(results)
    return {
        "items": len(results),
        "wall_s": round(wall, 2),
        "whole_wall_s": round(whole_wall, 2),
        "items_per_s": round(total / whole_wall, 3),
        "seconds_by_step": {step: round(value, 2) for step, value in spent.items()},
        "texts": {row["id"]: row["text"] for row in results},
    }


def tessera_spec(manifest: Path, output: Path, prompt: str, max_new_tokens: int, object_store_mb: int) -> dict:
    return {
        "name": "bench-e2e",
        "input": {"manifest": str(manifest)},
        # Files of 100 rows: the summary's throughput timeline gets a point per file.
        "output": {"path": str(output), "mode": "overwrite", "rows_per_file": 100},
        "model": {"path": "builtin:tiny"},
        "task": {"prompt": prompt, "sampling": {"max_new_tokens": max_new_tokens, "temperature": 0.0}},
        "ray": {"object_store_memory_mb": object_store_mb},
    }


def run_pipeline(workdir: Path, manifest: Path, prompt: str, max_new_tokens: int, object_store_mb: int) -> dict:
    output = workdir / "tessera-out"
    spec_path = workdir / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(tessera_spec(manifest, output, prompt, max_new_tokens, object_store_mb)))
    run_id = f"bench-e2e-{int(time.time())}"
    measured = run_tessera(spec_path, run_id, workdir / "tessera.log")
    summary = read_summary(output, run_id)
    results = pq.read_table(summary["output"]["run_dir"]).to_pylist()
    report = write_report(str(output), run_id)
    return {
        "items": summary["rows_out"],
        "ok": summary["ok"],
        "wall_s": measured["wall_s"],
        "items_per_s": round(summary["rows_out"] / measured["wall_s"], 3),
        "invariant_ok": summary["invariant"]["ok"],
        "stages": stage_breakdown(summary, results, measured["wall_s"]),
        "texts": {row["id"]: row["raw_text"] for row in results},
        "run_id": run_id,
        "summary": str(output / "_runs" / run_id / "summary.json"),
        "report": report.html,
    }


def stage_breakdown(summary: dict, results: list[dict], wall_s: float) -> dict:
    """Where (b)'s wall time went, from the run's own summary.json (its phases, timed by the
    driver): start-up, the streaming job, the invariant check; and how much CPU work each row
    stage did inside the stream (seconds summed over rows)."""
    phases = summary["phases_s"]
    return {
        # Imports, model and Ray start-up, planning, the summary, exit: neither stream nor check.
        "startup_and_other_s": round(wall_s - phases["stream"] - phases["verify"], 2),
        "stream_s": phases["stream"],
        "invariant_check_s": phases["verify"],
        "fetch_cpu_s": round(sum(row["fetch_ms"] or 0 for row in results) / 1000, 2),
        "decode_and_processor_cpu_s": round(sum(row["decode_ms"] or 0 for row in results) / 1000, 2),
        # No per-row sum for infer: a row's infer_ms is its whole generate() batch's, and the
        # results do not say which rows shared a batch. The summary's per-batch p50/p95 do.
        "latency_ms": summary["latency_ms"],
    }


def same_text_share(a: dict, b: dict) -> float | None:
    common = [key for key in a if key in b]
    return round(sum(a[key] == b[key] for key in common) / len(common), 3) if common else None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="tessera vs the sequential reference loop")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--object-store-mb", type=int, default=1024)
    parser.add_argument("--workdir", type=Path, default=BENCH_DIR / "e2e")
    parser.add_argument("--reference-n", type=int, default=DEFAULT_POOL,
                        help="run the reference loop on the first this many rows, the distinct files once each (0: all N)")
    args = parser.parse_args(argv)

    args.workdir.mkdir(parents=True, exist_ok=True)
    host = machine()
    manifest = make_corpus(BENCH_DIR / "corpus", args.n, E2E_CORPUS)
    sequential = reference_loop(manifest, args.workdir / "reference.parquet", args.prompt, args.max_new_tokens, args.reference_n)
    pipeline = run_pipeline(args.workdir, manifest, args.prompt, args.max_new_tokens, args.object_store_mb)
    ratio = round(pipeline["items_per_s"] / sequential["items_per_s"], 2)
    result = {
        "benchmark": "e2e",
        "n": args.n,
        "max_new_tokens": args.max_new_tokens,
        "prompt": args.prompt,
        "corpus": describe(plan_pool(E2E_CORPUS), args.n),
        "machine": host,
        "sequential": {k: v for k, v in sequential.items() if k != "texts"},
        "tessera": {k: v for k, v in pipeline.items() if k != "texts"},
        "speedup": ratio,
        "goal_speedup": 4.0,
        "same_text_share": same_text_share(sequential["texts"], pipeline["texts"]),
    }
    write_result(result, "e2e")
    emit(result, table_rows(result))
    return result


def table_rows(result: dict) -> list[tuple[str, str]]:
    seq, tes, stages = result["sequential"], result["tessera"], result["tessera"]["stages"]
    steps = ", ".join(f"{step} {value:.1f}" for step, value in seq["seconds_by_step"].items())
    lat = stages["latency_ms"]

    def pct(stage: str) -> str:
        return f"p50 {lat[stage]['p50']} ms, p95 {lat[stage]['p95']} ms"

    return [
        ("items", f"{result['n']} images ({result['corpus']['image_megapixels_mean']} MP mean), max_new_tokens {result['max_new_tokens']}, greedy"),
        ("(a) reference loop", f"{seq['items_per_s']:.2f} items/s  ({seq['wall_s']:.1f} s)" if seq["items"] == result["n"] else
                               f"{seq['items_per_s']:.2f} items/s  (ran the first {seq['items']} of the {result['n']} items in "
                               f"{seq['wall_s']:.1f} s: {seq['whole_wall_s']:.0f} s for all, load once + per-item time)"),
        ("    seconds by step", steps),
        ("(b) tessera run", f"{tes['items_per_s']:.2f} items/s  ({tes['wall_s']:.1f} s, invariant {'ok' if tes['invariant_ok'] else 'BROKEN'})"),
        ("speedup (b)/(a)", f"{result['speedup']:.2f}x  (goal {result['goal_speedup']:.0f}x)"),
        ("(b) start-up, plan, exit", f"{stages['startup_and_other_s']} s"),
        ("(b) streaming job", f"{stages['stream_s']} s wall"),
        ("      fetch", f"{stages['fetch_cpu_s']} s summed over rows; {pct('fetch_ms')}"),
        ("      decode + processor", f"{stages['decode_and_processor_cpu_s']} s summed over rows; {pct('decode_ms')}"),
        ("      infer", f"{pct('infer_ms')} per generate() batch"),
        ("(b) invariant check", f"{stages['invariant_check_s']} s"),
        ("same text (a) vs (b)", f"{result['same_text_share']} (JPEG draft decoding changes a few pixels)"),
        ("(b) run report", tes["report"]),
        ("machine", f"{result['machine']['cpus']} CPUs, GPU {result['machine']['gpu']}, load {result['machine']['load_avg_1m_at_start']} at start"),
    ]


if __name__ == "__main__":
    main()
