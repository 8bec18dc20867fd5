"""The measured inputs of docs/capacity.md: what the CPU side costs per image for the two
reference models, on this machine, with the pipeline's own decode and tiling code.

For 200 images of the benchmark corpus (JPEGs 640x480 to 4000x3000 and PNGs):

- MiniMax-VL-01: decode (JPEG draft to the size the tiling needs) + anyres tiling on its real
  grid (336-px tiles, the 28 grid points up to 2016x2016, at most 18 tiles, plus a
  thumbnail), `pipeline.tiling.AnyresPlan`; visual tokens from transformers' LLaVA-NeXT
  arithmetic (`_get_number_of_features`) for that grid.
- M2S-class: images capped at 1.8 megapixels, decoded (JPEG draft) and resized to one
  384x384 view for a SigLIP-style encoder (an assumption: M2S's exact encoder resolution is
  not published here); a Perceiver Resampler makes that a fixed 256 visual tokens.

Then the 100-million-image backfill worked through with jobs/estimate.py's rooflines. Prints
numbers, asserts nothing.

    python -m benchmarks.capacity
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from functools import partial
from types import SimpleNamespace

from PIL import Image

from benchmarks.common import BENCH_DIR, emit, machine, write_result
from benchmarks.corpus import CorpusSpec, make_corpus
from jobs.estimate import ROOFLINES
from pipeline.images import decode_image
from pipeline.tiling import AnyresPlan
from schemas.spec import ImageSpec

MINIMAX_TILE = 336
MINIMAX_GRID = tuple((h * MINIMAX_TILE, w * MINIMAX_TILE) for h in range(1, 7) for w in range(1, 7) if h * w <= 18)
M2S_SIDE = 384
M2S_MAX_PIXELS = 1_800_000
M2S_VISUAL_TOKENS = 256
BACKFILL_ITEMS = 100_000_000
# The moderation preset's prompt in a chat template, and its JSON answer (10 categories with a
# flag and a confidence, a verdict, a rationale of <= 240 characters: ~730 characters), at an
# assumed ~3.3 characters per token for a 100k-vocabulary BPE.
TEXT_TOKENS = 220
OUTPUT_TOKENS = 220


def minimax_plan() -> AnyresPlan:
    return AnyresPlan(grid=MINIMAX_GRID, tile=MINIMAX_TILE, thumbnail=(MINIMAX_TILE, MINIMAX_TILE))


def minimax_visual_tokens(width: int, height: int) -> int:
    """transformers' LLaVA-NeXT feature count for MiniMax-VL-01's grid: unpadded grid
    features plus one newline per row, plus 24x24 = 576 for the thumbnail."""
    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

    arithmetic = SimpleNamespace(
        image_processor=SimpleNamespace(image_grid_pinpoints=[list(p) for p in MINIMAX_GRID]),
        patch_size=14,
        num_additional_image_tokens=0,
    )
    arithmetic._get_unpadded_features = partial(LlavaNextProcessor._get_unpadded_features, arithmetic)
    return LlavaNextProcessor._get_number_of_features(arithmetic, height, width, MINIMAX_TILE, MINIMAX_TILE)


def measure_minimax(data: bytes, plan: AnyresPlan) -> dict:
    started = time.process_time()  # CPU time: other load on the machine does not count
    picture = decode_image(data, ImageSpec(), target=plan.source_size)
    tiles = plan.tile_image(picture.image, picture.size)
    seconds = time.process_time() - started
    return {"cpu_s": seconds, "visual_tokens": minimax_visual_tokens(*picture.size), "tiles": len(tiles), "pixel_bytes": tiles.nbytes}


def measure_m2s(data: bytes) -> dict:
    started = time.process_time()  # CPU time: other load on the machine does not count
    picture = decode_image(data, ImageSpec(max_pixels=M2S_MAX_PIXELS), target=lambda w, h: (min(w, M2S_SIDE), min(h, M2S_SIDE)))
    view = picture.image.resize((M2S_SIDE, M2S_SIDE), Image.Resampling.BICUBIC)
    seconds = time.process_time() - started
    return {"cpu_s": seconds, "visual_tokens": M2S_VISUAL_TOKENS, "tiles": 1, "pixel_bytes": len(view.tobytes())}


def summarise(samples: list[dict]) -> dict:
    cpu = sorted(s["cpu_s"] for s in samples)
    return {
        "cpu_ms_mean": round(1000 * statistics.fmean(cpu), 2),
        "cpu_ms_p95": round(1000 * cpu[int(0.95 * (len(cpu) - 1))], 2),
        "visual_tokens_mean": round(statistics.fmean(s["visual_tokens"] for s in samples), 1),
        "visual_tokens_max": max(s["visual_tokens"] for s in samples),
        "tiles_mean": round(statistics.fmean(s["tiles"] for s in samples), 2),
        "pixel_bytes_mean": round(statistics.fmean(s["pixel_bytes"] for s in samples)),
        "media_bytes_mean": round(statistics.fmean(s["media_bytes"] for s in samples)),
    }


def backfill(model: str, measured: dict, gpus: int) -> dict:
    """The backfill on paper: the roofline for GPU time, the measurements for the CPU side."""
    line = ROOFLINES[model]
    replica_s = line.replica_seconds(measured["visual_tokens_mean"], TEXT_TOKENS, OUTPUT_TOKENS, images=1)
    gpu_s = replica_s * line.gpus_per_replica
    items_per_s = (gpus // line.gpus_per_replica) / replica_s
    return {
        "roofline": line.name,
        "gpu_s_per_item": round(gpu_s, 4),
        "gpu_hours": round(BACKFILL_ITEMS * gpu_s / 3600),
        "cpu_cores_per_gpu": round(measured["cpu_ms_mean"] / 1000 / gpu_s, 2),
        "gpus": gpus,
        "items_per_s": round(items_per_s, 1),
        "wall_days": round(BACKFILL_ITEMS / items_per_s / 86400, 2),
        "object_store_mb_per_s": round(measured["pixel_bytes_mean"] * items_per_s / 1e6, 1),
        "storage_read_mb_per_s": round(measured["media_bytes_mean"] * items_per_s / 1e6, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="measured CPU-side inputs of docs/capacity.md")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--gpus", type=int, default=64, help="GPUs to plan the backfill's wall time for")
    args = parser.parse_args(argv)

    host = machine()
    manifest = make_corpus(BENCH_DIR / "corpus", args.images, CorpusSpec(video_share=0.0))
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    plan = minimax_plan()
    minimax, m2s, megapixels = [], [], []
    for row in rows:
        data = open(row["uri"], "rb").read()
        with Image.open(io.BytesIO(data)) as image:
            megapixels.append(image.size[0] * image.size[1] / 1e6)
        minimax.append(dict(measure_minimax(data, plan), media_bytes=len(data)))
        m2s.append(dict(measure_m2s(data), media_bytes=len(data)))
    measured = {"minimax-vl-01": summarise(minimax), "m2s": summarise(m2s)}
    result = {
        "benchmark": "capacity",
        "images": len(rows),
        "megapixels_mean": round(statistics.fmean(megapixels), 2),
        "machine": host,
        "measured": measured,
        "assumed": {"text_tokens": TEXT_TOKENS, "output_tokens": OUTPUT_TOKENS, "items": BACKFILL_ITEMS},
        "backfill": {model: backfill(model, values, args.gpus) for model, values in measured.items()},
        "minimax_tokens_check": {f"{w}x{h}": minimax_visual_tokens(w, h) for w, h in ((336, 336), (640, 480), (1920, 1080))},
    }
    write_result(result, "capacity")
    emit(result, table_rows(result))
    return result


def table_rows(result: dict) -> list[tuple[str, str]]:
    rows = [("images", f"{result['images']} ({result['megapixels_mean']} MP mean), one core, this machine")]
    for model, values in result["measured"].items():
        plan = result["backfill"][model]
        rows += [
            (f"{model}: CPU/image", f"{values['cpu_ms_mean']} ms mean, {values['cpu_ms_p95']} ms p95 CPU time (decode + tiling)"),
            (f"{model}: tokens", f"{values['visual_tokens_mean']:.0f} visual mean ({values['tiles_mean']} tiles), "
             f"{values['pixel_bytes_mean'] / 1e6:.2f} MB uint8 pixels"),
            (f"{model}: backfill", f"{plan['gpu_s_per_item']} GPU-s/image, {plan['gpu_hours']:,} GPU-h, "
             f"{plan['cpu_cores_per_gpu']} cores/GPU, {plan['wall_days']} days on {plan['gpus']} GPUs, "
             f"{plan['object_store_mb_per_s']} MB/s object store, {plan['storage_read_mb_per_s']} MB/s storage reads"),
        ]  # fmt: skip
    rows.append(("MiniMax tokens check", ", ".join(f"{k}: {v}" for k, v in result["minimax_tokens_check"].items())))
    return rows


if __name__ == "__main__":
    main()
