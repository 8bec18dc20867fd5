"""Model-agnostic, proven: a job end to end on tiny random-weight checkpoints of three
families built locally (LLaVA-NeXT is tests/test_e2e_local.py; here Qwen2-VL and Idefics3 /
SmolVLM), with schema-constrained output, read back with DuckDB. Also: each family's adapter
gives the model exactly the tensors its own processor would (uint8 in transit, normalised
in the actor)."""

from __future__ import annotations

import io
import json

import duckdb
import numpy as np
import pytest
from PIL import Image

FAMILIES = [("builtin:tiny-qwen2-vl", "qwen2_vl"), ("builtin:tiny-idefics3", "idefics3")]


def _images():
    rng = np.random.RandomState(7)
    return [
        Image.fromarray(rng.randint(0, 255, (90, 120, 3), dtype=np.uint8)),
        Image.new("RGB", (150, 100), (10, 200, 30)),
    ]


@pytest.mark.parametrize("uri, model_type", FAMILIES)
def test_adapter_matches_processor(uri, model_type):
    import torch

    from actors.adapters import PixelNorm, adapter_for
    from actors.loading import load_processor
    from actors.tiny import ensure_tiny_model
    from pipeline.prepare import build_chat_text

    processor = load_processor(str(ensure_tiny_model(uri=uri)))
    adapter = adapter_for(model_type)
    images = _images()
    text = build_chat_text(processor, "Describe the image.", len(images))
    inputs = adapter.prepare(processor, images, "image", text)
    assert inputs.pixels.dtype == np.uint8
    batch = adapter.collate([inputs], processor.tokenizer.pad_token_id, PixelNorm.of(processor.image_processor), torch.device("cpu"), torch.float32)
    if model_type == "qwen2_vl":
        reference = processor.image_processor(images=images, return_tensors="pt")
        assert torch.equal(reference["image_grid_thw"], batch["image_grid_thw"])
        image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        merge = processor.image_processor.merge_size
        assert int((batch["input_ids"] == image_token).sum()) == int(reference["image_grid_thw"].prod(-1).sum()) // merge**2
    else:
        reference = processor(text=[text], images=[images], return_tensors="pt")
        assert torch.equal(reference["input_ids"], batch["input_ids"])
        assert torch.equal(reference["pixel_attention_mask"], batch["pixel_attention_mask"])
    assert torch.allclose(reference["pixel_values"], batch["pixel_values"], atol=1e-5)


def _family(uri, model_type):
    from actors.adapters import adapter_for
    from actors.loading import load_processor
    from actors.tiny import ensure_tiny_model

    return load_processor(str(ensure_tiny_model(uri=uri))), adapter_for(model_type)


def _shaping(processor, adapter):
    from pipeline.decode import Shaping

    return Shaping(adapter.frame_size(processor), None, fit=adapter.fit(processor))


@pytest.mark.parametrize("uri, model_type", FAMILIES)
def test_a_large_jpeg_is_draft_decoded_to_what_the_processor_keeps(uri, model_type):
    """No tiling plan for these families, yet a 4000x3000 photo is decoded at a JPEG draft
    scale, straight to the size the processor resizes it to; the processor then gives the
    grid and tokens it gives for the full-size image."""
    from jobs.sample import encode_image, synthetic_image
    from pipeline.decode import prepare_media
    from pipeline.prepare import build_chat_text
    from schemas.spec import MediaSpec

    processor, adapter = _family(uri, model_type)
    data = encode_image(synthetic_image(4000, 3000, seed=3), "jpeg")
    (image,) = prepare_media(data, None, MediaSpec(), _shaping(processor, adapter)).images
    fitted = adapter.fit(processor)(4000, 3000)
    assert image.size == fitted and fitted[0] < 4000 and fitted[1] < 3000

    drafted = Image.open(io.BytesIO(data))
    drafted.draft("RGB", fitted)  # the smallest DCT scale not below the fitted size
    assert drafted.size[0] < 4000 and drafted.size[0] >= fitted[0]
    expected = drafted.convert("RGB").resize(fitted, adapter.fit(processor).resample)
    assert np.array_equal(np.asarray(image), np.asarray(expected))  # decoded from the draft, not the full image

    full = Image.open(io.BytesIO(data)).convert("RGB")
    text = build_chat_text(processor, "Describe the image.", 1)
    ours, reference = adapter.prepare(processor, [image], "image", text), adapter.prepare(processor, [full], "image", text)
    assert np.array_equal(ours.input_ids, reference.input_ids) and ours.pixels.shape == reference.pixels.shape
    for key, value in reference.extras.items():
        if key != "pixel_attention_mask" or model_type == "idefics3":
            assert np.array_equal(ours.extras[key], value), key


@pytest.mark.parametrize("uri, model_type", FAMILIES)
def test_fitted_decoding_leaves_the_processor_nothing_to_resize(uri, model_type):
    """Where no draft is possible the decoder's resize is the processor's own (same filter,
    same size): the tensors are exactly the processor's for the original image."""
    from pipeline.decode import prepare_media
    from pipeline.prepare import build_chat_text
    from schemas.spec import MediaSpec

    processor, adapter = _family(uri, model_type)
    images = _images() + [Image.new("RGB", (40, 300), "white")]
    decoded = []
    for image in images:
        png = io.BytesIO()
        image.save(png, "PNG")
        decoded += prepare_media(png.getvalue(), None, MediaSpec(), _shaping(processor, adapter)).images
    text = build_chat_text(processor, "Describe the images.", len(images))
    ours, reference = adapter.prepare(processor, decoded, "image", text), adapter.prepare(processor, images, "image", text)
    assert np.array_equal(ours.input_ids, reference.input_ids)
    assert np.array_equal(ours.pixels, reference.pixels)


def _video(seconds=3.0, size=(96, 64)) -> bytes:
    from jobs.sample import encode_video

    return encode_video(seconds=seconds, fps=10, size=size, seed=1)


def test_qwen2_vl_gets_a_video_as_a_video():
    """Frames keep their aspect ratio within the video budget and go in as
    pixel_values_videos + video_grid_thw, which the model takes."""
    import torch

    from actors.adapters import PixelNorm
    from actors.tiny import ensure_tiny_model
    from pipeline.decode import prepare_media
    from pipeline.prepare import build_chat_text
    from schemas.spec import MediaSpec

    processor, adapter = _family(*FAMILIES[0])
    media = prepare_media(_video(size=(320, 180)), None, MediaSpec(), _shaping(processor, adapter))
    assert media.kind == "video" and media.as_frames and media.n_frames == 3
    width, height = media.images[0].size
    assert (width, height) == adapter.frame_size(processor)(320, 180) == (280, 168)  # ~16:9 within 224², not square
    text = build_chat_text(processor, "What happens?", ["video"])
    inputs = adapter.prepare(processor, media.images, "video", text)
    t, h, w = inputs.extras["video_grid_thw"][0]
    assert (t, h, w) == (2, height // 14, width // 14)  # 3 frames -> 2 temporal patches (the last repeated)
    assert len(inputs.extras["image_grid_thw"]) == 0 and inputs.pixels.dtype == np.uint8
    video_token = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert int((inputs.input_ids == video_token).sum()) == t * h * w // 4
    batch = adapter.collate([inputs], processor.tokenizer.pad_token_id, PixelNorm.of(processor.image_processor), torch.device("cpu"), torch.float32)
    assert "pixel_values" not in batch and batch["pixel_values_videos"].shape == (t * h * w, 3 * 2 * 14 * 14)

    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(str(ensure_tiny_model(uri=FAMILIES[0][0]))).eval()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3


def _torchvision_works() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - absent, or a build that does not load beside this torch
        return False
    return True


@pytest.mark.skipif(not _torchvision_works(), reason="Qwen2VLVideoProcessor needs torchvision")
def test_video_patches_equal_qwen2_vl_video_processor():
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from actors.adapters import video_patches
    from pipeline.decode import prepare_media
    from schemas.spec import MediaSpec

    processor, adapter = _family(*FAMILIES[0])
    frames = prepare_media(_video(size=(320, 180)), None, MediaSpec(), _shaping(processor, adapter)).images
    min_pixels, max_pixels = adapter.frame_size(processor).min_pixels, adapter.frame_size(processor).max_pixels
    video_processor = Qwen2VLVideoProcessor(size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
    reference = video_processor(
        videos=[np.stack([np.asarray(frame) for frame in frames])], return_tensors="np", do_rescale=False, do_normalize=False
    )
    patches, grid = video_patches(frames, processor.image_processor)
    assert np.array_equal(grid, reference["video_grid_thw"][0])
    assert np.array_equal(patches, np.clip(np.rint(reference["pixel_values_videos"]), 0, 255).astype(np.uint8))


@pytest.mark.slow
@pytest.mark.parametrize("uri, model_type", FAMILIES)
def test_job_end_to_end(uri, model_type, ray_local, make_spec, tmp_path):
    from actors.tiny import ensure_tiny_model, tiny_model_revision
    from pipeline.run import run_job

    media = tmp_path / "media"
    media.mkdir()
    rows = []
    for index, image in enumerate(_images()):
        image.save(media / f"img-{index}.jpg")
        rows.append({"id": f"img-{index}", "uri": str(media / f"img-{index}.jpg")})
    Image.new("RGB", (40, 300), "white").save(media / "tall.png")
    rows.append({"id": "tall", "uri": str(media / "tall.png")})
    (media / "clip.mp4").write_bytes(_video())  # Qwen2-VL: a native video; Idefics3: frames as images
    rows.append({"id": "clip", "uri": str(media / "clip.mp4")})
    rows.append({"id": "missing", "uri": str(media / "nope.png")})
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = make_spec(manifest, name=f"family-{model_type}", model={"path": uri, "batch_size": 2}, media={"isolation": "none"})

    summary = run_job(spec)

    assert summary["invariant"]["ok"] and summary["model"]["type"] == model_type
    results = {
        row[0]: row[1:]
        for row in duckdb.sql(
            f"SELECT id, status, error_code, output.verdict, model_revision, n_tiles, n_frames FROM read_parquet('{spec.output.path}/**/*.parquet')"
        ).fetchall()
    }
    assert results["missing"][:2] == ("error", "fetch.not_found")
    for item in ("img-0", "img-1", "tall", "clip"):
        status, code, verdict, revision, tiles, frames = results[item]
        assert (status, code) == ("ok", None), (item, results[item])
        assert verdict in {"allow", "review", "block"}
        assert revision == tiny_model_revision(ensure_tiny_model(uri=uri)) and tiles >= 1
        assert frames == (3 if item == "clip" else None)
