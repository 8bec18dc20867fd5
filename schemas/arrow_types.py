"""JSON Schema -> Arrow type, so `output` is a typed struct column users can query.

objects -> struct, lists -> list, enums -> string, integers -> int64, numbers -> float64,
booleans -> bool, `dict[str, T]` (additionalProperties only) -> map<string, T>; unions,
`Any` and anything else without one clear type -> a JSON string. `to_arrow_value` converts
a validated value to match.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

# A JSON-encoded value (unions, Any). large_string tells it apart from a plain string column.
JSON_STRING = pa.large_string()


def arrow_type(schema: dict, defs: dict | None = None) -> pa.DataType:
    defs = defs if defs is not None else schema.get("$defs", {})
    node = _deref(schema, defs)
    kind = node.get("type")
    if "enum" in node or "const" in node:
        values = node.get("enum", [node.get("const")])
        return pa.string() if all(isinstance(v, str) for v in values) else JSON_STRING
    if kind == "object" or ("properties" in node and kind is None):
        properties = node.get("properties") or {}
        extra = node.get("additionalProperties")
        if not properties and isinstance(extra, dict):
            return pa.map_(pa.string(), arrow_type(extra, defs))
        if not properties:
            return JSON_STRING
        return pa.struct([pa.field(name, arrow_type(child, defs)) for name, child in properties.items()])
    if kind == "array" and isinstance(node.get("items"), dict):
        return pa.list_(arrow_type(node["items"], defs))
    return {
        "string": pa.string(),
        "integer": pa.int64(),
        "number": pa.float64(),
        "boolean": pa.bool_(),
    }.get(kind if isinstance(kind, str) else "", JSON_STRING)


def _deref(node: dict, defs: dict) -> dict:
    seen = 0
    while "$ref" in node and seen < 32:
        node = defs.get(node["$ref"].rsplit("/", 1)[-1], {})
        seen += 1
    options = node.get("anyOf") or node.get("oneOf")
    if options:
        non_null = [o for o in options if o.get("type") != "null"]
        if len(non_null) == 1:  # Optional[T] is T, nullable
            return _deref(non_null[0], defs)
        return {}
    if "allOf" in node and len(node["allOf"]) == 1:
        return _deref(node["allOf"][0], defs)
    return node


def to_arrow_value(value: Any, dtype: pa.DataType) -> Any:
    """A JSON value shaped for `dtype` (JSON strings where the type is a JSON string)."""
    if value is None:
        return None
    if pa.types.is_struct(dtype):
        if not isinstance(value, dict):
            return None
        return {f.name: to_arrow_value(value.get(f.name), f.type) for f in dtype}
    if pa.types.is_map(dtype):
        if not isinstance(value, dict):
            return None
        return [(str(k), to_arrow_value(v, dtype.item_type)) for k, v in value.items()]
    if pa.types.is_list(dtype):
        if not isinstance(value, list):
            return None
        return [to_arrow_value(v, dtype.value_type) for v in value]
    if pa.types.is_large_string(dtype):
        return json.dumps(value, ensure_ascii=False)
    if pa.types.is_string(dtype):
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if pa.types.is_floating(dtype):
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if pa.types.is_integer(dtype):
        return int(value) if isinstance(value, int) and not isinstance(value, bool) else None
    if pa.types.is_boolean(dtype):
        return value if isinstance(value, bool) else None
    return value
