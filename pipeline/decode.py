"""Bytes -> RGB images the model will see: images (Pillow), videos (PyAV), PDFs (pypdfium2).

The kind is sniffed from the bytes, not the extension. Every failure is an `ItemError` with
a decode/video/pdf code; nothing else escapes.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

from PIL import Image, ImageOps

from schemas.errors import ErrorCode, ItemError
from schemas.spec import MediaSpec

# Pillow's own bomb check would raise a warning/exception at its own limit; ours is the spec's.
Image.MAX_IMAGE_PIXELS = None


@dataclass
class DecodedMedia:
    kind: str  # "image" | "video" | "pdf"
    images: list[Image.Image] = field(default_factory=list)  # RGB, in prompt order
    n_frames: int | None = None
    n_pages: int | None = None


def sniff_kind(data: bytes) -> str | None:
    head = data[:64]
    if head.startswith(b"%PDF"):
        return "pdf"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        return "image" if brand in (b"avif", b"avis", b"heic", b"heix", b"mif1", b"msf1") else "video"
    if head.startswith(b"\x1a\x45\xdf\xa3"):  # Matroska / WebM
        return "video"
    if head.startswith((b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")):
        return "image"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "image"
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "video"
    return None


def decode(data: bytes, media_type: str | None, media: MediaSpec, max_side: int | None = None) -> DecodedMedia:
    kind = sniff_kind(data) or media_type
    if kind == "image":
        return DecodedMedia(kind="image", images=[decode_image(data, media, max_side)])
    if kind == "video":
        frames = decode_video(data, media)
        return DecodedMedia(kind="video", images=frames, n_frames=len(frames))
    if kind == "pdf":
        pages = decode_pdf(data, media)
        return DecodedMedia(kind="pdf", images=pages, n_pages=len(pages))
    raise ItemError(ErrorCode.DECODE_UNSUPPORTED, "the bytes are not an image, video or PDF format we read")


def decode_image(data: bytes, media: MediaSpec, max_side: int | None = None) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as exc:  # Pillow raises many types for bad bytes
        raise ItemError(ErrorCode.DECODE_CORRUPT, f"cannot open image: {exc}") from None
    width, height = image.size
    if width * height > media.image.hard_max_pixels:
        raise ItemError(
            ErrorCode.DECODE_TOO_MANY_PIXELS,
            f"image declares {width}x{height} = {width * height} pixels, over media.image.hard_max_pixels",
        )
    try:
        image = ImageOps.exif_transpose(image)
        image = to_rgb(image)
    except Exception as exc:
        raise ItemError(ErrorCode.DECODE_CORRUPT, f"cannot decode image: {exc}") from None
    return limit_pixels(image, media.image.max_pixels)


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def limit_pixels(image: Image.Image, max_pixels: int | None) -> Image.Image:
    if not max_pixels or image.width * image.height <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / (image.width * image.height))
    size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def decode_video(data: bytes, media: MediaSpec) -> list[Image.Image]:
    import av

    spec = media.video
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise ItemError(ErrorCode.VIDEO_NO_VIDEO_STREAM, "the file has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            duration = _duration_seconds(container, stream)
            if duration is not None and duration > spec.hard_max_seconds:
                raise ItemError(
                    ErrorCode.VIDEO_TOO_LONG,
                    f"video is {duration:.0f} s long, over media.video.hard_max_seconds={spec.hard_max_seconds:.0f}",
                )
            times = sample_times(duration or spec.max_seconds, spec.fps, spec.max_seconds, spec.max_frames, spec.long_policy)
            frames = _frames_at(container, stream, times)
    except ItemError:
        raise
    except Exception as exc:
        raise ItemError(ErrorCode.DECODE_CORRUPT, f"cannot decode video: {type(exc).__name__}: {exc}") from None
    if not frames:
        raise ItemError(ErrorCode.DECODE_CORRUPT, "the video has no decodable frames")
    return frames


def _duration_seconds(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000
    return None


def sample_times(duration: float, fps: float, max_seconds: float, max_frames: int, policy: str) -> list[float]:
    """Sample times in seconds: `fps` over the first `max_seconds`, or spread uniformly over
    a longer video (policy `uniform`), never more than `max_frames`."""
    step = 1.0 / fps
    count = max(1, min(max_frames, int(min(duration, max_seconds) * fps) or 1))
    if policy == "uniform" and duration > max_seconds:
        step = duration / count
    return [i * step for i in range(count)]


def _frames_at(container, stream, times: list[float]) -> list[Image.Image]:
    frames: list[Image.Image] = []
    pending = list(times)
    for frame in container.decode(stream):
        if frame.time is None:
            continue
        while pending and frame.time + 1e-6 >= pending[0]:
            pending.pop(0)
            if not frames or frames[-1] is not frame:
                frames.append(frame.to_image())
        if not pending:
            break
    return frames


def decode_pdf(data: bytes, media: MediaSpec) -> list[Image.Image]:
    try:
        import pypdfium2 as pdfium
    except ImportError:
        raise ItemError(ErrorCode.DECODE_UNSUPPORTED, "PDF support needs the 'pdf' extra (pypdfium2)") from None
    try:
        document = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as exc:
        if "password" in str(exc).lower():
            raise ItemError(ErrorCode.PDF_ENCRYPTED, "the PDF is encrypted") from None
        raise ItemError(ErrorCode.DECODE_CORRUPT, f"cannot open PDF: {exc}") from None
    pages = []
    scale = media.pdf.dpi / 72
    for index in range(min(len(document), media.pdf.max_pages)):
        pages.append(document[index].render(scale=scale).to_pil().convert("RGB"))
    return pages
