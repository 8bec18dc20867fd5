"""Pure pieces of structured output: schema -> Arrow types, unbounded-path detection, parsing."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from actors.constrained import parse_output, unbounded_paths
from schemas.arrow_types import JSON_STRING, arrow_type, to_arrow_value
from schemas.presets import PRESET_SCHEMAS
from schemas.spec import SamplingSpec, TaskSpec
from schemas.tasks import Task, resolve_task


def test_presets_are_fully_bounded():
    for name, model in PRESET_SCHEMAS.items():
        assert unbounded_paths(model.model_json_schema()) == [], name


def test_unbounded_paths_are_reported():
    schema = {
        "type": "object",
        "properties": {
            "free": {"type": "string"},
            "n": {"type": "number", "minimum": 0},
            "items": {"type": "array", "items": {"type": "string", "maxLength": 3}},
            "ok": {"type": "string", "enum": ["a"]},
            "map": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 9}},
            "bounded_map": {"type": "object", "additionalProperties": {"type": "boolean"},
                            "propertyNames": {"maxLength": 8}, "maxProperties": 4},
        },
    }
    assert unbounded_paths(schema) == ["free", "n", "items", "map.<keys>", "map.<size>"]


def test_arrow_types_from_schema():
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "kind": {"enum": ["a", "b"]},
            "n": {"type": "integer"},
            "x": {"type": "number"},
            "flag": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "scores": {"type": "object", "additionalProperties": {"type": "number"}},
            "nested": {"type": "object", "properties": {"a": {"type": "integer"}}},
            "either": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
            "maybe": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "anything": {},
        },
    }
    dtype = arrow_type(schema)
    fields = {f.name: f.type for f in dtype}
    assert fields["name"] == pa.string() and fields["kind"] == pa.string()
    assert fields["n"] == pa.int64() and fields["x"] == pa.float64() and fields["flag"] == pa.bool_()
    assert fields["tags"] == pa.list_(pa.string())
    assert fields["scores"] == pa.map_(pa.string(), pa.float64())
    assert fields["nested"] == pa.struct([pa.field("a", pa.int64())])
    assert fields["either"] == JSON_STRING and fields["anything"] == JSON_STRING
    assert fields["maybe"] == pa.string()
    value = {"name": "n", "kind": "a", "n": 3, "x": 1, "flag": True, "tags": ["t"], "scores": {"s": 0.5},
             "nested": {"a": 1}, "either": "text", "maybe": None, "anything": {"k": [1]}}
    row = to_arrow_value(value, dtype)
    table = pa.Table.from_pylist([{"output": row}], schema=pa.schema([pa.field("output", dtype)]))
    back = table.to_pylist()[0]["output"]
    assert back["scores"] == [("s", 0.5)] and back["x"] == 1.0
    assert json.loads(back["either"]) == "text" and json.loads(back["anything"]) == {"k": [1]}


def test_parse_output_is_lenient_on_control_characters_and_strict_on_schema():
    task = resolve_task(TaskSpec(preset="caption"))
    raw = '{"short_caption": "a\tb", "detailed_caption": "x", "objects": [], "ocr_text": ""}'
    parsed = parse_output(raw, task)
    assert json.loads(parsed.output_json)["short_caption"] == "a\tb"  # re-serialised strictly
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_output('{"short_caption": "cut', task)
    with pytest.raises(ValueError, match="does not match"):
        parse_output('{"short_caption": "x"}', task)


def test_a_json_schema_validator_is_built_once_per_schema():
    from actors.constrained import _validator

    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"]}
    task = Task(name="custom", prompt_template="", system_prompt=None, json_schema=schema, output_model=None, sampling=SamplingSpec())
    assert _validator(schema) is _validator(schema)
    assert json.loads(parse_output('{"n": 3}', task).output_json) == {"n": 3}
    with pytest.raises(ValueError, match="at n"):
        parse_output('{"n": 30}', task)
