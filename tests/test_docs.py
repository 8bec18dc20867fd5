"""The docs stay true: every spec key and every error code is documented."""

from __future__ import annotations

import typing
from pathlib import Path

from pydantic import BaseModel

from schemas.errors import ErrorCode
from schemas.spec import JobSpec

DOCS = Path(__file__).resolve().parent.parent / "docs"


def spec_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        nested = [c for c in (field.annotation, *typing.get_args(field.annotation)) if isinstance(c, type) and issubclass(c, BaseModel)]
        if nested:
            keys.extend(spec_keys(nested[0], f"{prefix}{name}."))
        else:
            keys.append(prefix + name)
    return keys


def test_every_spec_key_is_in_docs_spec_md():
    text = (DOCS / "spec.md").read_text()
    missing = [key for key in spec_keys(JobSpec) if f"`{key}`" not in text]
    assert not missing, f"document these keys in docs/spec.md: {missing}"


def test_every_error_code_is_in_docs_errors_md():
    text = (DOCS / "errors.md").read_text()
    missing = [code.value for code in ErrorCode if f"`{code.value}`" not in text]
    assert not missing, f"document these codes in docs/errors.md: {missing}"
