"""Model-agnostic, proven: a job end to end on tiny random-weight checkpoints of three
families built locally (LLaVA-NeXT is tests/test_e2e_local.py; here Qwen2-VL and Idefics3 /
SmolVLM), with schema-constrained output, read back with DuckDB. Also: each family's adapter
gives the model exactly the tensors its own processor would (uint8 in transit, normalised
in the actor)."""

from __future__ import annotations

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
    rows.append({"id": "missing", "uri": str(media / "nope.png")})
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = make_spec(manifest, name=f"family-{model_type}", model={"path": uri, "batch_size": 2}, media={"isolation": "none"})

    summary = run_job(spec)

    assert summary["invariant"]["ok"] and summary["model"]["type"] == model_type
    results = {
        row[0]: row[1:]
        for row in duckdb.sql(
            f"SELECT id, status, error_code, output.verdict, model_revision, n_tiles FROM read_parquet('{spec.output.path}/**/*.parquet')"
        ).fetchall()
    }
    assert results["missing"][:2] == ("error", "fetch.not_found")
    for item in ("img-0", "img-1", "tall"):
        status, code, verdict, revision, tiles = results[item]
        assert (status, code) == ("ok", None), (item, results[item])
        assert verdict in {"allow", "review", "block"}
        assert revision == tiny_model_revision(ensure_tiny_model(uri=uri)) and tiles >= 1
