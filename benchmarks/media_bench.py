"""The CPU stage's media throughput against the bare limit, on one core.

Images: a corpus of mixed JPEGs (640x480 .. 4000x3000) through the real CPU stage of the
embedded tiny model (`Preparer.prepare_rows`: read the file, decode with JPEG draft, tile,
prompt, tokens, serialise), with and without process isolation, and with the model's own
processor doing the tiling instead of pipeline/tiling.py; against the bare limit: Pillow
opening and draft-decoding the same files to the same target, and nothing else. Also the
bytes per image that cross to the actor.

Video: frames/s of sampling (1 fps, keyframe seeking) against decoding every frame.

Everything runs pinned to one core, in interleaved rounds; the best round of each counts
(the machine is shared). It prints numbers and asserts nothing about time.

    .venv/bin/python -m benchmarks.media_bench [--images 40] [--rounds 3] [--no-video]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(os.environ.get("TESSERA_BENCH_DIR", REPO / ".cache" / "bench"))
JSON_PREFIX = "BENCH_JSON "  # one machine-readable line per benchmark (benchmarks/common.py's convention)
SIZES = [(640, 480), (800, 600), (1024, 768), (1280, 720), (1600, 1200), (1920, 1080), (2048, 1536), (2592, 1944), (3000, 2000), (4000, 3000)]


def pin_to_one_core() -> int:
    core = sorted(os.sched_getaffinity(0))[-1]
    os.sched_setaffinity(0, {core})  # children (the isolated decoder) inherit it
    return core


def jpeg_corpus(count: int) -> list[Path]:
    from jobs.sample import encode_image, synthetic_image

    folder = BENCH_DIR / "media-jpegs"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        width, height = SIZES[index % len(SIZES)]
        if index // len(SIZES) % 2:
            width, height = height, width  # portrait too
        path = folder / f"{index:03d}-{width}x{height}.jpg"
        if not path.exists():
            path.write_bytes(encode_image(synthetic_image(width, height, seed=index), "jpeg", quality=90))
        paths.append(path)
    return paths


def make_preparer(isolation: str, tmp: Path):
    from actors.loading import resolve_model
    from pipeline.prepare import PrepareContext, Preparer
    from schemas.spec import parse_spec
    from schemas.tasks import resolve_task

    spec = parse_spec(
        {
            "name": "media-bench",
            "input": {"manifest": str(tmp / "m.jsonl")},
            "output": {"path": str(tmp / "out")},
            "task": {"preset": "moderation"},
            "media": {"isolation": isolation},
        }
    )
    return Preparer(PrepareContext(run_id="bench", spec=spec, model=resolve_model(spec.model), task=resolve_task(spec.task)))


def manifest_row(path: Path) -> dict:
    return {
        "id": path.stem, "uris": [str(path)], "media_type": None, "fields_json": json.dumps({}),
        "source": "bench", "position": 0, "error_code": None, "error_message": None,
    }


class Clock:
    """Wall and CPU seconds of a block; CPU counts this process and the isolated decoder
    child (when there is one), so "per core" is images per CPU-second on a shared machine."""

    def __init__(self, preparer=None):
        self.preparer = preparer

    def _cpu(self) -> float:
        total = time.process_time()
        isolated = getattr(getattr(self.preparer, "decoder", None), "isolated", None)
        child = getattr(isolated, "_child", None)
        if child is not None and child.poll() is None:
            import psutil

            times = psutil.Process(child.pid).cpu_times()
            total += times.user + times.system
        return total

    def __enter__(self) -> "Clock":
        self._wall, self._cpu0 = time.perf_counter(), self._cpu()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = self._cpu() - self._cpu0


def time_limit(paths: list[Path], plan) -> Clock:
    """The bare limit: Pillow opens and draft-decodes each file to the stage's target."""
    from PIL import Image

    with Clock() as clock:
        for path in paths:
            with Image.open(path) as image:
                image.draft("RGB", plan.source_size(*image.size))
                image.load()
    return clock


def time_full_decode(paths: list[Path]) -> Clock:
    from PIL import Image

    with Clock() as clock:
        for path in paths:
            with Image.open(path) as image:
                image.load()
    return clock


def time_stage(preparer, paths: list[Path]) -> tuple[Clock, list[dict]]:
    rows = [manifest_row(path) for path in paths]
    with Clock(preparer) as clock:
        out = [prepared for row in rows for prepared in preparer.prepare_rows(row)]
    failed = [row for row in out if row["error_code"]]
    if failed:
        raise RuntimeError(f"{len(failed)} rows failed, e.g. {failed[0]['error_message']}")
    return clock, out


def image_benchmark(count: int, rounds: int) -> dict:
    from pipeline.decode import Shaping
    from pipeline.prepare import MediaDecoder

    paths = jpeg_corpus(count)
    tmp = Path(tempfile.mkdtemp())
    stages = {"stage": make_preparer("none", tmp), "stage_isolated": make_preparer("process", tmp)}
    with_processor = make_preparer("none", tmp)  # the model's own processor tiles (no tiling.py)
    with_processor.decoder = MediaDecoder(with_processor.spec.media, Shaping(with_processor.decoder.shaping.frame_size, None))
    stages["stage_processor_tiling"] = with_processor
    plan = stages["stage"].decoder.shaping.plan
    for preparer in stages.values():  # warm up: page cache, the decoder process, lazy imports
        time_stage(preparer, paths[:3])
    names = ["limit", "full_decode", *stages]
    wall = {name: float("inf") for name in names}
    cpu = {name: float("inf") for name in names}
    rows = None

    def keep(name: str, clock: Clock) -> None:
        wall[name], cpu[name] = min(wall[name], clock.wall), min(cpu[name], clock.cpu)

    for _ in range(rounds):
        keep("limit", time_limit(paths, plan))
        keep("full_decode", time_full_decode(paths))
        for name, preparer in stages.items():
            clock, out = time_stage(preparer, paths)
            keep(name, clock)
            rows = rows or out
    for preparer in stages.values():
        preparer.close()
    per_cpu_s = {name: round(count / seconds, 1) for name, seconds in cpu.items()}
    per_wall_s = {name: round(count / seconds, 1) for name, seconds in wall.items()}
    pixel_bytes = [row["pixel_bytes"] for row in rows]
    blob_bytes = [len(row["model_inputs"]) for row in rows]
    full_rgb = [int(p.stem.split("-")[1].split("x")[0]) * int(p.stem.split("x")[1]) * 3 for p in paths]
    return {
        "benchmark": "media_images",
        "images": count,
        "rounds": rounds,
        "images_per_cpu_s": per_cpu_s,
        "images_per_wall_s_one_core": per_wall_s,
        "ratio_stage_to_limit": round(per_cpu_s["stage"] / per_cpu_s["limit"], 3),
        "ratio_isolated_stage_to_limit": round(per_cpu_s["stage_isolated"] / per_cpu_s["limit"], 3),
        "ratio_processor_tiling_to_limit": round(per_cpu_s["stage_processor_tiling"] / per_cpu_s["limit"], 3),
        "wall_ratio_stage_to_limit": round(per_wall_s["stage"] / per_wall_s["limit"], 3),
        "wall_ratio_isolated_stage_to_limit": round(per_wall_s["stage_isolated"] / per_wall_s["limit"], 3),
        "isolation_overhead_cpu_ms_per_image": round((cpu["stage_isolated"] - cpu["stage"]) / count * 1000, 3),
        "cpu_ms_per_image": {name: round(seconds / count * 1000, 3) for name, seconds in cpu.items()},
        "pixel_bytes_to_actor_mean": round(statistics.fmean(pixel_bytes)),
        "pixel_bytes_to_actor_max": max(pixel_bytes),
        "model_inputs_bytes_mean": round(statistics.fmean(blob_bytes)),
        "float32_equivalent_bytes_mean": round(statistics.fmean(pixel_bytes) * 4),
        "full_size_rgb_bytes_mean": round(statistics.fmean(full_rgb)),
    }


def encode_long_video(path: Path, seconds: int, fps: int, size: tuple[int, int], gop_s: float) -> bytes:
    """A real H.264 file (cached): a moving square over a gradient, keyframe every gop_s."""
    if path.exists():
        return path.read_bytes()
    from jobs.sample import encode_video

    data = encode_video(seconds=seconds, fps=fps, size=size, seed=7, keyframe_every_s=gop_s)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def decode_every_frame(data: bytes, times: list[float], frame_size: tuple[int, int]) -> tuple[Clock, int, int]:
    """The naive way: decode every frame from the start, convert the ones at the sample times."""
    import av

    clock = Clock().__enter__()
    decoded = taken = 0
    pending = list(times)
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.thread_count = 2
        for frame in container.decode(stream):
            decoded += 1
            while pending and frame.time + 1e-6 >= pending[0]:
                pending.pop(0)
                frame.reformat(width=frame_size[0], height=frame_size[1], format="rgb24").to_image()
                taken += 1
    clock.__exit__()
    return clock, decoded, taken


def video_benchmark(rounds: int) -> dict:
    from pipeline.video import decode_video, sample_times
    from schemas.spec import VideoSpec

    cases = {
        # (seconds, fps, size, keyframe interval)
        "60s_640x360_30fps": (60, 30, (640, 360), 2.0),
        "600s_320x180_10fps": (600, 10, (320, 180), 5.0),
    }
    spec = VideoSpec()  # 1 fps, at most 60 s / 60 frames, uniform over longer videos
    results = {}
    for name, (seconds, fps, size, gop_s) in cases.items():
        data = encode_long_video(BENCH_DIR / "media-videos" / f"{name}.mp4", seconds, fps, size, gop_s)
        sample = {"wall": float("inf"), "cpu": float("inf")}
        every = dict(sample)
        for _ in range(rounds):
            with Clock() as clock:
                video = decode_video(data, spec, (56, 56))
            sample = {"wall": min(sample["wall"], clock.wall), "cpu": min(sample["cpu"], clock.cpu)}
            times = sample_times(video.duration, spec.fps, spec.max_seconds, spec.max_frames, spec.long_policy)
            clock, decoded_all, _ = decode_every_frame(data, times, (56, 56))
            every = {"wall": min(every["wall"], clock.wall), "cpu": min(every["cpu"], clock.cpu)}
        results[name] = {
            "sampled_frames": len(video.pictures),
            "sampling_decoded_frames": video.decoded_frames,
            "sampling_seeks": video.seeks,
            "sampling_cpu_s": round(sample["cpu"], 3),
            "sampling_wall_s": round(sample["wall"], 3),
            "sampled_frames_per_cpu_s": round(len(video.pictures) / sample["cpu"], 1),
            "decode_all_frames": decoded_all,
            "decode_all_cpu_s": round(every["cpu"], 3),
            "decode_all_wall_s": round(every["wall"], 3),
            "decode_all_frames_per_cpu_s": round(decoded_all / every["cpu"], 1),
            "decode_all_sampled_frames_per_cpu_s": round(len(times) / every["cpu"], 1),
            "speedup_cpu": round(every["cpu"] / sample["cpu"], 2),
        }
    return {"benchmark": "media_video", "rounds": rounds, "videos": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-video", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("TESSERA_CACHE_DIR", str(REPO / ".cache" / "tessera-test"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    core = pin_to_one_core()
    print(f"pinned to core {core}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    images = image_benchmark(args.images, args.rounds)
    report(images)
    if not args.no_video:
        report(video_benchmark(args.rounds))


def report(result: dict) -> None:
    print(f"\n== {result['benchmark']} ==")
    print(json.dumps(result, indent=2))
    print(JSON_PREFIX + json.dumps(result, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
