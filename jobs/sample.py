"""A small, deterministic sample corpus made with real encoders: images of several sizes and
formats (Pillow), short videos (PyAV: H.264, VP9), a PDF, a few broken items, a manifest.

`tessera sample DIR` writes it; tests and benchmarks use the same generators.
"""

from __future__ import annotations

import io
import json
import random
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZES = [(320, 240), (640, 480), (800, 600), (1280, 720), (1024, 1024), (480, 640), (1920, 1080), (3000, 2000)]
IMAGE_FORMATS = ["jpeg", "png", "webp", "gif", "bmp", "tiff"]
_EXT = {"jpeg": "jpg", "png": "png", "webp": "webp", "gif": "gif", "bmp": "bmp", "tiff": "tif"}


def synthetic_image(width: int, height: int, seed: int) -> Image.Image:
    """A picture with gradients, shapes and text: compressible like a photo, not like noise."""
    rng = random.Random(seed)
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    base = [rng.uniform(0.2, 1.0) for _ in range(3)]
    channels = [
        (255 * (base[c] * (0.5 + 0.5 * np.sin(6.28 * (x * (c + 1) + y * rng.uniform(0.5, 2)))))).astype(np.uint8)
        for c in range(3)
    ]
    image = Image.fromarray(np.stack(channels, axis=-1))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1, y1 = x0 + rng.randrange(width // 8 + 1, width // 3 + 2), y0 + rng.randrange(height // 8 + 1, height // 3 + 2)
        color = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=color)
    draw.text((width // 20, height // 20), f"sample {seed}", fill=(0, 0, 0))
    return image


def encode_image(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    if fmt == "jpeg":
        kwargs.setdefault("quality", 90)
    if fmt == "gif":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE)
    image.save(buffer, format=fmt.upper(), **kwargs)
    return buffer.getvalue()


def encode_video(
    seconds: float = 4.0, fps: int = 10, size: tuple[int, int] = (320, 240), codec: str = "libx264",
    container: str = "mp4", seed: int = 0, keyframe_every_s: float = 1.0,
) -> bytes:
    """A real video: a moving square over a gradient, encoded by PyAV (H.264: a keyframe
    every `keyframe_every_s` seconds)."""
    import av

    width, height = size
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            gop = str(max(1, int(keyframe_every_s * fps)))
            stream.options = {"preset": "ultrafast", "g": gop, "keyint_min": gop}
        stream.time_base = Fraction(1, fps)
        background = np.asarray(synthetic_image(width, height, seed))
        for index in range(int(seconds * fps)):
            frame = background.copy()
            x = (index * 7) % max(1, width - 40)
            frame[20:60, x : x + 40] = (255, 0, 0)
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            video_frame.pts = index
            for packet in stream.encode(video_frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buffer.getvalue()


def encode_pdf(pages: int = 2, size: tuple[int, int] = (612, 792), seed: int = 0) -> bytes:
    images = []
    for page in range(pages):
        image = Image.new("RGB", size, "white")
        draw = ImageDraw.Draw(image)
        draw.text((60, 60), f"INVOICE No. {1000 + seed}-{page + 1}", fill="black")
        draw.text((60, 100), "Date: 2026-11-22   Seller: Example GmbH   Buyer: Sample Ltd", fill="black")
        for row in range(8):
            draw.text((60, 160 + 24 * row), f"Item {row + 1}      qty {row + 2}      {12.5 * (row + 1):.2f} EUR", fill="black")
        images.append(image)
    buffer = io.BytesIO()
    images[0].save(buffer, format="PDF", save_all=True, append_images=images[1:], resolution=72)
    return buffer.getvalue()


def write_sample_corpus(root: str | Path, n_images: int = 32, n_videos: int = 4) -> Path:
    """Write media and `manifest.jsonl` under `root`; returns the manifest path."""
    root = Path(root)
    media = root / "media"
    media.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(n_images):
        width, height = IMAGE_SIZES[index % len(IMAGE_SIZES)]
        fmt = IMAGE_FORMATS[index % len(IMAGE_FORMATS)]
        name = f"img-{index:03d}.{_EXT[fmt]}"
        (media / name).write_bytes(encode_image(synthetic_image(width, height, index), fmt))
        rows.append({"id": f"img-{index:03d}", "uri": f"media/{name}", "context": f"uploaded by user {index % 7}"})
    for index in range(n_videos):
        webm = index % 2 == 1
        name = f"vid-{index:02d}.{'webm' if webm else 'mp4'}"
        data = encode_video(
            seconds=3 + index, codec="libvpx-vp9" if webm else "libx264", container="webm" if webm else "mp4", seed=100 + index
        )
        (media / name).write_bytes(data)
        rows.append({"id": f"vid-{index:02d}", "uri": f"media/{name}", "media_type": "video"})
    (media / "doc-00.pdf").write_bytes(encode_pdf(2, seed=7))
    rows.append({"id": "doc-00", "uri": "media/doc-00.pdf", "media_type": "pdf"})
    # A few broken items: each must come out as an error row with its own code.
    good = encode_image(synthetic_image(640, 480, 999), "jpeg")
    (media / "broken-truncated.jpg").write_bytes(good[: len(good) // 3])
    (media / "broken-not-an-image.jpg").write_bytes(b"this is a text file, not a JPEG\n" * 10)
    rows.append({"id": "broken-truncated", "uri": "media/broken-truncated.jpg"})
    rows.append({"id": "broken-not-an-image", "uri": "media/broken-not-an-image.jpg"})
    rows.append({"id": "missing-file", "uri": "media/does-not-exist.jpg"})
    rows.append({"uri": "media/img-000.jpg", "note": "this row has no id"})
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifest
