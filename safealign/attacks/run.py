"""The `attack` stage's library side: load the target model, run the attacks named in ``attack.methods``, write
their prompt sets (``data/attacks/<name>.parquet``) and ``metrics/attacks.json``.

Target (``attack.target``): ``aligned`` (the model `evaluate` scores: base + the method named by ``method``),
``base``, or ``expert:<category>`` (one safety expert). The unaligned reference of the white-box attack is the
base model (the target with its adapters disabled). Banned words (``attack.ban``): ``own`` (the category's
concept words, as Ring-A-Bell bans them) or ``all`` (every category's: a flag then can only come from the attack,
since IP counts any category's concept).

Each attack set row: ``prompt_id, prompt, categories ([the attacked category]), seed``; every found prompt is
written ``attack.seeds_per_prompt`` times with its own seeds.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from safealign.core.errors import UserError
from safealign.core.ids import SEED_STRIDE

ATTACK_SEED_OFFSET = 900_000
PLACEHOLDER = "<adv>"  # an unknown word: the toy tokenizer maps it to <unk>, which no prompt of the grammar holds


class AttackUnavailable(UserError):
    """The target's family cannot serve this attack (no word vocabulary, no concept words): the stage reports it
    and goes on, so a pipeline of such a family still runs; `evaluate` then lists the attack's set as missing."""


@dataclasses.dataclass
class AttackContext:
    """What an attack needs: params, the target family (attached), its guidance rule, data and detectors."""

    params: Any
    fam: Any
    combine: Any
    detectors: list[Any]
    manifest: pd.DataFrame
    cache: dict[str, torch.Tensor]
    has_adapter: bool
    categories: tuple[str, ...]
    base: Any = None  # the unaligned model, loaded apart when the target's method edited the weights in place (UCE)

    # ---------------------------------------------------------------- text side
    def vocabulary(self) -> list[str]:
        words = getattr(getattr(self.fam, "tokenizer", None), "words", None)
        if words is None:
            raise AttackUnavailable(f"attack: family {self.params.model.family!r} exposes no word vocabulary "
                            "(fam.tokenizer.words); the attacks support the toy family")
        return list(words)

    @property
    def special_ids(self) -> set[int]:
        return {i for i, w in enumerate(self.vocabulary()) if w.startswith("<") and w.endswith(">")}

    @property
    def placeholder_word(self) -> str:
        return PLACEHOLDER

    @property
    def placeholder_id(self) -> int:
        ids = self.fam.tokenizer([PLACEHOLDER])[0]
        return int(ids[1])

    def input_embedding(self) -> torch.nn.Embedding:
        return self.fam.text_encoder.get_input_embeddings()

    @torch.no_grad()
    def embed(self, prompts: list[str], batch: int = 512) -> torch.Tensor:
        """(N, L, D) text states the denoiser cross-attends to."""
        out = [self.fam.encode_prompts(prompts[i:i + batch])["encoder_hidden_states"].float().cpu()
               for i in range(0, len(prompts), batch)]
        return torch.cat(out)

    def banned(self, category: str) -> tuple[str, ...]:
        from safealign.attacks import CONCEPT_WORDS

        cats = self.params.categories if self.params.attack.ban == "all" else (category,)
        given = self.params.attack.words
        words: list[str] = []
        for c in cats:
            if c in given:
                words += list(given[c])
            elif self.params.model.family in CONCEPT_WORDS:
                words += list(CONCEPT_WORDS.get(self.params.model.family)(self.params, c))
            else:
                raise AttackUnavailable(f"params.yaml: attack.words.{c}: no concept words for family "
                                f"{self.params.model.family!r}; name them")
        return tuple(dict.fromkeys(words))

    # ---------------------------------------------------------------- data
    def pairs(self, category: str) -> pd.DataFrame:
        """The category's single-label training pairs (their prompts differ only in the concept); where it has
        none, its multi-label ones."""
        rows = self.manifest[[list(c) == [category] for c in self.manifest.categories]]
        if rows.empty:
            rows = self.manifest[[category in list(c) for c in self.manifest.categories]]
        if rows.empty:
            raise UserError(f"attack: category {category!r} has no pairs in data/render/manifest.parquet")
        return rows

    def attack_prompts(self, category: str) -> pd.DataFrame:
        """``attack.prompts_per_category`` of the category's pairs, chosen by the seed."""
        pairs = self.pairs(category)
        rng = np.random.default_rng(self.params.seed + 303 + self.params.categories.index(category))
        n = min(self.params.attack.prompts_per_category, len(pairs))
        return pairs.iloc[np.sort(rng.choice(len(pairs), n, replace=False))]

    def _row(self, pair_id: str) -> int:
        return int(np.flatnonzero(self.manifest.pair_id.to_numpy() == pair_id)[0])

    def concept_image(self, pair_id: str) -> torch.Tensor:
        return self.cache["x0_l"][self._row(pair_id)]

    def unsafe_cond(self, pair_id: str) -> dict[str, torch.Tensor]:
        i = self._row(pair_id)
        return {k.removeprefix("cond."): v[i] for k, v in self.cache.items() if k.startswith("cond.")}

    def rows(self, prefix: str, category: str, j: int, prompt: str) -> list[dict[str, Any]]:
        base = self.params.seed * SEED_STRIDE + ATTACK_SEED_OFFSET + self.params.categories.index(category) * 10_000
        return [{"prompt_id": f"{prefix}_{category}_{j}_s{k}", "prompt": prompt, "categories": [category],
                 "seed": base + j * 100 + k} for k in range(self.params.attack.seeds_per_prompt)]

    # ---------------------------------------------------------------- model side
    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """The unaligned model: the target with its adapters disabled (the base model)."""
        with self.fam.adapters_disabled() if self.has_adapter else contextlib.nullcontext():
            yield

    def reference_predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """The unaligned model's prediction: ``base`` where the method edited the weights in place, else the target
        with its adapters disabled."""
        if self.base is not None:
            return self.base.predict(x_t, t, cond)
        with self.reference():
            return self.fam.predict(x_t, t, cond)

    def render(self, prompts: list[str], seeds: list[int]) -> np.ndarray:
        s = self.params.sampling
        return self.fam.render(prompts, seeds, s.steps, s.guidance, s.batch_size, combine=self.combine)

    def render_soft(self, prompt: str, soft: torch.Tensor, category: str, j: int) -> np.ndarray:
        from safealign.attacks.whitebox import soft_tokens

        seeds = [r["seed"] for r in self.rows("soft", category, j, prompt)]
        with torch.no_grad(), soft_tokens(self.input_embedding(), self.placeholder_id, soft):
            return self.render([prompt] * len(seeds), seeds)

    def flag(self, images: np.ndarray) -> np.ndarray:
        from safealign.evaluation.scoring import flag

        return flag(images, self.detectors)

    def set_ip(self, flags: np.ndarray, categories: list[list[str]]) -> dict[str, Any]:
        from safealign.evaluation.sets import set_ip

        return set_ip(flags, categories, self.params.categories)

    def target_rate(self, images: np.ndarray, categories: list[list[str]]) -> dict[str, float]:
        """Per category, the share of its rows showing that category's own concept (a detector that reports
        per-category flags is needed; else {})."""
        from safealign.evaluation.sets import target_rate

        return target_rate(images, categories, self.detectors, self.params.categories)

    def score_rows(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        if not rows:
            return {}
        images = self.render([r["prompt"] for r in rows], [r["seed"] for r in rows])
        cats = [r["categories"] for r in rows]
        return {**self.set_ip(self.flag(images), cats), "target_rate": self.target_rate(images, cats)}


def load_target(params: Any, device: str) -> tuple[Any, Any, bool, Any]:
    """(family, guidance rule, has_adapter, base) of ``attack.target``; files named in errors. ``base`` is a separate
    copy of the unaligned model when the target's method edits the base weights in place (a method with
    ``edits_base_weights``, such as UCE), else None (the reference is the target with its adapters disabled)."""
    from safealign.core.paths import ALIGNED, BASE, EXPERTS
    from safealign.families import get_family
    from safealign.methods import METHODS

    fam = get_family(params.model.family).from_params(params, BASE, device)
    target, combine, base = params.attack.target, None, None
    if target == "aligned":
        method = METHODS.get(params.method)()
        method.attach(fam, ALIGNED, params)
        combine = method.combine
        if getattr(method, "edits_base_weights", False):
            base = get_family(params.model.family).from_params(params, BASE, device)
            freeze(base)
    elif target.startswith("expert:"):
        path = EXPERTS / f"{target.split(':', 1)[1]}.safetensors"
        if not path.exists():
            raise UserError(f"params.yaml: attack.target: {path} not found; run `dvc repro train`")
        fam.load_lora(path)
    freeze(fam)
    return fam, combine, bool(fam.lora_modules()), base


def freeze(fam: Any) -> None:
    """No weight of the target (denoiser, adapters, text encoder) takes a gradient: attacks move prompts only."""
    fam.unet.requires_grad_(False)
    for encoder in getattr(fam, "text_encoders", None) or [fam.text_encoder]:  # SD families hold a list
        encoder.requires_grad_(False)


def run_attacks(params: Any, device: str, out: Path) -> dict[str, Any]:
    """Run every attack of ``attack.methods`` against the target; write ``out/<name>.parquet``; return metrics."""
    from safealign.attacks import ATTACKS
    from safealign.core.io import write_table
    from safealign.evaluation.scoring import build_detectors
    from safealign.training.data import read_cache

    fam, combine, has_adapter, base = load_target(params, device)
    manifest, cache = read_cache()
    detectors, missing = build_detectors(params)
    cats = params.attack.categories or params.categories
    ctx = AttackContext(params, fam, combine, detectors, manifest, cache, has_adapter, tuple(cats), base)
    metrics: dict[str, Any] = {"target": params.attack.target, "method": params.method, "ban": params.attack.ban,
                               "missing": missing}
    Path(out).mkdir(parents=True, exist_ok=True)  # DVC's output, even when no attack could run
    for name in params.attack.methods:
        try:
            rows, report = ATTACKS.get(name)(ctx)
        except AttackUnavailable as e:  # the family cannot serve it: reported, and evaluate lists the set missing
            (Path(out) / f"{name}.parquet").unlink(missing_ok=True)
            metrics[name] = {"unavailable": str(e)}
            print(f"attack {name}: unavailable: {e}", file=sys.stderr)
            continue
        table = pd.DataFrame(rows, columns=["prompt_id", "prompt", "categories", "seed"])
        write_table(Path(out) / f"{name}.parquet", table)
        metrics[name] = {**report, "prompts": int(table.prompt.nunique()), "rows": len(table)}
        print(f"attack {name}: {len(table)} rows in {report['seconds']:.1f} s")
    s = params.sampling
    metrics["protocol"] = {"detectors": [d.protocol() for d in detectors], "sampler": "ddim", "steps": s.steps,
                           "guidance": s.guidance, "seeds_per_prompt": params.attack.seeds_per_prompt,
                           "timing": "wall-clock seconds on the machine that ran the stage"}
    return metrics
