"""Spec validation: good specs load with defaults, bad ones fail with text that names the key."""

from __future__ import annotations

import pytest

from schemas.spec import JobSpec, SpecError, apply_override, load_spec, parse_spec

MINIMAL = {
    "name": "demo-moderation",
    "input": {"manifest": "data/sample/manifest.jsonl"},
    "output": {"path": "out/demo-moderation"},
    "model": {"path": "builtin:tiny"},
    "task": {"preset": "moderation"},
}


def test_minimal_spec_fills_defaults():
    spec = parse_spec(MINIMAL)
    assert isinstance(spec, JobSpec)
    assert spec.task.sampling.temperature == 0.0  # greedy by default
    assert spec.output.mode == "resume"
    assert spec.media.video.max_frames == 60 and spec.media.video.fps == 1.0
    assert spec.media.image.hard_max_pixels == 100_000_000
    assert spec.model.backend == "transformers" and spec.model.trust_remote_code is False


def test_example_specs_are_valid():
    from pathlib import Path

    examples = sorted((Path(__file__).parent.parent / "jobs" / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        load_spec(path)


def test_unknown_key_is_named(tmp_path):
    bad = {**MINIMAL, "model": {"path": "builtin:tiny", "batchsize": 8}}
    with pytest.raises(SpecError) as err:
        parse_spec(bad)
    assert "model.batchsize: unknown key" in str(err.value)


def test_unknown_top_level_key_is_named():
    with pytest.raises(SpecError, match="ouput: unknown key"):
        parse_spec({**MINIMAL, "ouput": {"path": "x"}})


def test_missing_required_key_is_named():
    data = {k: v for k, v in MINIMAL.items() if k != "output"}
    with pytest.raises(SpecError, match="output: required key is missing"):
        parse_spec(data)


def test_task_needs_preset_or_prompt():
    with pytest.raises(SpecError, match="task.preset"):
        parse_spec({**MINIMAL, "task": {"sampling": {"max_new_tokens": 10}}})


def test_bad_values_are_explained():
    with pytest.raises(SpecError, match="task.sampling.temperature"):
        parse_spec({**MINIMAL, "task": {"preset": "caption", "sampling": {"temperature": -1}}})
    with pytest.raises(SpecError, match="replicas"):
        parse_spec({**MINIMAL, "model": {"replicas": [3, 1]}})
    with pytest.raises(SpecError, match="name"):
        parse_spec({**MINIMAL, "name": "has spaces"})


def test_overrides_parse_values_as_yaml():
    data = {"model": {"path": "builtin:tiny"}}
    apply_override(data, "model.batch_size=16")
    apply_override(data, "model.replicas=[1, 3]")
    apply_override(data, "task.sampling.temperature=0.7")
    assert data["model"] == {"path": "builtin:tiny", "batch_size": 16, "replicas": [1, 3]}
    assert data["task"]["sampling"]["temperature"] == 0.7
    with pytest.raises(SpecError, match="key.path=value"):
        apply_override(data, "novalue")


def test_load_spec_reports_yaml_and_file_errors(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(broken)
    with pytest.raises(SpecError, match="cannot read spec"):
        load_spec(tmp_path / "missing.yaml")


def test_relative_paths_resolve_against_the_working_directory(tmp_path):
    spec = parse_spec(MINIMAL).resolved(tmp_path)
    assert spec.input.manifest == str(tmp_path / "data/sample/manifest.jsonl")
    assert spec.output.path == str(tmp_path / "out/demo-moderation")
    remote = parse_spec({**MINIMAL, "output": {"path": "s3://bucket/out"}}).resolved(tmp_path)
    assert remote.output.path == "s3://bucket/out"


@pytest.mark.parametrize(
    "model, message",
    [
        ({"gpus_per_replica": 2.5}, "whole number of GPUs"),
        ({"replicas": [1, 3], "batches_in_flight": 1}, "batches_in_flight must be at least 2"),
        ({"engine_kwargs": {"max_model_len": 4096}}, "engine_kwargs are vLLM engine arguments"),
    ],
)
def test_placement_keys_are_checked(model, message):
    with pytest.raises(SpecError, match=message):
        parse_spec({**MINIMAL, "model": {**MINIMAL["model"], **model}})


def test_placement_keys_accepted():
    spec = parse_spec({**MINIMAL, "model": {"gpus_per_replica": 0.5, "replicas": [1, 4], "backend": "vllm",
                                            "engine_kwargs": {"max_model_len": 4096}, "accelerator_type": "H100"}})
    assert spec.model.gpus_per_replica == 0.5 and spec.model.replicas == (1, 4)
    assert parse_spec({**MINIMAL, "model": {"gpus_per_replica": 8}}).model.gpus_per_replica == 8
