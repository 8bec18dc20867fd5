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
from actors.sizing import CapPixels, Fit, LongestEdge, SmartResize


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
    # True when the family's processor takes a video as a video (prepare's `videos`); else a
    # video's frames go in as images.
    native_video = False

    # Video frames go in as images this big (a tile), unless native video: a fixed
    # (width, height), or a Fit of each frame's own size.
    def frame_size(self, processor) -> tuple[int, int] | Fit:
        crop = getattr(processor.image_processor, "crop_size", None) or {}
        height = getattr(crop, "height", None) or (crop.get("height") if isinstance(crop, dict) else None)
        width = getattr(crop, "width", None) or (crop.get("width") if isinstance(crop, dict) else None)
        return (int(width or 336), int(height or 336))

    def fit(self, processor) -> Fit | None:
        """The size the processor resizes a still image to (actors/sizing.py), for the CPU stage
        to decode straight to. By default only a cap: the most pixels the processor keeps."""
        bound = self.max_pixels(processor)
        return CapPixels(bound) if bound else None

    def prepare(
        self, processor, images: list[Image.Image], kind: str, text: str, videos: list[list[Image.Image]] | None = None
    ) -> ModelInputs:
        """`images` in prompt order; `kind` "video" when they are the frames of a video.
        `videos` (each one's frames, in prompt order) only for a family with native_video."""
        if videos:
            raise ValueError(f"{type(self).__name__} takes no native video; send its frames as images")
        if kind == "video":
            size = self.frame_size(processor)
            images = [frame.resize(size, Image.Resampling.BICUBIC) if frame.size != size else frame for frame in images]
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
    28 px and cut into 14-px patches, flattened; a video the same, two frames to a patch.

    pixels: uint8 [patches of the row, 3 * temporal_patch * 14 * 14] (channel-major inside a
    patch, as the processor flattens it): the images' patches, then the videos'. extras:
    image_grid_thw [images, 3] and video_grid_thw [videos, 3]. The prompt's one <|image_pad|>
    per image (<|video_pad|> per video) becomes t*h*w / merge² of them.
    """

    native_video = True

    def max_pixels(self, processor) -> int | None:
        return (getattr(processor.image_processor, "size", None) or {}).get("longest_edge")

    def fit(self, processor) -> Fit:
        image_processor = processor.image_processor
        size = image_processor.size
        return SmartResize(_factor(image_processor), size.get("shortest_edge"), size.get("longest_edge"), _resample(image_processor))

    def frame_size(self, processor) -> Fit:
        """Each frame keeps its aspect ratio within the video processor's pixel budget."""
        min_pixels, max_pixels = _video_budget(processor)
        return SmartResize(_factor(processor.image_processor), min_pixels, max_pixels)

    def prepare(self, processor, images, kind, text, videos=None):
        if kind == "video" and not videos:
            images, videos = [], [images]  # the frames of one video
        ids = processor.tokenizer([text], return_tensors="np")["input_ids"][0].astype(np.int32)
        if not images and not videos:
            return ModelInputs(input_ids=ids, pixels=None)
        image_processor = processor.image_processor
        merge = int(getattr(image_processor, "merge_size", 2))
        patches, image_grid = [], np.zeros((0, 3), dtype=np.int64)
        if images:
            out = image_processor(images=images, return_tensors="np", do_rescale=False, do_normalize=False)
            image_grid = np.asarray(out["image_grid_thw"], dtype=np.int64).reshape(-1, 3)
            patches.append(np.clip(np.rint(out["pixel_values"]), 0, 255).astype(np.uint8))
            ids = expand_placeholders(ids, _token_id(processor, "image_token", "<|image_pad|>"), _merged(image_grid, merge))
        video_grid = np.zeros((0, 3), dtype=np.int64)
        if videos:
            flat = [video_patches(frames, image_processor) for frames in videos]
            video_grid = np.stack([grid for _, grid in flat])
            patches.extend(video for video, _ in flat)
            ids = expand_placeholders(ids, _token_id(processor, "video_token", "<|video_pad|>"), _merged(video_grid, merge))
        return ModelInputs(
            input_ids=ids, pixels=np.ascontiguousarray(np.concatenate(patches)),
            extras={"image_grid_thw": image_grid, "video_grid_thw": video_grid},
            n_tiles=len(image_grid) + int(video_grid[:, 0].sum()),
        )

    def collate(self, items, pad_token_id, norm, device, dtype):
        batch = left_pad(items, pad_token_id, device)
        with_pixels = [item for item in items if item.pixels is not None]
        if not with_pixels:
            return batch
        images, videos, image_grids, video_grids = [], [], [], []
        for item in with_pixels:
            image_grid = item.extras["image_grid_thw"]
            split = int(image_grid.prod(-1).sum())
            images.append(item.pixels[:split])
            videos.append(item.pixels[split:])
            image_grids.append(image_grid)
            video_grids.append(item.extras.get("video_grid_thw", np.zeros((0, 3), dtype=np.int64)))
        for key, grid_key, parts, grids in (
            ("pixel_values", "image_grid_thw", images, image_grids),
            ("pixel_values_videos", "video_grid_thw", videos, video_grids),
        ):
            grid = np.concatenate(grids)
            if len(grid):
                batch[key] = self._normalise(np.concatenate(parts), norm, device, dtype)
                batch[grid_key] = torch.from_numpy(grid).to(device)
        return batch

    @staticmethod
    def _normalise(patches: np.ndarray, norm: PixelNorm, device, dtype) -> torch.Tensor:
        flat = torch.from_numpy(patches).to(device)
        channels = len(norm.mean)
        return norm.apply(flat.view(flat.shape[0], channels, -1), dtype, channel_dim=1).reshape(flat.shape)


# Qwen2VLVideoProcessor's per-frame pixel budget in transformers 5.23, for checkpoints whose
# video processor cannot be loaded here (it needs torchvision).
_QWEN2_VL_VIDEO_PIXELS = (128 * 28 * 28, 768 * 28 * 28)


def _video_budget(processor) -> tuple[int, int]:
    """(min, max) pixels per frame: the video processor's, or without one its defaults, never
    above the image processor's own budget (the tiny model's is far smaller)."""
    video = getattr(processor, "video_processor", None)
    if video is not None and getattr(video, "size", None):
        return int(video.size.get("shortest_edge")), int(video.size.get("longest_edge"))
    size = processor.image_processor.size
    return (
        min(int(size.get("shortest_edge") or _QWEN2_VL_VIDEO_PIXELS[0]), _QWEN2_VL_VIDEO_PIXELS[0]),
        min(int(size.get("longest_edge") or _QWEN2_VL_VIDEO_PIXELS[1]), _QWEN2_VL_VIDEO_PIXELS[1]),
    )


def video_patches(frames: list[Image.Image], image_processor) -> tuple[np.ndarray, np.ndarray]:
    """uint8 patches [t*h*w, 3 * temporal * patch²] and grid (t, h, w) of one video, laid out as
    Qwen2VLVideoProcessor.patchify lays them (an odd frame count repeats the last frame). The
    frames arrive at a size smart_resize keeps (the decoder's frame_size), so the processor's
    resize would leave them as they are."""
    patch = int(image_processor.patch_size)
    merge = int(getattr(image_processor, "merge_size", 2))
    temporal = int(getattr(image_processor, "temporal_patch_size", 2))
    size = frames[0].size
    video = np.stack([np.asarray(f.convert("RGB").resize(size) if f.size != size else f.convert("RGB")) for f in frames])
    video = video.transpose(0, 3, 1, 2)  # [frames, 3, H, W]
    if pad := -len(video) % temporal:
        video = np.concatenate([video, np.repeat(video[-1:], pad, axis=0)])
    frames_n, channels, height, width = video.shape
    grid_t, grid_h, grid_w = frames_n // temporal, height // patch, width // patch
    patches = video.reshape(grid_t, temporal, channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
    patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    flat = patches.reshape(grid_t * grid_h * grid_w, channels * temporal * patch * patch)
    return np.ascontiguousarray(flat), np.array([grid_t, grid_h, grid_w], dtype=np.int64)


def _factor(image_processor) -> int:
    return int(image_processor.patch_size) * int(getattr(image_processor, "merge_size", 2))


def _merged(grid: np.ndarray, merge: int) -> list[int]:
    return [int(t * h * w) // merge**2 for t, h, w in grid]


def _token_id(processor, name: str, default: str) -> int:
    token = getattr(processor, name, None) or getattr(processor.tokenizer, name, None) or default
    return processor.tokenizer.convert_tokens_to_ids(token)


def _resample(image_processor) -> int:
    resample = getattr(image_processor, "resample", None)
    return int(Image.Resampling.BICUBIC if resample is None else resample)


class Idefics3Adapter(Adapter):
    """Idefics3 / SmolVLM: each image split into a grid of tiles plus a global view, every
    tile padded to the largest and masked by `pixel_attention_mask`.

    pixels: uint8 [tiles of the row, 3, H, W]; extras: pixel_attention_mask bool [tiles, H, W].
    The processor writes the prompt's tile tokens (<row_r_col_c>, <image> × image_seq_len).
    """

    def max_pixels(self, processor) -> int | None:
        longest = (getattr(processor.image_processor, "size", None) or {}).get("longest_edge")
        return int(longest) ** 2 if longest else None

    def fit(self, processor) -> Fit | None:
        longest = (getattr(processor.image_processor, "size", None) or {}).get("longest_edge")
        return LongestEdge(int(longest), _resample(processor.image_processor)) if longest else None

    def frame_size(self, processor) -> tuple[int, int]:
        side = int((getattr(processor.image_processor, "max_image_size", None) or {}).get("longest_edge") or 364)
        return (side, side)

    def prepare(self, processor, images, kind, text, videos=None):
        if videos:
            raise ValueError("Idefics3 takes no native video; send its frames as images")
        options = {}
        if kind == "video":
            # A frame is one tile: no split, and no upscaling to the longest edge first (the
            # processor would blow each frame up to a 4x4 grid plus its global view).
            size = self.frame_size(processor)
            images = [frame.resize(size, Image.Resampling.BICUBIC) if frame.size != size else frame for frame in images]
            options = {"do_image_splitting": False, "do_resize": False}
        out = processor(
            text=[text], images=[images] if images else None, return_tensors="np", do_rescale=False, do_normalize=False,
            **options,
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
