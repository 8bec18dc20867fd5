"""Per-model-family quirks, in one registry: how to turn images + prompt into ModelInputs on a
CPU worker, and how to collate a batch of them into `generate()` kwargs in the actor.

The CPU side runs the model's own processor with rescaling and normalisation switched off,
so tiling, resizing and placeholder expansion are exactly the processor's, while pixels stay
uint8; the actor side finishes the job (x * rescale - mean) / std on its device. Add a family
by writing one small adapter and registering it under the config's `model_type`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image

from actors.inputs import ModelInputs


@dataclass(frozen=True)
class PixelNorm:
    rescale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @staticmethod
    def of(image_processor) -> "PixelNorm":
        return PixelNorm(
            rescale=float(getattr(image_processor, "rescale_factor", 1 / 255)),
            mean=tuple(image_processor.image_mean),
            std=tuple(image_processor.image_std),
        )

    def apply(self, pixels: torch.Tensor, dtype: torch.dtype, channel_dim: int) -> torch.Tensor:
        """uint8 -> normalised float, per channel along `channel_dim`."""
        shape = [1] * pixels.dim()
        shape[channel_dim] = -1
        mean = torch.tensor(self.mean, device=pixels.device, dtype=torch.float32).view(shape)
        std = torch.tensor(self.std, device=pixels.device, dtype=torch.float32).view(shape)
        return ((pixels.to(torch.float32) * self.rescale - mean) / std).to(dtype)


class Adapter:
    """The default: one processor call per row; subclasses say how pixels are laid out."""

    # True when the family can take images the CPU worker has already cut into uint8 tiles
    # (pipeline/tiling.py, which reproduces its processor), skipping the processor's own.
    accepts_tiles = False

    # Video frames go in as single images this big (no per-frame grid), unless native video.
    def frame_size(self, processor) -> tuple[int, int]:
        crop = getattr(processor.image_processor, "crop_size", None) or {}
        height = getattr(crop, "height", None) or (crop.get("height") if isinstance(crop, dict) else None)
        width = getattr(crop, "width", None) or (crop.get("width") if isinstance(crop, dict) else None)
        return (int(width or 336), int(height or 336))

    def prepare(self, processor, images: list[Image.Image], kind: str, text: str) -> ModelInputs:
        if kind == "video":
            size = self.frame_size(processor)
            images = [frame.resize(size, Image.Resampling.BICUBIC) for frame in images]
        out = processor(
            text=[text],
            images=images or None,
            return_tensors="np",
            do_rescale=False,
            do_normalize=False,
        )
        return self.pack(processor, out, len(images))

    def prepare_for_engine(self, processor, images: list[Image.Image], text: str) -> ModelInputs:
        """For an engine that runs the model's processor itself (vLLM): the prompt text and
        the images as uint8 arrays, each no larger than the processor would ever use."""
        bound = self.max_pixels(processor)
        arrays = []
        for image in images:
            width, height = image.size
            if bound and width * height > bound:
                scale = (bound / (width * height)) ** 0.5
                image = image.resize((max(1, int(width * scale)), max(1, int(height * scale))), Image.Resampling.BICUBIC)
            arrays.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
        ids = processor.tokenizer([text], return_tensors="np")["input_ids"][0].astype(np.int32)
        return ModelInputs(input_ids=ids, pixels=None, text=text, images=arrays, n_tiles=len(arrays))

    def max_pixels(self, processor) -> int | None:
        """The most pixels of an image the processor keeps (None: unknown, keep all)."""
        return None

    def prepare_tiled(self, processor, tiles: list[np.ndarray], sizes: list[tuple[int, int]], text: str) -> ModelInputs:
        """Like `prepare`, for images already tiled: uint8 [tiles, 3, H, W] and the
        (width, height) the model is told, per image."""
        raise NotImplementedError(f"{type(self).__name__} does not take pre-tiled images")

    def pack(self, processor, out, n_images: int) -> ModelInputs:
        raise NotImplementedError

    def collate(self, items: list[ModelInputs], pad_token_id: int, norm: PixelNorm, device, dtype) -> dict:
        raise NotImplementedError


def expand_placeholders(ids: np.ndarray, placeholder_id: int, counts: list[int]) -> np.ndarray:
    """Each occurrence of `placeholder_id` repeated counts[i] times, in order."""
    positions = np.flatnonzero(ids == placeholder_id)
    if len(positions) != len(counts):
        raise ValueError(f"the prompt has {len(positions)} image placeholders for {len(counts)} images")
    repeats = np.ones(len(ids), dtype=np.int64)
    repeats[positions] = counts
    return np.repeat(ids, repeats)


def left_pad(items: list[ModelInputs], pad_token_id: int, device) -> dict[str, torch.Tensor]:
    """Token ids left-padded to the longest row, as generate() wants for decoder-only models."""
    longest = max(len(item.input_ids) for item in items)
    ids = torch.full((len(items), longest), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(items), longest), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        ids[row, longest - n :] = torch.from_numpy(item.input_ids.astype(np.int64))
        mask[row, longest - n :] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


class LlavaNextAdapter(Adapter):
    """LLaVA-NeXT anyres (and MiniMax-VL-01's scheme): per image, a thumbnail plus grid tiles.

    pixels: uint8 [total tiles of the row, 3, H, W]; extras: image_sizes [images, 2] and
    tiles_per_image [images]. The batch pads every image to the same tile count, which the
    model drops again using image_sizes.
    """

    accepts_tiles = True

    def max_pixels(self, processor) -> int | None:
        grid = getattr(processor.image_processor, "image_grid_pinpoints", None)
        return max(int(h) * int(w) for h, w in grid) if grid else None

    def prepare_tiled(self, processor, tiles, sizes, text):
        # The placeholder count per image is the processor's own rule applied to the size the
        # model is told, so it equals what the processor gives for the full-size image.
        image_inputs = {"pixel_values": tiles, "image_sizes": [(height, width) for width, height in sizes]}
        replacements = [processor.replace_image_token(image_inputs, image_idx=i) for i in range(len(tiles))]
        token = processor.image_token
        counts = [len(r) // len(token) for r in replacements]
        if all(r == token * n for r, n in zip(replacements, counts)):
            input_ids = expand_placeholders(self._token_ids(processor, text), processor.image_token_id, counts)
        else:  # a placeholder with more than repeats of one token: tokenize it as the processor does
            texts, _ = processor.get_text_with_replacements([text], replacements)
            input_ids = processor.tokenizer(texts, return_tensors="np")["input_ids"][0].astype(np.int32)
        if not tiles:
            return ModelInputs(input_ids=input_ids, pixels=None)
        pixels = np.ascontiguousarray(np.concatenate(tiles))
        return ModelInputs(
            input_ids=input_ids,
            pixels=pixels,
            extras={
                "image_sizes": np.asarray(image_inputs["image_sizes"], dtype=np.int64).reshape(-1, 2),
                "tiles_per_image": np.asarray([len(t) for t in tiles], dtype=np.int32),
            },
            n_tiles=int(pixels.shape[0]),
        )

    def _token_ids(self, processor, text: str) -> np.ndarray:
        """The text with one placeholder per image, tokenized once per distinct text (most
        jobs have one prompt): special tokens never merge with their neighbours, so expanding
        the ids afterwards equals tokenizing the expanded text (tests/test_tiling.py)."""
        cache = self.__dict__.setdefault("_ids_cache", {})
        ids = cache.get(text)
        if ids is None:
            if len(cache) >= 256:
                cache.clear()
            ids = cache[text] = processor.tokenizer([text], return_tensors="np")["input_ids"][0].astype(np.int32)
        return ids

    def pack(self, processor, out, n_images: int) -> ModelInputs:
        input_ids = out["input_ids"][0].astype(np.int32)
        if n_images == 0:
            return ModelInputs(input_ids=input_ids, pixels=None)
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        pixel_values = out["pixel_values"]  # [images, max tiles, 3, H, W], padded
        sizes = np.asarray(out["image_sizes"], dtype=np.int64).reshape(-1, 2)
        counts = []
        tiles = []
        grid = processor.image_processor.image_grid_pinpoints
        tile_size = pixel_values.shape[-1]
        for index, size in enumerate(sizes):
            count = image_size_to_num_patches(tuple(int(v) for v in size), grid, tile_size)
            counts.append(count)
            tiles.append(pixel_values[index, :count])
        pixels = np.ascontiguousarray(np.concatenate(tiles).astype(np.uint8))
        return ModelInputs(
            input_ids=input_ids,
            pixels=pixels,
            extras={"image_sizes": sizes, "tiles_per_image": np.asarray(counts, dtype=np.int32)},
            n_tiles=int(pixels.shape[0]),
        )

    def collate(self, items, pad_token_id, norm, device, dtype):
        batch = left_pad(items, pad_token_id, device)
        with_images = [item for item in items if item.pixels is not None]
        if not with_images:
            return batch
        counts = np.concatenate([item.extras["tiles_per_image"] for item in with_images])
        _, channels, height, width = with_images[0].pixels.shape
        padded = torch.zeros((len(counts), int(counts.max()), channels, height, width), dtype=torch.uint8)
        image = 0
        for item in with_images:
            start = 0
            for count in item.extras["tiles_per_image"]:
                padded[image, :count] = torch.from_numpy(item.pixels[start : start + count])
                start += count
                image += 1
        sizes = np.concatenate([item.extras["image_sizes"] for item in with_images])
        batch["pixel_values"] = norm.apply(padded.to(device), dtype, channel_dim=2)
        batch["image_sizes"] = torch.from_numpy(sizes).to(device)
        return batch


class Qwen2VLAdapter(Adapter):
    """Qwen2-VL / Qwen2.5-VL native dynamic resolution: each image resized to a multiple of
    28 px and cut into 14-px patches, flattened.

    pixels: uint8 [patches of the row, 3 * temporal_patch * 14 * 14] (channel-major inside a
    patch, as the processor flattens it); extras: image_grid_thw [images, 3]. The prompt's one
    <|image_pad|> per image becomes t*h*w / merge² of them.
    """

    def max_pixels(self, processor) -> int | None:
        return (getattr(processor.image_processor, "size", None) or {}).get("longest_edge")

    def frame_size(self, processor) -> tuple[int, int]:
        longest = (getattr(processor.image_processor, "size", None) or {}).get("longest_edge") or 448 * 448
        side = max(28, int(longest**0.5) // 28 * 28)
        return (side, side)

    def prepare(self, processor, images, kind, text):
        if kind == "video":
            images = [frame.resize(self.frame_size(processor), Image.Resampling.BICUBIC) for frame in images]
        ids = processor.tokenizer([text], return_tensors="np")["input_ids"][0].astype(np.int32)
        if not images:
            return ModelInputs(input_ids=ids, pixels=None)
        image_processor = processor.image_processor
        out = image_processor(images=images, return_tensors="np", do_rescale=False, do_normalize=False)
        grid = np.asarray(out["image_grid_thw"], dtype=np.int64).reshape(-1, 3)
        merge = int(getattr(image_processor, "merge_size", 2))
        image_token_id = processor.tokenizer.convert_tokens_to_ids(_image_token(processor, "<|image_pad|>"))
        input_ids = expand_placeholders(ids, image_token_id, [int(t * h * w) // merge**2 for t, h, w in grid])
        pixels = np.clip(np.rint(out["pixel_values"]), 0, 255).astype(np.uint8)
        return ModelInputs(input_ids=input_ids, pixels=np.ascontiguousarray(pixels), extras={"image_grid_thw": grid},
                           n_tiles=len(grid))

    def collate(self, items, pad_token_id, norm, device, dtype):
        batch = left_pad(items, pad_token_id, device)
        with_images = [item for item in items if item.pixels is not None]
        if not with_images:
            return batch
        patches = torch.from_numpy(np.concatenate([item.pixels for item in with_images])).to(device)
        channels = len(norm.mean)
        flat = norm.apply(patches.view(patches.shape[0], channels, -1), dtype, channel_dim=1)
        batch["pixel_values"] = flat.reshape(patches.shape)
        batch["image_grid_thw"] = torch.from_numpy(np.concatenate([item.extras["image_grid_thw"] for item in with_images])).to(device)
        return batch


class Idefics3Adapter(Adapter):
    """Idefics3 / SmolVLM: each image split into a grid of tiles plus a global view, every
    tile padded to the largest and masked by `pixel_attention_mask`.

    pixels: uint8 [tiles of the row, 3, H, W]; extras: pixel_attention_mask bool [tiles, H, W].
    The processor writes the prompt's tile tokens (<row_r_col_c>, <image> × image_seq_len).
    """

    def max_pixels(self, processor) -> int | None:
        longest = (getattr(processor.image_processor, "size", None) or {}).get("longest_edge")
        return int(longest) ** 2 if longest else None

    def frame_size(self, processor) -> tuple[int, int]:
        side = int((getattr(processor.image_processor, "max_image_size", None) or {}).get("longest_edge") or 364)
        return (side, side)

    def prepare(self, processor, images, kind, text):
        if kind == "video":
            images = [frame.resize(self.frame_size(processor), Image.Resampling.BICUBIC) for frame in images]
        out = processor(
            text=[text], images=[images] if images else None, return_tensors="np", do_rescale=False, do_normalize=False
        )
        input_ids = out["input_ids"][0].astype(np.int32)
        if not images:
            return ModelInputs(input_ids=input_ids, pixels=None)
        pixels = np.clip(np.rint(out["pixel_values"][0]), 0, 255).astype(np.uint8)
        mask = np.asarray(out["pixel_attention_mask"][0], dtype=bool)
        return ModelInputs(
            input_ids=input_ids, pixels=np.ascontiguousarray(pixels), extras={"pixel_attention_mask": mask},
            n_tiles=int(pixels.shape[0]),
        )

    def collate(self, items, pad_token_id, norm, device, dtype):
        batch = left_pad(items, pad_token_id, device)
        with_images = [item for item in items if item.pixels is not None]
        if not with_images:
            return batch
        most = max(item.pixels.shape[0] for item in items if item.pixels is not None)
        _, channels, height, width = with_images[0].pixels.shape
        # Padding tiles stay exactly zero: the model drops all-zero tiles as padding.
        pixels = torch.zeros((len(items), most, channels, height, width), dtype=dtype, device=device)
        mask = torch.zeros((len(items), most, height, width), dtype=torch.bool, device=device)
        for row, item in enumerate(items):
            if item.pixels is None:
                continue
            tiles = torch.from_numpy(item.pixels).to(device)
            real = torch.from_numpy(item.extras["pixel_attention_mask"]).to(device)
            # The processor pads a tile after normalising it: padded pixels are 0, not -mean/std.
            pixels[row, : len(tiles)] = norm.apply(tiles, dtype, channel_dim=1) * real.unsqueeze(1)
            mask[row, : len(tiles)] = real
        batch["pixel_values"] = pixels
        batch["pixel_attention_mask"] = mask
        return batch


def _image_token(processor, default: str) -> str:
    return getattr(processor, "image_token", None) or getattr(processor.tokenizer, "image_token", None) or default


ADAPTERS: dict[str, Callable[[], Adapter]] = {
    "llava_next": LlavaNextAdapter,
    "qwen2_vl": Qwen2VLAdapter,
    "qwen2_5_vl": Qwen2VLAdapter,
    "idefics3": Idefics3Adapter,
    "smolvlm": Idefics3Adapter,
}


def adapter_for(model_type: str) -> Adapter:
    try:
        return ADAPTERS[model_type]()
    except KeyError:
        known = ", ".join(sorted(ADAPTERS))
        raise ValueError(f"no adapter for model_type {model_type!r}; known: {known}") from None
