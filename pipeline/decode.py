"""Bytes -> what the model sees: sniff the kind from the bytes, decode (images.py, video.py,
pdf.py), and shape it for the model (tiling.py) — all of it in one call, `prepare_media`,
so that it can run in an isolated child process (isolation.py) and only the small, final
uint8 pixels travel back.

Every failure is an `ItemError` with a decode/video/pdf code; nothing else escapes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from pipeline.images import Fit, FrameSize, Picture, decode_animation, decode_image, image_format
from pipeline.pdf import decode_pdf
from pipeline.tiling import AnyresPlan
from pipeline.video import decode_video
from schemas.errors import ErrorCode, ItemError
from schemas.spec import MediaSpec

# ISO-BMFF brands of still images (HEIF, AVIF); any other `ftyp` is a video container.
_IMAGE_BRANDS = (b"avif", b"avis", b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1")
# ISO-BMFF top-level boxes a file may start with when it has no `ftyp` (old QuickTime).
_BMFF_BOXES = (b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot")
# Audio-only containers: read as video so that the row says "no video stream" rather than
# "unsupported".
_AUDIO_MAGIC = (b"ID3", b"fLaC", b"OggS", b"\xff\xfb", b"\xff\xf3", b"\xff\xf2")

TEST_HOOKS_ENV = "TESSERA_TEST_HOOKS"
TEST_HOOK_PREFIX = b"TESSERA-TEST-HOOK:"


@dataclass
class DecodedMedia:
    kind: str  # "image" | "video" | "pdf"
    pictures: list[Picture] = field(default_factory=list)  # in prompt order
    n_frames: int | None = None
    n_pages: int | None = None
    as_frames: bool = False  # video frames (or an animation): shown at frame size, no grid
    decoded_frames: int | None = None


@dataclass(frozen=True)
class Shaping:
    """What the model needs, decided once per worker from its processor."""

    # (width, height) of each video frame the model sees, or a Fit of the frame's own size
    frame_size: FrameSize
    plan: AnyresPlan | None = None  # tile here; None: the model's processor tiles
    # Without a plan: the size the processor resizes a still image to (actors/sizing.py),
    # decoded straight to that size (None: decoded at full size).
    fit: Fit | None = None


@dataclass
class ModelMedia:
    """One media item, ready for the model's adapter: pre-cut uint8 tiles when the worker
    tiles itself, else RGB images at the size the model is told."""

    kind: str
    sizes: list[tuple[int, int]]  # (width, height) per image, as the model is told
    tiles: list[np.ndarray] | None = None  # uint8 [tiles, 3, H, W] per image
    images: list[Image.Image] | None = None
    n_frames: int | None = None
    n_pages: int | None = None
    as_frames: bool = False  # the frames of a video (or an animation), in order

    def split(self) -> list["ModelMedia"]:
        """One ModelMedia per image (PDF page mode: a row per page)."""
        return [
            ModelMedia(
                self.kind,
                [size],
                tiles=None if self.tiles is None else [self.tiles[index]],
                images=None if self.images is None else [self.images[index]],
                n_frames=1 if self.n_frames else None,
                n_pages=1 if self.n_pages else None,
            )
            for index, size in enumerate(self.sizes)
        ]


def sniff_kind(data: bytes) -> str | None:
    head = data[:64]
    if head.startswith(b"%PDF"):
        return "pdf"
    if head[4:8] == b"ftyp":
        return "image" if head[8:12] in _IMAGE_BRANDS else "video"
    if head[4:8] in _BMFF_BOXES:
        return "video"
    if head.startswith(b"\x1a\x45\xdf\xa3"):  # EBML: Matroska / WebM
        return "video"
    if image_format(head):
        return "image"
    if head.startswith(b"RIFF"):
        return {b"AVI ": "video", b"WAVE": "video"}.get(head[8:12])
    if head.startswith((b"FLV", *_AUDIO_MAGIC)) or (len(data) > 188 and data[0] == 0x47 and data[188] == 0x47):
        return "video"  # FLV, audio-only files, MPEG-TS
    if b"%PDF-" in data[:1024]:  # readers accept a PDF header after some junk; so does pdfium
        return "pdf"
    return None


def decode(data: bytes, media_type: str | None, media: MediaSpec, shaping: Shaping | None = None) -> DecodedMedia:
    """Decode one item. With a tiling plan, pictures may hold fewer pixels than their size
    says (never fewer than the plan needs); without one, exactly their size (the processor's
    resize of it, with a fit)."""
    run_test_hook(data)
    kind = sniff_kind(data) or media_type
    target = shaping.plan.source_size if shaping and shaping.plan else None
    fit = shaping.fit if shaping and not shaping.plan else None
    frame_size = shaping.frame_size if shaping else None
    if kind == "image":
        if media.image.gif_mode == "frames" and _is_animated(data):
            frames = decode_animation(data, media.image, media.video, frame_size)
            return DecodedMedia("image", frames, n_frames=len(frames), as_frames=True)
        return DecodedMedia("image", [decode_image(data, media.image, target, fit)])
    if kind == "video":
        video = decode_video(data, media.video, frame_size)
        return DecodedMedia("video", video.pictures, n_frames=len(video.pictures), as_frames=True, decoded_frames=video.decoded_frames)
    if kind == "pdf":
        pages = decode_pdf(data, media.pdf, media.image, target, fit)
        return DecodedMedia("pdf", pages, n_pages=len(pages))
    raise ItemError(ErrorCode.DECODE_UNSUPPORTED, f"the bytes are not an image, video or PDF we read (they start with {data[:8]!r})")


def _is_animated(data: bytes) -> bool:
    import io

    try:
        with Image.open(io.BytesIO(data)) as image:
            return bool(getattr(image, "is_animated", False))
    except Exception:  # noqa: BLE001 - decode_image will say what is wrong with it
        return False


def prepare_media(data: bytes, media_type: str | None, media: MediaSpec, shaping: Shaping) -> ModelMedia:
    """Decode and shape one item for the model. Never raises anything but ItemError."""
    try:
        decoded = decode(data, media_type, media, shaping)
        return shape(decoded, shaping)
    except ItemError:
        raise
    except MemoryError:
        raise ItemError(ErrorCode.DECODE_TOO_MANY_PIXELS, "ran out of memory decoding the item") from None
    except Exception as exc:  # noqa: BLE001 - a decoder bug must still be one error row
        raise ItemError(ErrorCode.DECODE_CORRUPT, f"unexpected {type(exc).__name__} while decoding: {exc}") from None


def shape(decoded: DecodedMedia, shaping: Shaping) -> ModelMedia:
    sizes = [picture.size for picture in decoded.pictures]
    media = ModelMedia(decoded.kind, sizes, n_frames=decoded.n_frames, n_pages=decoded.n_pages, as_frames=decoded.as_frames)
    if shaping.plan is not None:
        media.tiles = [shaping.plan.tile_image(p.image, p.size) for p in decoded.pictures]
    else:
        media.images = [p.image for p in decoded.pictures]
    return media


def run_test_hook(data: bytes) -> None:
    """TEST-ONLY: lets tests make a decoder really crash or hang, to prove isolation works.

    Inert unless the environment has TESSERA_TEST_HOOKS=1 *and* the bytes start with
    `TESSERA-TEST-HOOK:<action>`; production never sets the variable, and then such bytes
    are merely an unsupported format.
    """
    if not data.startswith(TEST_HOOK_PREFIX) or os.environ.get(TEST_HOOKS_ENV) != "1":
        return
    action = data[len(TEST_HOOK_PREFIX) :].split(b"\n", 1)[0].strip()
    if action == b"abort":
        os.abort()
    if action == b"segfault":
        import ctypes

        ctypes.string_at(0)
    if action == b"hang":
        import time

        while True:
            time.sleep(3600)
