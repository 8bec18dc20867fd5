"""Dynamic-resolution ("anyres") tiling in the style of MiniMax-VL-01 / LLaVA-NeXT, as a pure
function: picture -> uint8 tiles [1 + rows * cols, 3, tile, tile].

The scheme: among a grid of resolutions (multiples of the tile size, e.g. 336..2016 with at
most 18 tiles) choose the one that keeps the most of the image and wastes the least; resize
the image into it keeping its aspect ratio; pad the rest with black, centred; cut it into
tiles, row by row; put a thumbnail of the whole image (squashed to one tile) first.

It reproduces transformers' `LlavaNextImageProcessorPil` exactly (tests/test_tiling.py
checks it pixel for pixel), with two differences that are the reason it exists:

- the grid choice is made from the size the model is told (`Picture.size`), while the pixels
  may come from a smaller draft decode, so the token count never depends on how we decoded;
- it is one resize per output instead of the processor's per-tile round trips through
  NumPy and PIL, so it costs a fraction of the processor's time on CPU workers.

`AnyresPlan.from_processor` returns None for any processor it cannot reproduce exactly;
those go through the model's own processor instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

# Image processor classes whose anyres output this module reproduces (PIL backend: the
# torchvision backend resizes with different arithmetic).
_REPRODUCED = ("LlavaNextImageProcessorPil",)


@dataclass(frozen=True)
class AnyresPlan:
    grid: tuple[tuple[int, int], ...]  # candidate (height, width) resolutions
    tile: int  # tile side in pixels (the processor's crop size)
    thumbnail: tuple[int, int]  # (height, width) the whole image is squashed to
    resample: int = int(Image.Resampling.BICUBIC)

    @staticmethod
    def from_processor(image_processor) -> "AnyresPlan | None":
        """The plan of a LLaVA-NeXT-style image processor, or None where we would not match it."""
        if type(image_processor).__name__ not in _REPRODUCED:
            return None
        grid = getattr(image_processor, "image_grid_pinpoints", None)
        size, crop = _get(image_processor, "size"), _get(image_processor, "crop_size")
        shortest = size.get("shortest_edge")
        tile = crop.get("height")
        if not grid or not shortest or tile != crop.get("width") or shortest != tile:
            return None
        if not (getattr(image_processor, "do_resize", True) and getattr(image_processor, "do_center_crop", True)):
            return None
        if any(h % tile or w % tile for h, w in grid):
            return None
        resample = getattr(image_processor, "resample", None)
        return AnyresPlan(
            grid=tuple((int(h), int(w)) for h, w in grid),
            tile=int(tile),
            thumbnail=(int(shortest), int(shortest)),
            resample=int(Image.Resampling.BICUBIC if resample is None else resample),
        )

    def best_resolution(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) of the grid point that keeps the most pixels, then wastes the least
        (transformers' `select_best_resolution`, same arithmetic, same tie-breaking)."""
        best, best_effective, best_wasted = self.grid[0], 0, math.inf
        for grid_h, grid_w in self.grid:
            scale = min(grid_w / width, grid_h / height)
            effective = min(int(width * scale) * int(height * scale), width * height)
            wasted = grid_w * grid_h - effective
            if effective > best_effective or (effective == best_effective and wasted < best_wasted):
                best, best_effective, best_wasted = (grid_h, grid_w), effective, wasted
        return best

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) the image takes inside its grid point, aspect ratio kept
        (transformers' `get_patch_output_size`: the long side fills, the other rounds up)."""
        grid_h, grid_w = self.best_resolution(width, height)
        scale_w, scale_h = grid_w / width, grid_h / height
        if scale_w < scale_h:
            return grid_w, min(math.ceil(height * scale_w), grid_h)
        return min(math.ceil(width * scale_h), grid_w), grid_h

    def source_size(self, width: int, height: int) -> tuple[int, int]:
        """The least pixels a decoder must deliver for an image the model is told is
        width x height: enough for the grid resize and for the thumbnail, never more than
        the image itself."""
        resized_w, resized_h = self.resized_size(width, height)
        thumb_h, thumb_w = self.thumbnail
        return min(width, max(resized_w, thumb_w)), min(height, max(resized_h, thumb_h))

    def n_tiles(self, width: int, height: int) -> int:
        grid_h, grid_w = self.best_resolution(width, height)
        return 1 + (grid_h // self.tile) * (grid_w // self.tile)

    def tile_image(self, image: Image.Image, size: tuple[int, int] | None = None) -> np.ndarray:
        """uint8 [1 + rows * cols, 3, tile, tile]: the thumbnail, then the grid row by row.
        `size` is the (width, height) the model is told, when the pixels were decoded smaller."""
        width, height = size or image.size
        grid_h, grid_w = self.best_resolution(width, height)
        resized_w, resized_h = self.resized_size(width, height)
        canvas = np.zeros((grid_h, grid_w, 3), dtype=np.uint8)
        top, left = (grid_h - resized_h) // 2, (grid_w - resized_w) // 2
        canvas[top : top + resized_h, left : left + resized_w] = self._resize(image, resized_w, resized_h)
        tile = self.tile
        tiles = canvas.reshape(grid_h // tile, tile, grid_w // tile, tile, 3).transpose(0, 2, 4, 1, 3)
        thumb_h, thumb_w = self.thumbnail
        thumbnail = self._resize(image, thumb_w, thumb_h).transpose(2, 0, 1)
        out = np.empty((1 + tiles.shape[0] * tiles.shape[1], 3, tile, tile), dtype=np.uint8)
        out[0] = thumbnail
        out[1:] = tiles.reshape(-1, 3, tile, tile)
        return out

    def _resize(self, image: Image.Image, width: int, height: int) -> np.ndarray:
        if image.size != (width, height):
            image = image.resize((width, height), self.resample)
        return np.asarray(image.convert("RGB") if image.mode != "RGB" else image)


def _get(image_processor, name: str) -> dict:
    """`size` / `crop_size` as a dict, whether the processor keeps a dict or a SizeDict."""
    value = getattr(image_processor, name, None) or {}
    if isinstance(value, dict):
        return value
    return {key: getattr(value, key, None) for key in ("height", "width", "shortest_edge")}
