"""A user's own output schema, loaded by `task.output_schema: custom_output:ProductListing`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field


class Price(BaseModel):
    amount: float = Field(ge=0, le=100000)
    currency: Literal["EUR", "USD", "GBP"]


class ProductListing(BaseModel):
    category: Literal["clothing", "electronics", "furniture", "other"]
    price: Price
    colors: list[Annotated[str, Field(max_length=16)]] = Field(max_length=4)
    # A map: its keys need a bound too (`propertyNames.maxLength`), or a weak model may never close one.
    attributes: dict[Annotated[str, Field(max_length=16)], Annotated[str, Field(max_length=24)]] = Field(max_length=3)
    in_stock: bool
