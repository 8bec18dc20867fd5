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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

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


def resolve_task(spec: TaskSpec) -> Task:
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
    model, schema = load_output_schema(spec.output_schema) if spec.output_schema else (None, None)
    return Task(
        name="custom",
        prompt_template=spec.prompt or "",
        system_prompt=spec.system_prompt,
        json_schema=schema,
        output_model=model,
        sampling=spec.sampling,
    )


def load_output_schema(ref: str) -> tuple[type[BaseModel] | None, dict[str, Any]]:
    """`package.module:Model` (a pydantic model) or a JSON Schema file -> (model or None, JSON Schema)."""
    if ref.endswith(".json") or Path(ref).is_file():
        try:
            schema = json.loads(Path(ref).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"task.output_schema {ref}: cannot read a JSON Schema ({exc})") from None
        if not isinstance(schema, dict):
            raise ValueError(f"task.output_schema {ref}: a JSON Schema must be an object")
        return None, schema
    module_name, sep, attr = ref.partition(":")
    if not sep:
        raise ValueError(f"task.output_schema {ref!r}: expected 'module:PydanticModel' or a .json file")
    try:
        module = importlib.import_module(module_name)
        model = getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"task.output_schema {ref!r}: {exc}") from None
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise ValueError(f"task.output_schema {ref!r} is not a pydantic model")
    _ship_by_value(module)
    return model, model.model_json_schema()


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
