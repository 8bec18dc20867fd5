"""Fuzz the CPU stage with mutated JPEG, PNG, GIF, MP4, WebM and PDF bytes (hypothesis): for
every input it returns a row — prepared, or an error with a code from the closed set — and
never crashes or hangs. Bounded in CI: 200 items (~12 s here), each decode within 5 s, the
whole fuzz within 60 s (setup excluded: loading the processor is not the fuzz)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from jobs.sample import encode_image, encode_pdf, encode_video, synthetic_image
from schemas.errors import ErrorCode

# One xdist worker runs this whole module: its module-scoped fixtures are costly.
pytestmark = pytest.mark.xdist_group("fuzz_decode")

CODES = {code.value for code in ErrorCode}
SEEDS = {
    "jpeg": encode_image(synthetic_image(96, 64, seed=1), "jpeg"),
    "png": encode_image(synthetic_image(64, 48, seed=2), "png"),
    "gif": encode_image(synthetic_image(48, 32, seed=3), "gif"),
    "mp4": encode_video(seconds=1.0, fps=5, size=(64, 48), seed=4),
    "webm": encode_video(seconds=1.0, fps=5, size=(64, 48), codec="libvpx-vp9", container="webm", seed=5),
    "pdf": encode_pdf(1, size=(200, 120), seed=6),
}


@st.composite
def mutated_media(draw) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[kind])
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        operation = draw(st.sampled_from(["flip", "truncate", "insert", "overwrite", "duplicate", "zero"]))
        if operation == "flip" and data:
            data[min(at, len(data) - 1)] ^= 1 << draw(st.integers(0, 7))
        elif operation == "truncate":
            del data[at:]
        elif operation == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif operation == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=32))
            data[at : at + len(chunk)] = chunk
        elif operation == "duplicate":
            data[at:at] = data[at : at + draw(st.integers(1, 256))]
        elif operation == "zero":
            data[at : at + draw(st.integers(1, 64))] = bytes(min(64, len(data) - at))
    return kind, bytes(data)


@pytest.fixture(scope="module")
def stage(tmp_path_factory, tiny_model_path):
    """The real CPU stage (isolated decoding, tiling, prompt, processor) of the tiny model."""
    from actors.loading import resolve_model
    from pipeline.prepare import PrepareContext, Preparer
    from schemas.spec import parse_spec
    from schemas.tasks import resolve_task

    root = tmp_path_factory.mktemp("fuzz")
    spec = parse_spec(
        {
            "name": "fuzz",
            "input": {"manifest": str(root / "m.jsonl")},
            "output": {"path": str(root / "out")},
            "task": {"preset": "moderation"},
            # A seed decodes in milliseconds: 5 s per item finds a hang long before the test limit.
            "media": {"isolation": "process", "decode_timeout_s": 5, "video": {"max_frames": 4}},
        }
    )
    preparer = Preparer(PrepareContext(run_id="fuzz", spec=spec, model=resolve_model(spec.model), task=resolve_task(spec.task)))
    yield preparer, root
    preparer.close()


def test_seeds_decode_cleanly(stage):
    """The unmutated seeds are valid: the fuzz explores around working files. (Runs first, so
    the decoder child is already started when the timed fuzz begins.)"""
    preparer, root = stage
    for kind, data in SEEDS.items():
        path = root / f"seed.{kind}"
        path.write_bytes(data)
        row = {"id": kind, "uris": [str(path)], "media_type": None, "fields_json": "{}", "source": "", "position": 0, "error_code": None, "error_message": None}
        (out,) = preparer.prepare_rows(row)
        assert out["error_code"] is None, (kind, out["error_message"])


@pytest.mark.timeout(60, func_only=True)  # the CI bound for the fuzz itself
@settings(max_examples=200, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(item=mutated_media())
def test_every_mutated_input_gets_a_row(stage, item):
    preparer, root = stage
    kind, data = item
    path = root / f"item.{kind}"
    path.write_bytes(data)
    row = {
        "id": "x", "uris": [str(path)], "media_type": None, "fields_json": json.dumps({}),
        "source": "m.jsonl#L1", "position": 1, "error_code": None, "error_message": None,
    }
    rows = preparer.prepare_rows(row)
    assert len(rows) == 1
    (out,) = rows
    event(f"{kind}: {out['error_code'] or 'ok'}")  # pytest --hypothesis-show-statistics
    if out["error_code"] is None:
        assert out["model_inputs"] and out["input_tokens"] > 0
    else:
        assert out["error_code"] in CODES and out["error_message"]
        assert out["error_code"] != ErrorCode.DECODE_TIMEOUT.value, out["error_message"]
