"""pipeline/tiling.py reproduces the model's own processor: same grid choice, same pixels, same
tokens — checked against transformers' LlavaNextProcessor of the embedded tiny model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from actors.adapters import LlavaNextAdapter
from actors.tiny import tiny_grid_pinpoints
from jobs.sample import synthetic_image
from pipeline.prepare import build_chat_text
from pipeline.tiling import AnyresPlan


@pytest.fixture(scope="module")
def processor(tiny_model_path):
    from actors.loading import load_processor

    return load_processor(str(tiny_model_path))


@pytest.fixture(scope="module")
def plan(processor) -> AnyresPlan:
    plan = AnyresPlan.from_processor(processor.image_processor)
    assert plan is not None
    return plan


def processor_tiles(processor, image: Image.Image) -> np.ndarray:
    out = processor.image_processor(images=[image], return_tensors="np", do_rescale=False, do_normalize=False)
    return out["pixel_values"][0].astype(np.uint8)


def test_the_builtin_tiny_model_gets_a_plan(processor):
    """The fast path must be on for the default model: without a plan every image is decoded
    full size and tiled by the processor (~80 ms instead of ~5)."""
    assert type(processor.image_processor).__name__ == "LlavaNextImageProcessorPil"
    assert AnyresPlan.from_processor(processor.image_processor) is not None


class LlavaNextImageProcessor(LlavaNextImageProcessorPil):
    """Stands in for transformers' torchvision class of the same name, which transformers
    picks whenever torchvision is importable and which cannot be built here without it."""

    backend = "torchvision"


def test_the_torchvision_class_is_swapped_for_the_pil_one(processor, plan, tiny_model_path):
    from actors.loading import with_pil_image_processor

    chosen = copy.copy(processor)  # the cached processor stays as it is
    chosen.image_processor = copy.deepcopy(processor.image_processor)
    chosen.image_processor.__class__ = LlavaNextImageProcessor
    assert AnyresPlan.from_processor(chosen.image_processor) is None  # what a GPU image used to get
    fixed = with_pil_image_processor(chosen, str(tiny_model_path))
    assert type(fixed.image_processor).__name__ == "LlavaNextImageProcessorPil"
    assert AnyresPlan.from_processor(fixed.image_processor) == plan


def _torchvision_works() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - absent, or a build that does not load beside this torch
        return False
    return True


@pytest.mark.skipif(not _torchvision_works(), reason="torchvision is not importable here")
def test_with_torchvision_installed_the_plan_is_still_found(tiny_model_path):
    from transformers import AutoProcessor

    from actors.loading import load_processor

    assert AutoProcessor.from_pretrained(str(tiny_model_path)).image_processor.backend == "torchvision"
    loaded = load_processor.__wrapped__(str(tiny_model_path))
    assert AnyresPlan.from_processor(loaded.image_processor) is not None


def test_plan_comes_from_the_processor_config(plan):
    assert [list(point) for point in plan.grid] == tiny_grid_pinpoints()
    assert plan.tile == 56 and plan.thumbnail == (56, 56)
    assert max(h // 56 * (w // 56) for h, w in plan.grid) == 18  # MiniMax-VL-01's limit, scaled down


SIZES = [(640, 480), (480, 640), (500, 375), (1920, 1080), (57, 1000), (1000, 57), (56, 56), (1, 1), (3, 700), (336, 168), (225, 169), (4000, 3000)]


@pytest.mark.parametrize("width,height", SIZES)
def test_tiles_equal_the_processor_pixel_for_pixel(processor, plan, width, height):
    image = synthetic_image(width, height, seed=width * 7 + height)
    expected = processor_tiles(processor, image)
    tiles = plan.tile_image(image)
    assert tiles.dtype == np.uint8
    assert tiles.shape == expected.shape
    assert np.array_equal(tiles, expected)
    assert tiles.shape[0] == plan.n_tiles(width, height)


# MiniMax-VL-01's own scale: 336-px tiles, every (h, w) multiple of 336 up to 2016 with at
# most 18 tiles (28 grid points), as a LLaVA-NeXT image processor built here (no download).
MINIMAX_GRID = [[h * 336, w * 336] for h in range(1, 7) for w in range(1, 7) if h * w <= 18]


@pytest.fixture(scope="module")
def minimax_scale():
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=MINIMAX_GRID,
    )
    return image_processor, AnyresPlan.from_processor(image_processor)


@pytest.mark.parametrize("width,height", [(640, 480), (1080, 1920), (1920, 1080), (2000, 57), (337, 335), (3000, 2000)])
def test_tiles_equal_a_minimax_scale_processor_pixel_for_pixel(minimax_scale, width, height):
    image_processor, plan = minimax_scale
    assert len(plan.grid) == 28 and plan.tile == 336 and max(h // 336 * (w // 336) for h, w in plan.grid) == 18
    image = synthetic_image(width, height, seed=width + height)
    expected = image_processor(images=[image], return_tensors="np", do_rescale=False, do_normalize=False)
    expected = expected["pixel_values"][0].astype(np.uint8)
    tiles = plan.tile_image(image)
    assert tiles.shape == expected.shape and tiles.shape[0] == plan.n_tiles(width, height) <= 19
    assert np.array_equal(tiles, expected)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(width=st.integers(1, 900), height=st.integers(1, 900))
def test_grid_choice_matches_transformers_for_any_size(plan, width, height):
    assert plan.best_resolution(width, height) == tuple(select_best_resolution((height, width), [list(p) for p in plan.grid]))
    resized_w, resized_h = plan.resized_size(width, height)
    grid_h, grid_w = plan.best_resolution(width, height)
    assert (resized_w == grid_w or resized_h == grid_h) and resized_w <= grid_w and resized_h <= grid_h


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(width=st.integers(1, 700), height=st.integers(1, 700), seed=st.integers(0, 1000))
def test_tiles_equal_the_processor_for_any_size(processor, plan, width, height, seed):
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))
    assert np.array_equal(plan.tile_image(image), processor_tiles(processor, image))


def test_source_size_is_enough_for_the_grid_and_the_thumbnail(plan):
    for width, height in SIZES:
        need_w, need_h = plan.source_size(width, height)
        resized_w, resized_h = plan.resized_size(width, height)
        assert need_w <= width and need_h <= height
        assert need_w >= min(width, max(resized_w, 56)) and need_h >= min(height, max(resized_h, 56))


def test_a_draft_decoded_image_is_tiled_as_its_full_size(processor, plan):
    """Pixels from a 1/8 draft decode, size from the header: the grid (and so the token
    count) is the full-size image's, whatever the decoder did."""
    full = synthetic_image(4000, 3000, seed=5)
    small = full.resize((500, 375), Image.Resampling.BICUBIC)
    tiles = plan.tile_image(small, size=full.size)
    assert tiles.shape == processor_tiles(processor, full).shape


@pytest.mark.parametrize("sizes", [[(640, 480)], [(320, 240), (1000, 57)], []])
def test_adapter_with_our_tiles_equals_adapter_with_the_processor(processor, plan, sizes):
    images = [synthetic_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    text = build_chat_text(processor, "Describe these.", len(images))
    adapter = LlavaNextAdapter()
    reference = adapter.prepare(processor, images, "image", text)
    if not images:
        ours = adapter.prepare(processor, [], "image", text)
    else:
        ours = adapter.prepare_tiled(processor, [plan.tile_image(image) for image in images], [im.size for im in images], text)
    assert np.array_equal(ours.input_ids, reference.input_ids)
    assert ours.n_tiles == reference.n_tiles
    if images:  # the second row with the same prompt reuses its tokens: still the same ids
        again = adapter.prepare_tiled(processor, [plan.tile_image(image) for image in images], [im.size for im in images], text)
        assert np.array_equal(again.input_ids, reference.input_ids)
    if images:
        assert ours.pixels.dtype == np.uint8 and np.array_equal(ours.pixels, reference.pixels)
        for key in ("image_sizes", "tiles_per_image"):
            assert np.array_equal(ours.extras[key], reference.extras[key])
        assert ours.pixel_bytes == ours.pixels.nbytes == reference.pixel_bytes


def test_processors_we_cannot_reproduce_get_no_plan(processor):
    image_processor = copy.deepcopy(processor.image_processor)
    image_processor.crop_size = {"height": 56, "width": 112}
    assert AnyresPlan.from_processor(image_processor) is None

    class SomeOtherProcessor:
        image_grid_pinpoints = [[336, 336]]
        size = {"shortest_edge": 336}
        crop_size = {"height": 336, "width": 336}

    assert AnyresPlan.from_processor(SomeOtherProcessor()) is None
