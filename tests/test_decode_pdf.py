"""PDFs: pages rendered by pdfium at media.pdf.dpi (no larger than the model needs), page
limits, document and page modes, encrypted and broken files — on PDFs Pillow writes here."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from actors.tiny import tiny_grid_pinpoints
from jobs.sample import encode_pdf
from pipeline import decode as decode_mod
from pipeline.decode import Shaping
from pipeline.pdf import decode_pdf
from pipeline.tiling import AnyresPlan
from schemas.errors import ErrorCode, ItemError
from schemas.spec import ImageSpec, MediaSpec, PdfSpec

pytest.importorskip("pypdfium2")

PLAN = AnyresPlan(grid=tuple(map(tuple, tiny_grid_pinpoints())), tile=56, thumbnail=(56, 56))


def numbered_pdf(pages: int, size=(612, 792)) -> bytes:
    """Page n carries a black bar n*40 px wide at its top left, so a test can tell pages apart."""
    images = []
    for number in range(1, pages + 1):
        image = Image.new("RGB", size, "white")
        ImageDraw.Draw(image).rectangle([0, 0, number * 40, 60], fill="black")
        images.append(image)
    buffer = io.BytesIO()
    images[0].save(buffer, format="PDF", save_all=True, append_images=images[1:], resolution=72)
    return buffer.getvalue()


def bar_width(image: Image.Image, dpi_scale: float) -> int:
    row = np.asarray(image.convert("L"))[int(30 * dpi_scale)]
    return int((row < 128).sum() / dpi_scale)


def error_of(fn, *args) -> ItemError:
    with pytest.raises(ItemError) as caught:
        fn(*args)
    return caught.value


def test_pages_render_in_order_at_the_spec_dpi():
    pictures = decode_pdf(numbered_pdf(3), PdfSpec(dpi=144), ImageSpec())
    assert [p.size for p in pictures] == [(1224, 1584)] * 3  # 612x792 pt at 144 dpi
    assert [p.image.size for p in pictures] == [(1224, 1584)] * 3
    assert [round(bar_width(p.image, 2) / 40) for p in pictures] == [1, 2, 3]
    assert all(p.image.mode == "RGB" for p in pictures)


def test_max_pages_keeps_the_first_pages():
    decoded = decode_mod.decode(numbered_pdf(5), None, MediaSpec(pdf={"max_pages": 2}))
    assert decoded.kind == "pdf" and decoded.n_pages == 2
    assert [round(bar_width(p.image, 150 / 72) / 40) for p in decoded.pictures] == [1, 2]


def test_pages_render_only_as_large_as_the_model_needs():
    pictures = decode_pdf(numbered_pdf(1), PdfSpec(dpi=150), ImageSpec(), PLAN.source_size)
    picture = pictures[0]
    assert picture.size == (1275, 1650)  # what the model is told: the page at 150 dpi
    need = PLAN.source_size(*picture.size)
    assert need[0] <= picture.image.width < 1275 and need[1] <= picture.image.height < 1650
    media = decode_mod.prepare_media(numbered_pdf(2), None, MediaSpec(), Shaping((56, 56), PLAN))
    assert media.sizes == [(1275, 1650)] * 2 and len(media.tiles) == 2
    assert media.tiles[0].shape[0] == PLAN.n_tiles(1275, 1650)


def test_max_pixels_caps_pages_too():
    picture = decode_pdf(numbered_pdf(1), PdfSpec(dpi=150), ImageSpec(max_pixels=500_000))[0]
    assert picture.size[0] * picture.size[1] <= 500_000 and picture.image.size == picture.size


def test_a_huge_page_is_refused_before_rendering():
    image = Image.new("RGB", (100, 100), "white")
    buffer = io.BytesIO()
    image.save(buffer, format="PDF", resolution=0.5)  # a 200 x 200 inch page
    error = error_of(decode_pdf, buffer.getvalue(), PdfSpec(dpi=150), ImageSpec())
    assert error.code == ErrorCode.DECODE_TOO_MANY_PIXELS and "page 1" in error.message


def encrypted(data: bytes, user_password: str) -> bytes:
    pypdf = pytest.importorskip("pypdf")
    reader, writer = pypdf.PdfReader(io.BytesIO(data)), pypdf.PdfWriter()
    for page in reader.pages:
        writer.add_page(page)
    writer.encrypt(user_password=user_password, owner_password="owner", algorithm="RC4-128")
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


def test_a_password_protected_pdf_is_encrypted():
    error = error_of(decode_pdf, encrypted(encode_pdf(2), "secret"), PdfSpec(), ImageSpec())
    assert error.code == ErrorCode.PDF_ENCRYPTED and "password" in error.message


def test_owner_only_encryption_still_opens():
    assert len(decode_pdf(encrypted(encode_pdf(2), ""), PdfSpec(), ImageSpec())) == 2


@pytest.mark.parametrize(
    "data",
    [
        encode_pdf(2)[:300],
        b"%PDF-1.7\n" + bytes(range(256)) * 4,
        b"%PDF-1.4\n%%EOF\n",
    ],
    ids=["truncated", "garbage", "empty"],
)
def test_broken_pdfs_are_corrupt(data):
    error = error_of(decode_mod.prepare_media, data, None, MediaSpec(), Shaping((56, 56), PLAN))
    assert error.code == ErrorCode.DECODE_CORRUPT and "PDF" in error.message


# --- document and page modes through the CPU stage ------------------------------------------


@pytest.fixture
def preparer_for(tmp_path, tiny_model_path):
    from actors.loading import resolve_model
    from pipeline.prepare import PrepareContext, Preparer
    from schemas.spec import parse_spec
    from schemas.tasks import resolve_task

    made = []

    def build(mode: str):
        spec = parse_spec(
            {
                "name": "pdf-test",
                "input": {"manifest": str(tmp_path / "m.jsonl")},
                "output": {"path": str(tmp_path / "out")},
                "task": {"preset": "document_extraction"},
                "media": {"isolation": "none", "pdf": {"mode": mode}},
            }
        )
        preparer = Preparer(PrepareContext(run_id="r", spec=spec, model=resolve_model(spec.model), task=resolve_task(spec.task)))
        made.append(preparer)
        return preparer

    yield build
    for preparer in made:
        preparer.close()


def manifest_row(row_id: str, *paths) -> dict:
    return {
        "id": row_id, "uris": [str(p) for p in paths], "media_type": None, "fields_json": json.dumps({}),
        "source": "m.jsonl#L1", "position": 1, "error_code": None, "error_message": None,
    }


def test_document_mode_is_one_row_with_every_page(tmp_path, preparer_for):
    path = tmp_path / "doc.pdf"
    path.write_bytes(numbered_pdf(3))
    (row,) = preparer_for("document").prepare_rows(manifest_row("doc", path))
    assert row["error_code"] is None and row["id"] == "doc"
    assert row["n_pages"] == 3 and row["media_type"] == "pdf"
    assert row["n_tiles"] == 3 * PLAN.n_tiles(1275, 1650)


def test_page_mode_is_one_row_per_page(tmp_path, preparer_for):
    path = tmp_path / "doc.pdf"
    path.write_bytes(numbered_pdf(3))
    rows = preparer_for("page").prepare_rows(manifest_row("doc", path))
    assert [row["id"] for row in rows] == ["doc#p1", "doc#p2", "doc#p3"]
    assert all(row["error_code"] is None and row["n_pages"] == 1 for row in rows)
    assert all(row["n_tiles"] == PLAN.n_tiles(1275, 1650) for row in rows)
    assert len({row["model_inputs"] for row in rows}) == 3  # each row holds its own page


def test_page_mode_leaves_broken_pdfs_and_images_as_one_row(tmp_path, preparer_for):
    broken, image = tmp_path / "broken.pdf", tmp_path / "photo.png"
    broken.write_bytes(b"%PDF-1.4\n%%EOF\n")
    Image.new("RGB", (64, 64), "red").save(image)
    preparer = preparer_for("page")
    (error_row,) = preparer.prepare_rows(manifest_row("bad", broken))
    assert error_row["id"] == "bad" and error_row["error_code"] == "decode.corrupt"
    assert str(broken) in error_row["error_message"]
    (image_row,) = preparer.prepare_rows(manifest_row("img", image))
    assert image_row["id"] == "img" and image_row["error_code"] is None
