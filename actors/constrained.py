"""Schema-constrained decoding (xgrammar) and validation of what the model wrote.

Why xgrammar: it compiles a JSON Schema into a token-level grammar once per actor and masks
logits in microseconds per token, works on CPU and GPU, is what vLLM and SGLang use for
structured outputs, and plugs into transformers' `generate()` as a logits processor.

A grammar only guarantees a *complete* JSON object when every path is bounded, so schemas
should bound strings (`maxLength`), numbers (`minimum`/`maximum`) and arrays (`maxItems`);
`unbounded_paths` lists what is not, and the job warns about them. Whitespace is not
allowed between tokens (`any_whitespace=False`), else a weak model can emit it forever.
Inside strings the grammar admits raw control characters, which strict JSON rejects: the
text is parsed leniently (`strict=False`) and re-serialised strictly into `output_json`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from schemas.tasks import Task


class GrammarCompiler:
    """Compiles a task's JSON Schema for one tokenizer, once per actor."""

    def __init__(self, tokenizer, vocab_size: int):
        import xgrammar as xgr

        self._xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self._compiler = xgr.GrammarCompiler(info)
        self._cache: dict[str, Any] = {}

    def compile(self, schema: dict) -> Any:
        key = json.dumps(schema, sort_keys=True)
        if key not in self._cache:
            self._cache[key] = self._compiler.compile_json_schema(key, any_whitespace=False)
        return self._cache[key]

    def logits_processor(self, schema: dict):
        """A fresh processor per generate() call (xgrammar's HF processor is single-use)."""
        return self._xgr.contrib.hf.LogitsProcessor(self.compile(schema))


@dataclass
class Parsed:
    value: Any
    output_json: str


def parse_output(raw_text: str, task: Task) -> Parsed:
    """Parse and validate the model's text against the task's schema; ValueError if invalid."""
    try:
        value = json.loads(raw_text, strict=False)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at char {exc.pos})") from None
    if task.output_model is not None:
        from pydantic import ValidationError

        try:
            value = task.output_model.model_validate(value).model_dump(mode="json")
        except ValidationError as exc:
            raise ValueError(f"does not match the output schema: {_first_error(exc)}") from None
    elif task.json_schema is not None:
        errors = sorted(_validator(task.json_schema).iter_errors(value), key=str)
        if errors:
            where = "/".join(str(p) for p in errors[0].absolute_path) or "(root)"
            raise ValueError(f"does not match the output schema at {where}: {errors[0].message}")
    return Parsed(value=value, output_json=json.dumps(value, ensure_ascii=False))


# Validators by the id of their schema: a task's schema lives as long as its actor, and
# building a validator per row costs more than validating. The entry holds the schema, so
# its id is not reused while cached; a process that makes many tasks starts over at the cap.
_VALIDATORS: dict[int, tuple[dict, Any]] = {}
_MAX_VALIDATORS = 32


def _validator(schema: dict):
    cached = _VALIDATORS.get(id(schema))
    if cached is None:
        import jsonschema

        if len(_VALIDATORS) >= _MAX_VALIDATORS:
            _VALIDATORS.clear()
        cached = _VALIDATORS[id(schema)] = (schema, jsonschema.Draft202012Validator(schema))
    return cached[1]


def _first_error(exc) -> str:
    err = exc.errors()[0]
    return f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"


def unbounded_paths(schema: dict) -> list[str]:
    """Paths of strings, numbers and arrays without a bound: where a weak model may never stop."""
    defs = schema.get("$defs", {})
    found: list[str] = []

    def visit(node: dict, path: str, seen: tuple[str, ...]) -> None:
        ref = node.get("$ref")
        if ref:
            name = ref.rsplit("/", 1)[-1]
            if name not in seen and name in defs:
                visit(defs[name], path, seen + (name,))
            return
        for key in ("anyOf", "oneOf", "allOf"):
            for index, option in enumerate(node.get(key, [])):
                visit(option, f"{path}<{key}[{index}]>", seen)
        kind = node.get("type")
        bounded_string = "maxLength" in node or "enum" in node or "const" in node or "pattern" in node
        if kind == "string" and not bounded_string:
            found.append(path or "(root)")
        if kind in ("number", "integer") and not ("maximum" in node and "minimum" in node) and "enum" not in node:
            found.append(path or "(root)")
        if kind == "array":
            if "maxItems" not in node:
                found.append(path or "(root)")
            if isinstance(node.get("items"), dict):
                visit(node["items"], f"{path}[]", seen)
        for name, child in (node.get("properties") or {}).items():
            visit(child, f"{path}.{name}" if path else name, seen)
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):  # a map: its keys and its size need bounds too
            names = node.get("propertyNames") or {}
            if not any(k in names for k in ("maxLength", "enum", "const", "pattern")):
                found.append(f"{path}.<keys>")
            if "maxProperties" not in node:
                found.append(f"{path}.<size>")
            visit(extra, f"{path}.*", seen)

    visit(schema, "", ())
    return found
