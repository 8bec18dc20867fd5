"""Cost of schema-constrained decoding per generated token, with vs without the grammar.

The same batch of prepared rows through the tiny model's `generate`, greedy, once with the
moderation preset's grammar (xgrammar logits processor) and once unconstrained, both forced
to the same number of new tokens (the grammar run sets the budget: EOS is suppressed in the
free run by `min_new_tokens`). Reports ms per generated token of each and the overhead.
CPU time of this process (torch pinned to one thread) is reported next to wall time, so the
number means something on a busy machine.

    python -m benchmarks.constrained_bench [--rows 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _prepared_inputs(rows: int):
    from actors.adapters import adapter_for
    from actors.loading import load_processor
    from actors.tiny import ensure_tiny_model
    from jobs.sample import synthetic_image
    from pipeline.prepare import build_chat_text
    from schemas.presets import MODERATION_PROMPT

    path = ensure_tiny_model()
    processor = load_processor(str(path))
    adapter = adapter_for("llava_next")
    text = build_chat_text(processor, MODERATION_PROMPT, 1)
    images = [synthetic_image(640, 480, seed=i) for i in range(rows)]
    return path, [adapter.prepare(processor, [image], "image", text) for image in images]


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def run(rows: int, repeats: int) -> dict:
    from actors.backends import TransformersBackend
    from actors.loading import resolve_model
    from schemas.spec import ModelSpec, SamplingSpec, TaskSpec
    from schemas.tasks import resolve_task

    torch.set_num_threads(1)
    _, items = _prepared_inputs(rows)
    backend = TransformersBackend(resolve_model(ModelSpec()), ModelSpec())
    schema = resolve_task(TaskSpec(preset="moderation")).json_schema
    sampling = SamplingSpec()
    backend.generate(items[:1], sampling, 8, schema)  # compile the grammar, warm up

    constrained = []
    for _ in range(repeats):
        generations, wall, cpu = _timed(lambda: backend.generate(items, sampling, 2048, schema))
        constrained.append((sum(g.output_tokens for g in generations), wall, cpu))
    budget = max(g for g, _, _ in constrained) // rows + 1

    free = []
    for _ in range(repeats):
        def unconstrained():
            batch = backend.adapter.collate(items, backend.pad_id, backend.norm, backend.device, backend.dtype)
            with torch.inference_mode():
                out = backend.model.generate(
                    **batch, max_new_tokens=budget, min_new_tokens=budget, do_sample=False, pad_token_id=backend.pad_id
                )
            return out.shape[1] - batch["input_ids"].shape[1]

        new_tokens, wall, cpu = _timed(unconstrained)
        free.append((new_tokens * rows, wall, cpu))

    def per_token(runs):
        tokens = sum(t for t, _, _ in runs)
        return {
            "tokens": tokens,
            "wall_ms_per_token": round(1000 * sum(w for _, w, _ in runs) / tokens, 4),
            "cpu_ms_per_token": round(1000 * sum(c for _, _, c in runs) / tokens, 4),
        }

    with_grammar, without = per_token(constrained), per_token(free)
    return {
        "benchmark": "constrained_decoding",
        "rows_per_batch": rows,
        "with_grammar": with_grammar,
        "without_grammar": without,
        "overhead_cpu_ms_per_token": round(with_grammar["cpu_ms_per_token"] - without["cpu_ms_per_token"], 4),
        "overhead_ratio_cpu": round(with_grammar["cpu_ms_per_token"] / without["cpu_ms_per_token"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    result = run(args.rows, args.repeats)
    print(json.dumps(result))
    w, f = result["with_grammar"], result["without_grammar"]
    print(f"{'':24}{'tokens':>8}{'wall ms/tok':>14}{'cpu ms/tok':>12}")
    print(f"{'with grammar':24}{w['tokens']:>8}{w['wall_ms_per_token']:>14}{w['cpu_ms_per_token']:>12}")
    print(f"{'without grammar':24}{f['tokens']:>8}{f['wall_ms_per_token']:>14}{f['cpu_ms_per_token']:>12}")
    print(f"overhead: {result['overhead_cpu_ms_per_token']} cpu ms per token ({result['overhead_ratio_cpu']}x)")


if __name__ == "__main__":
    main()
