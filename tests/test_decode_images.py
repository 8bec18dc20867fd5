"""Images: every format, mode, EXIF orientation, limit and error code, on files made here with
real encoders (Pillow's); the kind comes from the bytes, never from a name or media_type."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import psutil
import pytest
from PIL import Image, ImageOps, features

from actors.tiny import tiny_grid_pinpoints
from jobs.sample import encode_image, synthetic_image
from pipeline import decode as decode_mod
from pipeline.decode import Shaping
from pipeline.images import decode_image
from pipeline.tiling import AnyresPlan
from schemas.errors import ErrorCode, ItemError
from schemas.spec import ImageSpec, MediaSpec

PLAN = AnyresPlan(grid=tuple(map(tuple, tiny_grid_pinpoints())), tile=56, thumbnail=(56, 56))
SPEC = ImageSpec()


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def error_of(fn, *args) -> ItemError:
    with pytest.raises(ItemError) as caught:
        fn(*args)
    return caught.value


def mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean())


# --- formats -------------------------------------------------------------------------------

FORMATS = [
    ("JPEG", {"quality": 95}, 3.0),
    ("PNG", {}, 0.0),
    ("WEBP", {"lossless": True}, 0.0),
    ("WEBP", {"quality": 90}, 6.0),
    ("BMP", {}, 0.0),
    ("TIFF", {}, 0.0),
    ("TIFF", {"compression": "tiff_lzw"}, 0.0),
    ("GIF", {}, 25.0),  # a 256-colour palette of a gradient image
    pytest.param("AVIF", {"quality": 90}, 8.0, marks=pytest.mark.skipif(not features.check("avif"), reason="Pillow without AVIF")),
]


@pytest.mark.parametrize("fmt,options,tolerance", FORMATS)
def test_each_format_decodes_to_rgb_at_its_size(fmt, options, tolerance):
    source = synthetic_image(320, 200, seed=1)
    picture = decode_image(encode(source, fmt, **options), SPEC)
    assert picture.image.mode == "RGB"
    assert picture.size == picture.image.size == (320, 200)
    assert mean_abs_diff(picture.image, source) <= tolerance


def test_heic_when_the_plugin_is_installed():
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    source = synthetic_image(128, 96, seed=2)
    picture = decode_mod.decode(encode(source, "HEIF", quality=90), None, MediaSpec())
    assert picture.kind == "image" and picture.pictures[0].size == (128, 96)


def test_kind_comes_from_the_bytes_not_the_declared_type():
    png = encode(synthetic_image(64, 48, seed=3), "PNG")
    decoded = decode_mod.decode(png, "video", MediaSpec())  # a manifest that says "video" is wrong
    assert decoded.kind == "image" and decoded.pictures[0].size == (64, 48)
    assert decode_mod.sniff_kind(png) == "image"
    assert decode_mod.sniff_kind(encode(synthetic_image(8, 8, 1), "WEBP")) == "image"
    assert decode_mod.sniff_kind(b"%PDF-1.7\n...") == "pdf"


def test_first_frame_of_a_multipage_tiff_and_an_animated_gif():
    frames = [Image.new("RGB", (40, 30), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    for fmt in ("TIFF", "GIF"):
        data = encode(frames[0], fmt, save_all=True, append_images=frames[1:])
        picture = decode_image(data, SPEC)
        assert picture.image.getpixel((5, 5))[0] > 200, fmt


def test_gif_frames_mode_samples_an_animation_like_a_video():
    # 10 frames of 200 ms = 2 s; at 1 fps: frames shown at t=0 and t=1 (indexes 0 and 5).
    frames = [Image.new("RGB", (40, 30), (index * 25, 0, 0)) for index in range(10)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=200, loop=0)
    media = MediaSpec(image={"gif_mode": "frames"})
    decoded = decode_mod.decode(data, None, media, Shaping(frame_size=(56, 56)))
    assert decoded.as_frames and decoded.n_frames == 2
    assert [p.size for p in decoded.pictures] == [(56, 56), (56, 56)]
    reds = [p.image.getpixel((28, 28))[0] for p in decoded.pictures]
    assert abs(reds[0] - 0) <= 8 and abs(reds[1] - 125) <= 8
    still = decode_mod.decode(data, None, MediaSpec())  # default gif_mode: first frame only
    assert not still.as_frames and len(still.pictures) == 1


# --- modes ---------------------------------------------------------------------------------


def test_palette_grey_and_bilevel_become_rgb():
    source = synthetic_image(64, 48, seed=4)
    for mode in ("P", "L", "1"):
        image = source.convert(mode)
        picture = decode_image(encode(image, "PNG"), SPEC)
        assert picture.image.mode == "RGB"
        assert np.array_equal(np.asarray(picture.image), np.asarray(image.convert("RGB"))), mode


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 2), (0, 0, 0, 0))  # fully transparent black
    rgba.putpixel((1, 0), (255, 0, 0, 255))  # opaque red
    rgba.putpixel((2, 0), (255, 0, 0, 128))  # half-transparent red
    picture = decode_image(encode(rgba, "PNG"), SPEC).image
    assert picture.getpixel((0, 0)) == (255, 255, 255)
    assert picture.getpixel((1, 0)) == (255, 0, 0)
    red, green, blue = picture.getpixel((2, 0))
    assert red == 255 and 120 <= green <= 135 and green == blue

    la = Image.new("LA", (2, 1), (0, 0))
    la.putpixel((1, 0), (0, 255))
    assert list(decode_image(encode(la, "PNG"), SPEC).image.getdata()) == [(255, 255, 255), (0, 0, 0)]


def test_palette_with_a_transparent_index_is_composited_on_white():
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    data = encode(image, "PNG", transparency=0)
    assert list(decode_image(data, SPEC).image.getdata()) == [(255, 255, 255), (0, 0, 255)]
    assert list(decode_image(encode(image, "GIF", transparency=0), SPEC).image.getdata()) == [(255, 255, 255), (0, 0, 255)]


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_becomes_rgb(fmt):
    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # pure red in CMYK
    picture = decode_image(encode(cmyk, fmt), SPEC).image
    red, green, blue = picture.getpixel((16, 16))
    assert picture.mode == "RGB" and red > 230 and green < 25 and blue < 25


def test_16_bit_grey_keeps_its_range_instead_of_clipping():
    values = np.array([[0, 0x8000, 0xFFFF, 0x00FF]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode.startswith("I;16")
    picture = decode_image(encode(image, "PNG"), SPEC).image
    assert [pixel[0] for pixel in picture.getdata()] == [0, 128, 255, 0]
    tiff = decode_image(encode(image, "TIFF"), SPEC).image
    assert [pixel[0] for pixel in tiff.getdata()] == [0, 128, 255, 0]


def test_32_bit_integer_and_float_grey():
    ints = Image.fromarray(np.array([[0, 40000, 65535]], dtype=np.int32))
    assert [p[0] for p in decode_image(encode(ints, "TIFF"), SPEC).image.getdata()] == [0, 156, 255]
    small = Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32))
    assert [p[0] for p in decode_image(encode(small, "TIFF"), SPEC).image.getdata()] == [0, 100, 255]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert [p[0] for p in decode_image(encode(floats, "TIFF"), SPEC).image.getdata()] == [0, 127, 255]


# --- EXIF orientation ----------------------------------------------------------------------


def with_orientation(image: Image.Image, orientation: int, fmt: str = "JPEG", **options) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, fmt, exif=exif.tobytes(), **options)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation):
    source = Image.new("RGB", (60, 40), (255, 255, 255))
    source.paste((255, 0, 0), (0, 0, 20, 10))  # a mark in the top-left corner
    data = with_orientation(source, orientation, quality=95)
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    picture = decode_image(data, SPEC)
    assert picture.size == expected.size == ((40, 60) if orientation >= 5 else (60, 40))
    assert np.array_equal(np.asarray(picture.image), np.asarray(expected))


def test_exif_orientation_of_a_png():
    source = Image.new("RGB", (30, 20), (0, 0, 255))
    picture = decode_image(with_orientation(source, 6, "PNG"), SPEC)
    assert picture.size == (20, 30)


# --- decode only what the model sees -------------------------------------------------------


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    return encode_image(synthetic_image(4000, 3000, seed=9), "jpeg")


def test_jpeg_is_draft_decoded_to_the_smallest_scale_not_below_the_target(big_jpeg):
    need = PLAN.source_size(4000, 3000)  # (224, 168) for the tiny model's grid
    picture = decode_image(big_jpeg, SPEC, PLAN.source_size)
    assert picture.size == (4000, 3000)  # what the model is told: the real size
    assert picture.image.size == (500, 375)  # 1/8: the smallest DCT scale
    assert picture.image.width >= need[0] and picture.image.height >= need[1]

    def third(width, height):
        return width // 3, height // 3

    picture = decode_image(big_jpeg, SPEC, third)  # 1333x1000 needed: 1/4 would be 1000x750, too small
    assert picture.image.size == (2000, 1500)


def test_jpeg_draft_of_a_small_image_and_of_a_rotated_one():
    small = decode_image(encode_image(synthetic_image(640, 480, seed=1), "jpeg"), SPEC, PLAN.source_size)
    assert small.image.size == (320, 240)  # need 224x168: 1/2 fits, 1/4 would not
    rotated = with_orientation(synthetic_image(4000, 3000, seed=2), 6, quality=85)  # upright: 3000x4000
    picture = decode_image(rotated, SPEC, PLAN.source_size)
    need = PLAN.source_size(3000, 4000)
    assert picture.size == (3000, 4000)
    assert picture.image.width >= need[0] and picture.image.height >= need[1]
    assert picture.image.size == (375, 500)


def test_without_a_target_pixels_are_the_full_size(big_jpeg):
    assert decode_image(big_jpeg, SPEC).image.size == (4000, 3000)


def test_max_pixels_downscales_instead_of_refusing():
    data = encode_image(synthetic_image(2000, 1500, seed=3), "png")
    picture = decode_image(data, ImageSpec(max_pixels=1_000_000))
    width, height = picture.size
    assert picture.image.size == picture.size
    assert width * height <= 1_000_000 and abs(width / height - 4 / 3) < 0.01
    drafted = decode_image(encode_image(synthetic_image(2000, 1500, seed=3), "jpeg"), ImageSpec(max_pixels=1_000_000), PLAN.source_size)
    assert drafted.size == picture.size  # the grid is chosen for the capped size


# --- bombs and limits ----------------------------------------------------------------------


def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def jpeg_declaring(width: int, height: int) -> bytes:
    data = bytearray(encode_image(synthetic_image(64, 48, seed=1), "jpeg"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def gif_declaring(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("P", (8, 8)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def bmp_declaring(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("RGB", (8, 8)), "BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def webp_declaring(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("RGBA", (8, 8)), "WEBP", lossless=True, exact=True))
    assert data[12:16] == b"VP8L"
    bits = int.from_bytes(data[21:25], "little") & ~((1 << 28) - 1)
    data[21:25] = (bits | (width - 1) | ((height - 1) << 14)).to_bytes(4, "little")
    return bytes(data)


def tiff_declaring(width: int, height: int) -> bytes:
    entries = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 8), (278, 4, height), (279, 4, 1)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", tag, kind, 1, value) for tag, kind, value in entries)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0)


BOMBS = {
    "png": png_header_only(50_000, 50_000),
    "jpeg": jpeg_declaring(60_000, 60_000),
    "gif": gif_declaring(60_000, 60_000),
    "bmp": bmp_declaring(50_000, 50_000),
    "webp": webp_declaring(16_000, 16_000),
    "tiff": tiff_declaring(100_000, 100_000),
}


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_bombs_are_refused_from_the_header_without_allocating(name):
    process = psutil.Process()
    before = process.memory_info().rss
    error = error_of(decode_image, BOMBS[name], SPEC)
    grown = process.memory_info().rss - before
    assert error.code == ErrorCode.DECODE_TOO_MANY_PIXELS
    assert "hard_max_pixels" in error.message and "declares" in error.message
    assert grown < 64 * 2**20  # the pixels would be gigabytes


def test_hard_max_pixels_is_the_spec_value():
    data = encode_image(synthetic_image(1200, 1000, seed=1), "png")
    error = error_of(decode_image, data, ImageSpec(hard_max_pixels=1_000_000))
    assert error.code == ErrorCode.DECODE_TOO_MANY_PIXELS and "1200x1000" in error.message
    assert decode_image(data, ImageSpec(hard_max_pixels=1_200_000)).size == (1200, 1000)


# --- broken files --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp", "gif", "tiff"])
def test_truncated_files_are_corrupt(fmt):
    data = encode_image(synthetic_image(320, 240, seed=5), fmt)
    error = error_of(decode_mod.prepare_media, data[: len(data) // 2], None, MediaSpec(), Shaping((56, 56), PLAN))
    assert error.code == ErrorCode.DECODE_CORRUPT
    assert error.message


def test_a_broken_header_is_corrupt_and_unknown_bytes_unsupported():
    error = error_of(decode_image, b"\x89PNG\r\n\x1a\n" + b"garbage" * 20, SPEC)
    assert error.code == ErrorCode.DECODE_CORRUPT and "PNG" in error.message
    for data in (b"this is a text file, not a JPEG\n" * 10, b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", b""):
        assert error_of(decode_mod.prepare_media, data, None, MediaSpec(), Shaping((56, 56), PLAN)).code == ErrorCode.DECODE_UNSUPPORTED


def test_formats_outside_the_allowlist_are_not_attempted():
    for fmt in ("PCX", "TGA", "ICO"):
        data = encode(Image.new("RGB", (16, 16), (1, 2, 3)), fmt)
        assert error_of(decode_image, data, SPEC).code in (ErrorCode.DECODE_UNSUPPORTED, ErrorCode.DECODE_CORRUPT)


def test_prepare_media_tiles_for_the_model():
    media = decode_mod.prepare_media(encode_image(synthetic_image(4000, 3000, 1), "jpeg"), None, MediaSpec(), Shaping((56, 56), PLAN))
    assert media.kind == "image" and media.sizes == [(4000, 3000)]
    assert media.tiles[0].dtype == np.uint8 and media.tiles[0].shape == (PLAN.n_tiles(4000, 3000), 3, 56, 56)
    plain = decode_mod.prepare_media(encode_image(synthetic_image(400, 300, 1), "png"), None, MediaSpec(), Shaping((56, 56)))
    assert plain.tiles is None and plain.images[0].size == (400, 300)
