"""PDF bytes -> page pictures, rendered by pdfium (pypdfium2, the `pdf` extra).

Each page's size at media.pdf.dpi is what the model is told; pdfium renders it only as large
as the model needs (like JPEG draft decoding: a letter page at 150 dpi is 1275x1650, and a
model whose largest grid point is 336 px needs far fewer pixels). A page whose size at that
dpi is over media.image.hard_max_pixels is refused before rendering.
"""

from __future__ import annotations

import math

from PIL import Image

from pipeline.images import Fit, Picture, Target, cap_pixels
from schemas.errors import ErrorCode, ItemError
from schemas.spec import ImageSpec, PdfSpec

_POINTS_PER_INCH = 72
_PASSWORD_ERROR = 4  # FPDF_ERR_PASSWORD


def decode_pdf(
    data: bytes, spec: PdfSpec, image_spec: ImageSpec, target: Target | None = None, fit: Fit | None = None
) -> list[Picture]:
    """The first media.pdf.max_pages pages, in order."""
    try:
        import pypdfium2 as pdfium
    except ImportError:
        raise ItemError(ErrorCode.DECODE_UNSUPPORTED, "reading PDFs needs the 'pdf' extra (pypdfium2)") from None
    document = _open(pdfium, data)
    try:
        count = len(document)
        if count == 0:
            raise ItemError(ErrorCode.DECODE_CORRUPT, "the PDF has no pages")
        return [_render(document, index, spec, image_spec, target, fit) for index in range(min(count, spec.max_pages))]
    finally:
        document.close()


def _open(pdfium, data: bytes):
    try:
        return pdfium.PdfDocument(data)
    except pdfium.PdfiumError as exc:
        if getattr(exc, "err_code", None) == _PASSWORD_ERROR:
            raise ItemError(ErrorCode.PDF_ENCRYPTED, "the PDF is encrypted with a password") from None
        raise ItemError(ErrorCode.DECODE_CORRUPT, f"cannot open the PDF: {exc}") from None


def _render(document, index: int, spec: PdfSpec, image_spec: ImageSpec, target: Target | None, fit: Fit | None) -> Picture:
    import pypdfium2 as pdfium

    try:
        page = document[index]
        width_pt, height_pt = page.get_size()  # already swapped for a /Rotate of 90 or 270
    except pdfium.PdfiumError as exc:
        raise ItemError(ErrorCode.DECODE_CORRUPT, f"cannot load page {index + 1} of the PDF: {exc}") from None
    if not (width_pt > 0 and height_pt > 0 and math.isfinite(width_pt * height_pt)):
        raise ItemError(ErrorCode.DECODE_CORRUPT, f"page {index + 1} of the PDF has no size ({width_pt}x{height_pt} pt)")
    dpi_scale = spec.dpi / _POINTS_PER_INCH
    full = (max(1, round(width_pt * dpi_scale)), max(1, round(height_pt * dpi_scale)))
    if full[0] * full[1] > image_spec.hard_max_pixels:
        raise ItemError(
            ErrorCode.DECODE_TOO_MANY_PIXELS,
            f"page {index + 1} is {width_pt:.0f}x{height_pt:.0f} pt = {full[0]}x{full[1]} pixels at "
            f"{spec.dpi} dpi, over media.image.hard_max_pixels = {image_spec.hard_max_pixels:,}",
        )
    capped = cap_pixels(full, image_spec.max_pixels)
    size = fit(*capped) if fit else capped
    need = target(*capped) if target else (min(size[0], capped[0]), min(size[1], capped[1]))
    scale = min(dpi_scale, max(need[0] / width_pt, need[1] / height_pt))
    try:
        image = page.render(scale=scale, may_draw_forms=True).to_pil()
    except pdfium.PdfiumError as exc:
        raise ItemError(ErrorCode.DECODE_CORRUPT, f"cannot render page {index + 1} of the PDF: {exc}") from None
    finally:
        page.close()
    image = image.convert("RGB") if image.mode != "RGB" else image
    if target is None and image.size != size:
        image = image.resize(size, getattr(fit, "resample", Image.Resampling.BICUBIC))
    return Picture(image, size)
