"""The built-in tasks: an output schema (pydantic) and a prompt worth using on a real model.

Every string has a `max_length`, every number a range and every list a `max_length`: with
schema-constrained decoding that bound is what guarantees the model finishes a complete
JSON object (an unbounded string lets a weak model write forever). Keep them bounded when
editing, and keep the bounds generous enough for real documents.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


Confidence = Field(ge=0.0, le=1.0, description="How sure the model is, from 0 to 1.")
ShortText = Annotated[str, Field(max_length=60)]
Cell = Annotated[str, Field(max_length=120)]


class CategoryAssessment(_Out):
    flagged: bool
    confidence: float = Confidence


class ModerationCategories(_Out):
    sexual: CategoryAssessment
    minors: CategoryAssessment
    violence: CategoryAssessment
    graphic: CategoryAssessment
    hate: CategoryAssessment
    harassment: CategoryAssessment
    self_harm: CategoryAssessment
    illegal_activity: CategoryAssessment
    weapons: CategoryAssessment
    drugs: CategoryAssessment


class Moderation(_Out):
    verdict: Literal["allow", "review", "block"]
    categories: ModerationCategories
    rationale: str = Field(max_length=240, description="One or two sentences on why.")


MODERATION_PROMPT = """You are a trust-and-safety reviewer. Assess the attached media against each policy category:
sexual content; any sexualisation of minors (minors); violence; graphic or gory content (graphic);
hate speech or symbols (hate); harassment or bullying; self-harm; illegal activity; weapons; drugs.
For every category give `flagged` (true only if the media clearly shows or promotes it) and a
`confidence` between 0 and 1. Then give an overall `verdict`: "allow" when nothing is flagged,
"review" when something is borderline or uncertain, "block" when a category is clearly violated
(always "block" for minors). Finish with a one- or two-sentence `rationale`.
Answer with one JSON object only.{% if context is defined and context %}
Context supplied with the item: {{ context }}{% endif %}"""


class DatedField(_Out):
    label: str = Field(max_length=60, description="What the date is, e.g. 'issued', 'due'.")
    date: str = Field(max_length=32, description="ISO 8601 (YYYY-MM-DD) when the day is known.")


class Party(_Out):
    name: str = Field(max_length=120)
    role: str = Field(max_length=60, description="e.g. 'seller', 'buyer', 'employer'.")


class KeyValue(_Out):
    key: str = Field(max_length=80)
    value: str = Field(max_length=240)


class Table(_Out):
    title: str = Field(max_length=120)
    columns: list[ShortText] = Field(max_length=12)
    rows: list[Annotated[list[Cell], Field(max_length=12)]] = Field(max_length=40)


class DocumentExtraction(_Out):
    document_type: Literal[
        "invoice", "receipt", "contract", "letter", "form", "report", "statement", "id_document", "other"
    ]
    title: str = Field(max_length=200)
    language: str = Field(max_length=16, description="BCP 47 code, e.g. 'en'.")
    dates: list[DatedField] = Field(max_length=12)
    parties: list[Party] = Field(max_length=12)
    fields: list[KeyValue] = Field(max_length=40)
    tables: list[Table] = Field(max_length=6)
    full_text: str = Field(max_length=4000)


DOCUMENT_EXTRACTION_PROMPT = """You are a document-processing system. Read the attached document page(s) and extract:
`document_type`; its `title`; its `language`; every date with a `label` saying what it is
(ISO 8601 when the day is known); the `parties` named (people or organisations, with their role);
the important key-value `fields` (invoice number, totals, account numbers, addresses …);
each table as a `title`, its `columns` and its `rows` of cell strings; and the `full_text` in
reading order. Copy values exactly as printed; leave a list empty rather than guess.
Answer with one JSON object only.{% if context is defined and context %}
Context supplied with the document: {{ context }}{% endif %}"""


class Caption(_Out):
    short_caption: str = Field(max_length=120, description="One line, at most about 15 words.")
    detailed_caption: str = Field(max_length=600)
    objects: list[ShortText] = Field(max_length=16, description="Salient objects, most important first.")
    ocr_text: str = Field(max_length=600, description="Text visible in the media, verbatim; empty if none.")


CAPTION_PROMPT = """Describe the attached media for a search index. Give a `short_caption` (one line),
a `detailed_caption` (two to four sentences: subjects, setting, actions, style), the salient
`objects` (most important first, a few words each), and any text visible in it as `ocr_text`
(verbatim, empty if none). Answer with one JSON object only.{% if context is defined and context %}
Context supplied with the item: {{ context }}{% endif %}"""


PRESET_SCHEMAS: dict[str, type[BaseModel]] = {
    "moderation": Moderation,
    "document_extraction": DocumentExtraction,
    "caption": Caption,
}

PRESET_PROMPTS: dict[str, str] = {
    "moderation": MODERATION_PROMPT,
    "document_extraction": DOCUMENT_EXTRACTION_PROMPT,
    "caption": CAPTION_PROMPT,
}
