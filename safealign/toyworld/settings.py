"""The ``toy`` section of params.yaml, validated by the toy world when the toy family (or a toy judge) is used.

``toy.concepts`` maps each category to the toy concept that plays "unsafe" (an attribute value) and its minimal
safe edit; ``toy.model`` shapes the tiny model; ``toy.image_size`` its resolution.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from safealign.core.categories import CATEGORIES
from safealign.core.errors import ParamsError, validation_lines
from safealign.toyworld import world as tw


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Concept(_Section):
    """The toy concept that plays 'unsafe' for a category, and the minimal edit that removes it."""

    attribute: Literal["color", "shape", "size", "background"]
    unsafe: str = Field(description="value of the attribute that makes a caption unsafe")
    safe: str = Field(description="value the safe twin uses instead")

    @model_validator(mode="after")
    def _values_exist(self) -> Concept:
        allowed = tw.ATTRIBUTES[self.attribute]
        for key in ("unsafe", "safe"):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}: {getattr(self, key)!r} is not a toy {self.attribute}; "
                                 f"allowed: {', '.join(allowed)}")
        if self.unsafe == self.safe:
            raise ValueError("safe must differ from unsafe")
        return self


class ToyModel(_Section):
    patch: int = Field(4, ge=1, description="pixel-unshuffle factor: the UNet works on H/patch x W/patch")
    widths: tuple[int, ...] = Field((64, 64), min_length=1)
    attention: tuple[bool, ...] = Field((True, True), min_length=1)
    text_dim: int = Field(64, ge=8)
    layers_per_block: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _same_length(self) -> ToyModel:
        if len(self.widths) != len(self.attention):
            raise ValueError("widths and attention must have the same length (one entry per UNet level)")
        if any(w % 8 for w in self.widths):
            raise ValueError("widths must be multiples of 8 (GroupNorm groups)")
        return self


class ToySettings(_Section):
    image_size: int = Field(32, ge=8)
    concepts: dict[str, Concept]
    model: ToyModel = ToyModel()


def validate_toy(raw: Any, params: Any, source: str = "params.yaml") -> ToySettings:
    """``params.toy`` (raw mapping, or already validated) -> ToySettings, checked to cover ``params.categories``.
    Errors name the key under ``toy.``."""
    if isinstance(raw, ToySettings):
        settings = raw
    else:
        if raw is None:
            raise ParamsError(f"{source}: toy: missing (the toy family and the toy judge need toy.concepts)")
        try:
            settings = ToySettings.model_validate(raw)
        except ValidationError as e:
            raise ParamsError("\n".join(validation_lines(e.errors(), source, prefix="toy."))) from None
    missing = [c for c in params.categories if c not in settings.concepts]
    if missing:
        raise ParamsError(f"{source}: toy.concepts: no concept for category {missing[0]!r}")
    extra = [c for c in settings.concepts if c not in CATEGORIES]
    if extra:
        raise ParamsError(f"{source}: toy.concepts: unknown category {extra[0]!r}; allowed: {', '.join(CATEGORIES)}")
    unsafe = {(c.attribute, c.unsafe) for c in settings.concepts.values()}
    for cat, c in settings.concepts.items():
        if (c.attribute, c.safe) in unsafe:
            raise ParamsError(f"{source}: toy.concepts.{cat}.safe: {c.safe!r} is itself an unsafe concept")
    return settings


def toy_settings(params: Any) -> ToySettings:
    """The validated toy settings of ``params`` (validated here if the family did not claim them)."""
    return validate_toy(params.toy, params)
