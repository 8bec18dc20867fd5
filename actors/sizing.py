"""The size each family's processor resizes an image to, as pure functions of its size.

The CPU stage decodes straight to that size (JPEG draft decoding, pdfium's render scale,
swscale for video frames) and resizes the rest of the way with the processor's own filter,
so the processor's resize is then a no-op: a 4000x3000 photo the model sees at 252x168 is
never decoded at full size, and the processor gives the tokens it gives for the full image.

No torch here: these travel to the isolated decoder child (pipeline/isolation.py), which
imports only the decoders. actors/adapters.py says which rule a family uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

BICUBIC = int(Image.Resampling.BICUBIC)


@dataclass(frozen=True)
class SmartResize:
    """Qwen2-VL's `smart_resize`: both sides multiples of `factor`, the area within
    [min_pixels, max_pixels], the aspect ratio as close as that allows."""

    factor: int
    min_pixels: int
    max_pixels: int
    resample: int = BICUBIC

    def __call__(self, width: int, height: int) -> tuple[int, int]:
        if max(width, height) > 200 * min(width, height):
            return width, height  # the processor refuses it; let it say so
        factor = self.factor
        h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
        if h_bar * w_bar > self.max_pixels:
            beta = math.sqrt(height * width / self.max_pixels)
            h_bar = max(factor, math.floor(height / beta / factor) * factor)
            w_bar = max(factor, math.floor(width / beta / factor) * factor)
        elif h_bar * w_bar < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            h_bar = math.ceil(height * beta / factor) * factor
            w_bar = math.ceil(width * beta / factor) * factor
        return w_bar, h_bar


@dataclass(frozen=True)
class LongestEdge:
    """Idefics3's first resize: the longest edge to `longest_edge` (up or down), the other
    side from the aspect ratio, rounded up to even (its `_resize_output_size_rescale_to_max_len`)."""

    longest_edge: int
    resample: int = BICUBIC

    def __call__(self, width: int, height: int) -> tuple[int, int]:
        aspect = width / height
        if width >= height:
            width, height = self.longest_edge, int(self.longest_edge / aspect)
            height += height % 2
        else:
            width, height = int(self.longest_edge * aspect), self.longest_edge
            width += width % 2
        return max(width, 1), max(height, 1)


@dataclass(frozen=True)
class CapPixels:
    """At most `max_pixels`, aspect kept, never enlarged: for processors whose resize we do
    not reproduce but whose largest input we know (an anyres grid's largest point)."""

    max_pixels: int
    resample: int = BICUBIC

    def __call__(self, width: int, height: int) -> tuple[int, int]:
        if width * height <= self.max_pixels:
            return width, height
        scale = math.sqrt(self.max_pixels / (width * height))
        return max(1, int(width * scale)), max(1, int(height * scale))


Fit = SmartResize | LongestEdge | CapPixels
