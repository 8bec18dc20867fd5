"""A task resolved from the spec: the prompt template, the output schema, the sampling.

`task.preset` picks a built-in (schemas/presets.py). A custom task gives `task.prompt` (Jinja
over the manifest row's fields) and optionally `task.output_schema`: `module:PydanticModel`
or the path of a JSON Schema file. Without an output schema the task is free text.
`prompt_sha256` hashes what decides the answer (template, system prompt, schema, sampling;
not the re-ask budget), so every result row can be traced to exactly what produced it.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.errors import PydanticUserError

from schemas.presets import PRESET_PROMPTS, PRESET_SCHEMAS
from schemas.spec import SamplingSpec, TaskSpec


@dataclass(frozen=True)
class Task:
    name: str  # the preset, or "custom"
    prompt_template: str
    system_prompt: str | None
    json_schema: dict[str, Any] | None  # None: free text
    output_model: type[BaseModel] | None  # the pydantic model when there is one
    sampling: SamplingSpec

    @property
    def structured(self) -> bool:
        return self.json_schema is not None

    @property
    def prompt_sha256(self) -> str:
        sampling = self.sampling.model_dump(exclude={"reask", "reask_factor"})
        payload = json.dumps(
            {
                "prompt": self.prompt_template,
                "system": self.system_prompt,
                "schema": self.json_schema,
                "sampling": sampling,
            },
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()


def resolve_task(spec: TaskSpec, search_dirs: Sequence[str] = ()) -> Task:
    """`search_dirs`: where else a `module:Model` schema may live (the spec's folder)."""
    if spec.preset:
        model = PRESET_SCHEMAS[spec.preset]
        return Task(
            name=spec.preset,
            prompt_template=spec.prompt or PRESET_PROMPTS[spec.preset],
            system_prompt=spec.system_prompt,
            json_schema=model.model_json_schema(),
            output_model=model,
            sampling=spec.sampling,
        )
    model, schema = load_output_schema(spec.output_schema, search_dirs) if spec.output_schema else (None, None)
    return Task(
        name="custom",
        prompt_template=spec.prompt or "",
        system_prompt=spec.system_prompt,
        json_schema=schema,
        output_model=model,
        sampling=spec.sampling,
    )


def load_output_schema(ref: str, search_dirs: Sequence[str] = ()) -> tuple[type[BaseModel] | None, dict[str, Any]]:
    """`package.module:Model` (a pydantic model) or a JSON Schema file -> (model or None, JSON Schema).
    The module is looked for on sys.path, then in the current directory and `search_dirs`."""
    if ref.endswith(".json") or Path(ref).is_file():
        try:
            schema = json.loads(Path(ref).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"task.output_schema {ref}: cannot read a JSON Schema ({exc})") from None
        if not isinstance(schema, dict):
            raise ValueError(f"task.output_schema {ref}: a JSON Schema must be an object")
        _check_json_schema(ref, schema)
        return None, schema
    module_name, sep, attr = ref.partition(":")
    if not sep:
        raise ValueError(f"task.output_schema {ref!r}: expected 'module:PydanticModel' or a .json file")
    try:
        module = _import_module(module_name, search_dirs)
    except ImportError as exc:
        raise ValueError(f"task.output_schema {ref!r}: {exc}") from None
    except Exception as exc:  # the module's own code raised: still the spec's problem, not a crash
        raise ValueError(f"task.output_schema {ref!r}: importing {module_name} raised {type(exc).__name__}: {exc}") from None
    model = getattr(module, attr, None)
    if model is None:
        raise ValueError(f"task.output_schema {ref!r}: module {module_name!r} has no attribute {attr!r}")
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise ValueError(f"task.output_schema {ref!r} is not a pydantic model")
    try:
        schema = model.model_json_schema()
    except PydanticUserError as exc:  # e.g. a field type with no JSON Schema
        raise ValueError(f"task.output_schema {ref!r}: no JSON Schema for it: {exc.message}") from None
    _ship_by_value(module)
    return model, schema


def _check_json_schema(ref: str, schema: dict) -> None:
    import jsonschema

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise ValueError(f"task.output_schema {ref}: not a valid JSON Schema at {where}: {exc.message}") from None


def _import_module(name: str, search_dirs: Sequence[str]):
    """The `tessera` console script has neither the current directory nor the spec's folder on
    sys.path, where a user's schema module usually lives: add them for this import only. Later
    imports of the same name find it in sys.modules."""
    extra = [d for d in dict.fromkeys([os.getcwd(), *map(os.path.abspath, search_dirs)]) if d not in sys.path]
    sys.path.extend(extra)  # after what is installed: a user's file never shadows a package
    try:
        return importlib.import_module(name)
    finally:
        for directory in extra:
            sys.path.remove(directory)


def _ship_by_value(module) -> None:
    """The task travels to Ray workers pickled; a user's schema module may not be importable
    there (it lives next to the spec, not in an installed package), so send its code along."""
    for name in ("ray.cloudpickle", "cloudpickle"):  # Ray vendors its own copy
        try:
            importlib.import_module(name).register_pickle_by_value(module)
        except (ImportError, ValueError):
            pass


def task_from_preset_or_schema(name: str) -> Task:
    """For `tessera schema NAME`: a preset name, `module:Model` or a JSON Schema file."""
    if name in PRESET_SCHEMAS:
        return resolve_task(TaskSpec(preset=name))
    return resolve_task(TaskSpec(prompt="", output_schema=name))
