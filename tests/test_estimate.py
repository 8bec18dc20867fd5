"""Capacity estimates (`tessera run SPEC --dry-run --estimate`): the manifest is sampled
uniformly, the sample goes through the real CPU stage, and the arithmetic from per-item
numbers to GPU-hours, cores per GPU and wall time holds."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from jobs.cli import main as cli
from jobs.estimate import ROOFLINES, H100, estimate, sample_manifest
from jobs.sample import encode_image, synthetic_image


def write_manifest(folder, rows) -> str:
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_the_sample_is_uniform_over_the_whole_manifest(tmp_path, make_spec):
    rows = [{"id": f"r{i:04d}", "uri": f"media/{i}.jpg"} for i in range(1000)]
    rows += [{"id": "r0007", "uri": "media/again.jpg"}, {"uri": "no-id.jpg"}]
    spec = make_spec(write_manifest(tmp_path, rows))
    sample = sample_manifest(spec, size=100, seed=1)
    assert (sample.counted, sample.duplicates, sample.invalid) == (1000, 1, 1)
    positions = sorted(int(row["id"][1:]) for row in sample.rows)
    assert len(positions) == 100 == len(set(positions))
    assert sum(p >= 667 for p in positions) >= 20  # the last third is not starved


def test_tokens_come_from_the_models_own_tiling(tmp_path, make_spec):
    (tmp_path / "a.jpg").write_bytes(encode_image(synthetic_image(640, 480, 1), "jpeg"))
    spec = make_spec(write_manifest(tmp_path, [{"id": "a", "uri": "a.jpg"}]), task={"prompt": "Describe it."})
    est = estimate(spec, gpus=1)
    from actors.loading import load_processor, resolve_model
    from pipeline.prepare import build_chat_text

    processor = load_processor(resolve_model(spec.model).path)
    text = build_chat_text(processor, "Describe it.", 1)
    ids = processor(text=[text], images=[synthetic_image(640, 480, 1)], return_tensors="np")["input_ids"][0]
    expected = int((ids == processor.image_token_id).sum())  # transformers' own count
    assert est.sample.visual_tokens == expected
    assert est.sample.text_tokens > 0 and est.sample.images == 1 and est.sample.tiles >= 2
    assert est.sample.pixel_bytes == est.sample.tiles * 3 * 56 * 56
    assert est.sample.decode_s > 0


def test_a_mixed_manifest_end_to_end(sample_corpus, make_spec):
    spec = make_spec(sample_corpus)
    est = estimate(spec, gpus=8)
    stage = est.sample
    # The fixture: 8 images, 2 videos, a PDF, 3 broken or missing items, a row without an id.
    assert est.items == 15 and stage.items == 14
    assert {"decode.corrupt", "fetch.not_found"} <= set(stage.errors) and stage.ok == 11
    assert est.gpu_items == pytest.approx(15 * (14 / 15) * (11 / 14))
    assert est.gpu_hours == pytest.approx(est.gpu_items * est.gpu_s_per_item / 3600)
    assert est.cpu_cores_per_gpu == pytest.approx(stage.decode_s * est.items / est.gpu_items / est.gpu_s_per_item)
    assert est.wall_s == pytest.approx(est.gpu_items * est.replica_s_per_item / 8)

    twice = estimate(spec, gpus=16, items=1_000_000, rate=2.0)
    assert twice.replica_s_per_item == 0.5 and twice.replicas == 16
    assert twice.wall_s == pytest.approx(twice.gpu_items * 0.5 / 16)


def test_the_roofline_arithmetic():
    line = ROOFLINES["m2s"]
    prefill = (2 * 1.4e9 * (256 + 100) + 2 * 0.4e9 * 729) / (H100.dense_flops * 0.40)
    decode = 100 * (1.8e9 * 2) / (H100.hbm_bytes_per_s * 0.60) / 32
    assert line.replica_seconds(256, 100, 100, images=1) == pytest.approx(prefill + decode)
    minimax = ROOFLINES["minimax-vl-01"]
    assert minimax.gpus_per_replica == 8
    # Anyres: one vision patch per visual token, so a 10k-token image costs ~4x a 2.3k one.
    assert minimax.replica_seconds(9_900, 50, 0, 1) / minimax.replica_seconds(2_300, 50, 0, 1) == pytest.approx(9950 / 2350, rel=1e-3)


def test_cli(tmp_path, make_spec):
    (tmp_path / "a.png").write_bytes(encode_image(Image.new("RGB", (300, 200), "red"), "png"))
    spec = make_spec(write_manifest(tmp_path, [{"id": "a", "uri": "a.png"}]))
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    runner = CliRunner()
    result = runner.invoke(cli, ["run", str(spec_path), "--dry-run", "--estimate", "--gpus", "4", "--items", "1000000"])
    assert result.exit_code == 0, result.output
    for line in ("tokens/item", "CPU/item", "GPU-hours", "CPU cores", "wall time", "bandwidth"):
        assert line in result.output
    assert "1,000,000 (given (--items))" in result.output and "on 4 GPUs" in result.output
    too_few = runner.invoke(cli, ["run", str(spec_path), "--estimate", "--gpus", "4", "--set", "model.gpus_per_replica=8"])
    assert too_few.exit_code == 2 and "one replica needs" in too_few.output
