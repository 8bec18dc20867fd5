"""Image bytes -> one upright RGB picture, decoded no larger than the model needs.

Order matters for safety and speed: the header alone says the format and the pixel count,
so bombs are refused before a single pixel is allocated; the EXIF orientation and the
model's target size are known before decoding too, so a JPEG is decoded at the smallest DCT
scale (1/8, 1/4, 1/2) that is still at least the target. Only then are pixels decoded.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

from schemas.errors import ErrorCode, ItemError
from schemas.spec import ImageSpec, VideoSpec

# Our own limit (media.image.hard_max_pixels) is checked against the header; Pillow's global
# bomb check would fire at its own, different limit.
Image.MAX_IMAGE_PIXELS = None

# Formats Pillow may try. An allowlist, because Pillow can open formats we never want to meet
# from the internet (EPS runs Ghostscript). HEIF registers itself when pillow-heif is installed;
# AVIF is built into Pillow where it was compiled with libavif. (Camera MPO files open as JPEG.)
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "DIB", "TIFF", "AVIF", "HEIF")
_JPEG = ("JPEG", "MPO")
_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that makes the image upright (as ImageOps.exif_transpose).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = (5, 6, 7, 8)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")

# (width, height) the model is told -> the least (width, height) of pixels it needs.
Target = Callable[[int, int], tuple[int, int]]
# (width, height) -> the (width, height) the model's processor resizes it to, with a `resample`
# filter (actors/sizing.py); the picture is then decoded to exactly that size.
Fit = Callable[[int, int], tuple[int, int]]
# Video and animation frames: one (width, height) for all, or a Fit of each frame's upright size.
FrameSize = tuple[int, int] | Fit


@dataclass
class Picture:
    """One image the model sees. `size` is what the model is told (upright, after
    media.image.max_pixels, and after the processor's resize where the decoder does it for
    the processor: `fit`); `image` holds the pixels, RGB and upright, possibly smaller than
    `size` (draft decoding) but never smaller than the target that was asked for."""

    image: Image.Image
    size: tuple[int, int]  # (width, height)


def try_heif_plugin() -> None:
    """HEIC/HEIF through pillow-heif, when the optional `heif` extra is installed."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return
    register_heif_opener()


try_heif_plugin()
Image.init()
_OPENABLE = tuple(name for name in FORMATS if name in Image.OPEN)


_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def image_format(data: bytes) -> str | None:
    """The image format the first bytes announce (None: not one of ours, or ISO-BMFF)."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def webp_declared_size(data: bytes) -> tuple[int, int] | None:
    """Canvas size from a WebP's first chunk. Checked before Pillow opens a WebP, because
    libwebp's animation decoder allocates the whole canvas when it opens the file."""
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8 " and len(data) >= 30:
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    return None


def open_image(data: bytes, spec: ImageSpec) -> Image.Image:
    """Parse the header only (no pixels yet) and refuse what declares too many pixels."""
    fmt = image_format(data)
    declared = webp_declared_size(data) if fmt == "WEBP" else None
    if declared:
        _check_pixels("WEBP", *declared, spec)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Truncated File Read" or odd EXIF: judged at load()
            image = Image.open(io.BytesIO(data), formats=_OPENABLE)
    except Image.UnidentifiedImageError:
        if fmt:
            raise ItemError(ErrorCode.DECODE_CORRUPT, f"the bytes start like a {fmt} image but its header is broken") from None
        raise ItemError(ErrorCode.DECODE_UNSUPPORTED, "not an image format we read (" + ", ".join(_OPENABLE) + ")") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad headers
        raise ItemError(ErrorCode.DECODE_CORRUPT, f"cannot read the {fmt or 'image'} header: {_describe(exc)}") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise ItemError(ErrorCode.DECODE_CORRUPT, f"the image header declares an empty size {width}x{height}")
    _check_pixels(image.format, width, height, spec)
    return image


def _check_pixels(fmt: str, width: int, height: int, spec: ImageSpec) -> None:
    if width * height > spec.hard_max_pixels:
        raise ItemError(
            ErrorCode.DECODE_TOO_MANY_PIXELS,
            f"{fmt} header declares {width}x{height} = {width * height:,} pixels, over "
            f"media.image.hard_max_pixels = {spec.hard_max_pixels:,}; refused before decoding",
        )


def decode_image(data: bytes, spec: ImageSpec, target: Target | None = None, fit: Fit | None = None) -> Picture:
    """The first frame, upright and RGB. With a `target`, pixels may stay smaller than `size`
    (but not than the target); without one, the pixels are exactly `size`: the capped size,
    or what `fit` makes of it."""
    image = open_image(data, spec)
    return _picture(image, spec, target, fit)


def _picture(image: Image.Image, spec: ImageSpec, target: Target | None, fit: Fit | None = None) -> Picture:
    orientation = exif_orientation(image)
    stored_w, stored_h = image.size
    upright = (stored_h, stored_w) if orientation in _SWAPS_AXES else (stored_w, stored_h)
    capped = cap_pixels(upright, spec.max_pixels)
    size = fit(*capped) if fit else capped
    need = target(*capped) if target else (min(size[0], capped[0]), min(size[1], capped[1]))
    if image.format in _JPEG:
        draft_jpeg(image, upright, capped, need, orientation in _SWAPS_AXES)
    pixels = to_rgb(load(image))
    if orientation in _UPRIGHT:
        pixels = pixels.transpose(_UPRIGHT[orientation])
    if target is None and pixels.size != size:
        pixels = pixels.resize(size, getattr(fit, "resample", Image.Resampling.BICUBIC))
    return Picture(pixels, size)


def load(image: Image.Image) -> Image.Image:
    try:
        image.load()
    except ItemError:
        raise
    except MemoryError:
        raise ItemError(ErrorCode.DECODE_TOO_MANY_PIXELS, f"out of memory decoding a {image.size[0]}x{image.size[1]} image") from None
    except Exception as exc:  # noqa: BLE001
        raise ItemError(ErrorCode.DECODE_CORRUPT, f"cannot decode the {image.format} image: {_describe(exc)}") from None
    return image


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation (1-8); 1 when absent or unreadable (bad EXIF is not a bad image)."""
    try:
        value = image.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def cap_pixels(size: tuple[int, int], max_pixels: int | None) -> tuple[int, int]:
    """`size` scaled down (aspect kept) to at most `max_pixels`; an image above the cap is
    downscaled, never refused."""
    width, height = size
    if not max_pixels or width * height <= max_pixels:
        return size
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, int(width * scale)), max(1, int(height * scale))


def draft_jpeg(image: Image.Image, upright: tuple[int, int], size: tuple[int, int], need: tuple[int, int], swapped: bool) -> None:
    """Ask libjpeg for the smallest DCT scale whose output still covers `need`.

    `need` is in the coordinates of `size` (upright, capped); Pillow's draft works on the
    stored image, so scale it up to the full upright size and swap the axes back when the
    EXIF orientation transposes. Pillow picks the largest power-of-two reduction (at most 8)
    whose result is not below the request.
    """
    need_w = math.ceil(need[0] * upright[0] / size[0])
    need_h = math.ceil(need[1] * upright[1] / size[1])
    if swapped:
        need_w, need_h = need_h, need_w
    if need_w * 2 > image.size[0] and need_h * 2 > image.size[1]:
        return  # no reduction possible; drafting would only cost a decoder reconfiguration
    try:
        image.draft(None, (max(1, need_w), max(1, need_h)))
    except Exception:  # noqa: BLE001 - a draft failure only costs speed
        pass


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: transparency composited on white, 16-bit scaled, not clipped."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT or mode == "I":
        return _grey16_to_rgb(image)
    if mode == "F":
        values = np.asarray(image, dtype=np.float32)
        if values.size and np.nanmax(values) <= 1.0:
            values = values * 255.0
        return Image.fromarray(np.nan_to_num(values).clip(0, 255).astype(np.uint8)).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        return _on_white(image.convert("RGBA"))
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise ItemError(ErrorCode.DECODE_UNSUPPORTED, f"cannot convert {image.format} mode {mode} to RGB: {exc}") from None


def _grey16_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit grey keeps its top 8 bits (Pillow's convert would clip everything above 255 to
    white). Mode I (32-bit) holds 16-bit data in practice; 8-bit data stays as it is."""
    values = np.asarray(image)
    if image.mode == "I" and (values.size == 0 or values.max() <= 255):
        grey = values.clip(0, 255).astype(np.uint8)
    else:
        grey = (values.astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def _on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def frame_target(frame_size: FrameSize | None, upright: tuple[int, int]) -> tuple[int, int]:
    """The (width, height) a frame of this upright size is shown at."""
    if frame_size is None:
        return upright
    return frame_size(*upright) if callable(frame_size) else frame_size


def decode_animation(data: bytes, spec: ImageSpec, video: VideoSpec, frame_size: FrameSize | None) -> list[Picture]:
    """An animated image (GIF, WebP, APNG) as frames sampled like a video, by the frames'
    own durations; a still image gives its one frame."""
    from pipeline.video import sample_times

    image = open_image(data, spec)
    durations = _frame_durations(image)
    times = sample_times(sum(durations), video.fps, video.max_seconds, video.max_frames, video.long_policy)
    starts = np.cumsum([0.0] + durations[:-1])
    wanted = sorted({int(np.searchsorted(starts, t, side="right")) - 1 for t in times})
    pictures = []
    for index in wanted:
        try:
            image.seek(index)
        except EOFError:
            break
        except Exception as exc:  # noqa: BLE001
            raise ItemError(ErrorCode.DECODE_CORRUPT, f"cannot decode frame {index} of the {image.format}: {_describe(exc)}") from None
        frame = to_rgb(load(image).copy())
        size = frame_target(frame_size, frame.size)
        pictures.append(Picture(frame.resize(size, Image.Resampling.BICUBIC) if frame.size != size else frame, size))
    return pictures


def _frame_durations(image: Image.Image) -> list[float]:
    """Seconds each frame shows; reading them walks the file once (cheap: no compositing)."""
    count = getattr(image, "n_frames", 1) or 1
    durations = []
    for index in range(count):
        try:
            image.seek(index)
        except Exception:  # noqa: BLE001 - a broken tail ends the animation
            break
        duration = image.info.get("duration") or 100  # browsers show 0 ms frames at ~100 ms
        durations.append(max(float(duration), 10.0) / 1000)
    image.seek(0)
    return durations or [0.1]


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
