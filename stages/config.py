"""params.yaml, validated once into frozen typed objects.

Every section is a pydantic model with ``extra="forbid"``: an unknown key, a wrong type or value, or a name
that is not in its registry fails at start-up with the key's dotted path and what is allowed. Registry-backed
names (family, loss, merge rule, prompt backend, detectors) are checked against the registries themselves,
so the allowed names are written in one place.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stages import toyworld as tw

CATEGORIES = ("hate", "harassment", "violence", "self_harm", "sexual", "shocking", "illegal_activity")
CATEGORY_TITLES = {
    "hate": "Hate", "harassment": "Harassment", "violence": "Violence", "self_harm": "Self-harm",
    "sexual": "Sexual", "shocking": "Shocking", "illegal_activity": "Illegal activity",
}


class ParamsError(ValueError):
    """A params.yaml value is wrong; the message names the file, the key and what is allowed."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_name(value: str, registry: Any, extra: tuple[str, ...] = ()) -> str:
    if value not in registry and value not in extra:
        raise ValueError(f"unknown {registry.kind} {value!r}; allowed: {', '.join(sorted([*registry, *extra]))}")
    return value


class Concept(Section):
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


class ToyModel(Section):
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


class Toy(Section):
    image_size: int = Field(32, ge=8)
    concepts: dict[str, Concept]
    model: ToyModel = ToyModel()


class Model(Section):
    family: str = "toy"
    path: str = Field("", description="real families: a local diffusers folder or single-file checkpoint")
    resolution: int = Field(0, ge=0, description="render size in pixels; 0 = the family's default")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    options: dict[str, Any] = Field(default_factory=dict, description="family-specific settings")

    @field_validator("family")
    @classmethod
    def _family(cls, v: str) -> str:
        from stages.family import FAMILIES, get_family

        get_family("toy")  # import the family modules so the registry is filled
        return _check_name(v, FAMILIES)


class Runtime(Section):
    threads: int = Field(2, ge=0, description="torch CPU threads; 0 = torch's default")
    device: str = Field("auto", description="'auto' (cuda if available), 'cpu' or 'cuda[:N]'")


class Base(Section):
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(2e-3, gt=0)
    pool_size: int = Field(20000, ge=16)
    caption_dropout: float = Field(0.1, ge=0, lt=1)
    eval_prompts: int = Field(280, ge=7)


class Sampling(Section):
    steps: int = Field(20, ge=1)
    guidance: float = Field(2.0, ge=0)
    batch_size: int = Field(128, ge=1)


class Prompts(Section):
    backend: str = "grammar"
    train_per_category: int = Field(96, ge=1)
    test_per_category: int = Field(48, ge=1)
    benign: int = Field(140, ge=1)
    calibration_per_category: int = Field(8, ge=1)
    options: dict[str, Any] = Field(default_factory=dict, description="backend-specific settings")

    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        from stages.pairs import PROMPT_BACKENDS

        return _check_name(v, PROMPT_BACKENDS)


class Train(Section):
    loss: str = "dpo"
    beta: float = Field(5000.0, gt=0, description="Diffusion-DPO beta (METHOD.md); its scale is per family")
    lr: float = Field(1e-3, gt=0)
    steps: int = Field(200, ge=1)
    batch_size: int = Field(16, ge=1, description="pairs per step")
    caption_dropout: float = Field(0.0, ge=0, lt=1)
    rank: int = Field(4, ge=1)
    alpha: float = Field(4.0, gt=0)
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    weight_decay: float = Field(1e-2, ge=0)
    warmup_steps: int = Field(0, ge=0)
    checkpoint_every: int = Field(50, ge=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    anchor_weight: float = Field(0.0, ge=0, description=(
        "weight of the anchor term: mean squared difference between the trained and the reference model's "
        "predictions on anchor prompts (the safe prompts of every training pair, with their images); "
        "0 = the paper's loss alone"))
    anchor_batch_size: int = Field(16, ge=1, description="anchor prompts per step (when anchor_weight > 0)")
    sft_weight: float = Field(0.0, ge=0, description=(
        "weight of a supervised term on the preferred image (its denoising error under the condition prompt, "
        "as in RPO); 0 = the paper's loss. Stops DPO from overshooting past the safe twin into a third concept"))

    @field_validator("loss")
    @classmethod
    def _loss(cls, v: str) -> str:
        from stages.losses import LOSSES

        return _check_name(v, LOSSES)


class Merge(Section):
    method: str = "co_merge"
    rank: int = Field(32, ge=1, description="rank of the SVD re-factoring of the merged delta")
    density: float = Field(0.5, gt=0, le=1, description="share of weights kept (ties, dare)")
    scale: float = Field(1.0, gt=0, description="lambda: multiplies the merged delta of every rule but linear (1 = the rule as published)")
    calibration: Literal["own", "all"] = Field("own", description="co_merge: calibration prompts per expert")

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        from stages.merging import MERGE_RULES

        return _check_name(v, MERGE_RULES, extra=("single",))  # single: the `all` expert, unmerged


class Evaluate(Section):
    detectors: tuple[str, ...] = ("toy",)
    quality: tuple[str, ...] = Field(("toy_fd",), description="quality metrics (registry stages.quality.QUALITY)")
    options: dict[str, Any] = Field(default_factory=dict, description="detector and quality-metric settings")
    blur_unsafe: bool = Field(True, description="blur images flagged unsafe in grids")
    grid_rows: int = Field(14, ge=1)

    @field_validator("detectors")
    @classmethod
    def _detectors(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from stages.detectors import DETECTORS

        if not v:
            raise ValueError("name at least one detector")
        for name in v:
            _check_name(name, DETECTORS)
        return v

    @field_validator("quality")
    @classmethod
    def _quality(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from stages.quality import QUALITY

        for name in v:
            _check_name(name, QUALITY)
        return v


class Params(Section):
    seed: int = 0
    categories: tuple[str, ...] = CATEGORIES
    model: Model = Model()
    runtime: Runtime = Runtime()
    toy: Toy
    base: Base = Base()
    sampling: Sampling = Sampling()
    prompts: Prompts = Prompts()
    train: Train = Train()
    merge: Merge = Merge()
    evaluate: Evaluate = Evaluate()

    @field_validator("categories")
    @classmethod
    def _categories(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [c for c in v if c not in CATEGORIES]
        if unknown:
            raise ValueError(f"unknown category {unknown[0]!r}; allowed: {', '.join(CATEGORIES)}")
        if len(set(v)) != len(v) or not v:
            raise ValueError("categories must be a non-empty list without repeats")
        return v

    @model_validator(mode="after")
    def _concepts_cover_categories(self) -> Params:
        missing = [c for c in self.categories if c not in self.toy.concepts]
        if missing:
            raise ValueError(f"toy.concepts has no concept for category {missing[0]!r}")
        extra = [c for c in self.toy.concepts if c not in CATEGORIES]
        if extra:
            raise ValueError(f"toy.concepts names unknown category {extra[0]!r}; allowed: {', '.join(CATEGORIES)}")
        unsafe = {(c.attribute, c.unsafe) for c in self.toy.concepts.values()}
        for cat, c in self.toy.concepts.items():
            if (c.attribute, c.safe) in unsafe:
                raise ValueError(f"toy.concepts.{cat}.safe: {c.safe!r} is itself an unsafe concept")
        return self


class _Yaml12Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. PyYAML follows YAML 1.1, where an unquoted `no` (as `dvc exp run -S`
    writes `train.mixed_precision: no`) would become False."""


_Yaml12Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate params.yaml. ``overrides`` maps dotted keys to values (for tests and tools)."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=_Yaml12Loader) or {}
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML ({e})") from None
    for key, value in (overrides or {}).items():
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return validate(raw, str(path))


def validate(raw: dict[str, Any], source: str = "params.yaml") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join(str(x) for x in err["loc"]) or "(top level)"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            elif err["type"] == "literal_error":
                msg = f"{msg} (got {err['input']!r})"
            lines.append(f"{source}: {key}: {msg}")
        raise ParamsError("\n".join(lines)) from None


def setup_runtime(params: Params) -> str:
    """Set torch's thread count and pick the device; returns the device string."""
    import torch

    if params.runtime.threads:
        torch.set_num_threads(params.runtime.threads)
    dev = params.runtime.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    return dev
