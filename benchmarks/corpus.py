"""A deterministic benchmark corpus: N manifest rows of mixed media, made with real encoders.

JPEGs from 640x480 to 4000x3000 (a quarter of them portrait), PNGs up to 1920x1080 (PNG is
the screenshot format; a 12-megapixel PNG takes seconds to encode), and short videos
(H.264 in MP4, VP9 in WebM). Everything follows from one seed.

Rows reuse a pool of distinct media files (`pool`, 500 by default): row i points at file
i mod pool under its own id. Every row is still fetched, decoded and inferred on its own,
so the work per row is real; the pool only keeps a 20,000-row corpus from taking longer to
write than the benchmark takes to run. The files are cached under `root` keyed by the
parameters that shape them, so a second benchmark run reuses them.

`python -m benchmarks.corpus DIR --n 2000` writes one; `--s3` uploads it to a local S3
endpoint (moto) and writes an s3:// manifest.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from jobs.sample import encode_image, encode_video, synthetic_image

JPEG_SIZES = [
    (640, 480), (800, 600), (1024, 768), (1280, 720), (1600, 1200),
    (1920, 1080), (2048, 1536), (2592, 1944), (3264, 2448), (4000, 3000),
]  # fmt: skip
PNG_SIZES = [(640, 480), (800, 600), (1024, 768), (1280, 720), (1920, 1080)]
VIDEO_SIZES = [(320, 240), (640, 360)]
DEFAULT_POOL = 500


@dataclass(frozen=True)
class CorpusSpec:
    """What decides the media files (not N: any N draws from the same pool)."""

    seed: int = 2026
    pool: int = DEFAULT_POOL
    png_share: float = 0.2
    video_share: float = 0.1

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


@dataclass(frozen=True)
class MediaPlan:
    name: str
    kind: str  # jpeg | png | video
    size: tuple[int, int]
    seed: int


def plan_pool(spec: CorpusSpec) -> list[MediaPlan]:
    """The pool's files, drawn from the seed: kind, size and a per-file seed."""
    rng = random.Random(spec.seed)
    plans = []
    for index in range(spec.pool):
        draw = rng.random()
        kind = "video" if draw < spec.video_share else "png" if draw < spec.video_share + spec.png_share else "jpeg"
        sizes = {"jpeg": JPEG_SIZES, "png": PNG_SIZES, "video": VIDEO_SIZES}[kind]
        width, height = rng.choice(sizes)
        if kind != "video" and rng.random() < 0.25:
            width, height = height, width
        ext = {"jpeg": "jpg", "png": "png", "video": "mp4" if index % 2 == 0 else "webm"}[kind]
        plans.append(MediaPlan(f"{kind}-{index:05d}.{ext}", kind, (width, height), spec.seed * 100_000 + index))
    return plans


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """A full-size picture that decodes like a photo, made in a fraction of the time.

    The gradients and shapes are drawn at an eighth of the size and scaled up; fine noise at
    full size gives the JPEG the high-frequency detail (and entropy-decoding work) a camera
    picture has."""
    small = synthetic_image(max(8, width // 8), max(8, height // 8), seed)
    image = small.resize((width, height), Image.Resampling.BILINEAR)
    noise = np.random.default_rng(seed).integers(0, 24, size=(height, width, 1), dtype=np.uint8)
    pixels = np.asarray(image, dtype=np.uint8) // 8 * 7 + noise  # stays within 0..255
    image = Image.fromarray(pixels)
    ImageDraw.Draw(image).text((width // 20, height // 20), f"item {seed}", fill=(0, 0, 0))
    return image


def encode(plan: MediaPlan) -> bytes:
    if plan.kind == "video":
        webm = plan.name.endswith(".webm")
        return encode_video(
            seconds=2 + plan.seed % 3, fps=10, size=plan.size, seed=plan.seed,
            codec="libvpx-vp9" if webm else "libx264", container="webm" if webm else "mp4",
        )  # fmt: skip
    if plan.kind == "png":
        return encode_image(photo_like(*plan.size, plan.seed), "png", compress_level=1)
    return encode_image(photo_like(*plan.size, plan.seed), "jpeg", quality=88)


def _write_one(args: tuple[MediaPlan, str]) -> None:
    plan, folder = args
    target = Path(folder) / plan.name
    if target.exists():
        return
    partial = target.with_suffix(target.suffix + ".part")
    partial.write_bytes(encode(plan))
    os.replace(partial, target)  # a killed generator never leaves a half-written file behind


def write_pool(root: Path, spec: CorpusSpec, workers: int | None = None) -> tuple[Path, list[MediaPlan]]:
    """Write the pool's files under root/pool-<key>/ (skipping those already there)."""
    folder = root / f"pool-{spec.key}"
    folder.mkdir(parents=True, exist_ok=True)
    plans = plan_pool(spec)
    missing = [(plan, str(folder)) for plan in plans if not (folder / plan.name).exists()]
    if missing:
        with ProcessPoolExecutor(max_workers=workers or min(2, os.cpu_count() or 1)) as pool:
            list(pool.map(_write_one, missing, chunksize=4))
    return folder, plans


def write_manifest(path: Path, n: int, plans: list[MediaPlan], uri_of) -> Path:
    """N rows, row i -> file i mod pool, ids unique; `uri_of(plan)` says where the file lives."""
    with open(path, "w") as out:
        for index in range(n):
            plan = plans[index % len(plans)]
            row = {"id": f"item-{index:07d}", "uri": uri_of(plan), "source_file": plan.name}
            if plan.kind == "video":
                row["media_type"] = "video"
            out.write(json.dumps(row) + "\n")
    return path


def make_corpus(root: str | Path, n: int, spec: CorpusSpec = CorpusSpec()) -> Path:
    """Media under root/pool-<key>/ and root/manifest-<key>-<n>.jsonl; returns the manifest."""
    root = Path(root)
    folder, plans = write_pool(root, spec)
    return write_manifest(root / f"manifest-{spec.key}-{n}.jsonl", n, plans, lambda plan: str(folder / plan.name))


def upload_to_s3(root: str | Path, n: int, spec: CorpusSpec, endpoint_url: str, bucket: str) -> str:
    """The same corpus in s3://bucket/ on `endpoint_url`; returns the s3:// manifest uri.
    Credentials come from the environment (AWS_ACCESS_KEY_ID, ...), as for tessera itself."""
    import s3fs

    root = Path(root)
    folder, plans = write_pool(root, spec)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint_url})
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    prefix = f"{bucket}/pool-{spec.key}"
    for plan in plans:
        if not fs.exists(f"{prefix}/{plan.name}"):
            fs.put_file(str(folder / plan.name), f"{prefix}/{plan.name}")
    local = write_manifest(root / f"manifest-{spec.key}-{n}-s3.jsonl", n, plans, lambda plan: f"s3://{prefix}/{plan.name}")
    remote = f"s3://{bucket}/manifest-{spec.key}-{n}.jsonl"
    fs.put_file(str(local), remote)
    return remote


def describe(plans: list[MediaPlan], n: int) -> dict:
    """What the rows hold, for the benchmark's JSON output."""
    kinds: dict[str, int] = {}
    pixels = []
    for index in range(n):
        plan = plans[index % len(plans)]
        kinds[plan.kind] = kinds.get(plan.kind, 0) + 1
        if plan.kind != "video":
            pixels.append(plan.size[0] * plan.size[1])
    return {
        "rows": n,
        "distinct_files": min(n, len(plans)),
        "rows_by_kind": kinds,
        "image_megapixels_mean": round(float(np.mean(pixels)) / 1e6, 2) if pixels else None,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=CorpusSpec.seed)
    parser.add_argument("--pool", type=int, default=DEFAULT_POOL)
    parser.add_argument("--png-share", type=float, default=CorpusSpec.png_share)
    parser.add_argument("--video-share", type=float, default=CorpusSpec.video_share)
    parser.add_argument("--s3", metavar="ENDPOINT_URL", help="also upload to this S3 endpoint (bucket tessera-bench)")
    args = parser.parse_args(argv)
    spec = CorpusSpec(seed=args.seed, pool=args.pool, png_share=args.png_share, video_share=args.video_share)
    if args.s3:
        print(upload_to_s3(args.root, args.n, spec, args.s3, "tessera-bench"))
    else:
        print(make_corpus(args.root, args.n, spec))


if __name__ == "__main__":
    main()
