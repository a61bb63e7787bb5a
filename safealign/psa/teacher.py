"""A teacher for the user branch: each user's own merge of the category experts (``psa.teacher: experts``).

For a user who bans the categories B, the teacher is the base model with the experts of B merged by the
pipeline's rule (``merge.method``, ``merge.scale``, ...; Co-Merge's input statistics computed once per expert),
and the base model itself for a user who bans nothing. No branch and no training: a router from the user's
banned list to the SafetyDPO experts. The branch is trained to match the teacher's prediction for its user
(``psa.teacher_weight`` times the mean squared difference, beside the preference loss), which tells it, for every
noisy image and caption, what blocking exactly the user's categories looks like.

``psa.teacher: category`` teaches each pair its own category's expert alone where the user bans that category
and the base model where the user allows it (``row_ban_sets``).

The teacher holds one LoRA adapter per distinct banned set of the training users, on its own copy of the base
denoiser; ``predict`` runs each set's rows through its adapter.
"""
from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from safealign.core.hashing import files_key
from safealign.core.paths import BASE, EXPERTS
from safealign.families.base import Cond, cond_index

ADAPTER = "ban{}"  # adapter names, by the index of the banned set


def ban_key(banned: Sequence[str], categories: Sequence[str]) -> tuple[str, ...]:
    """The banned categories in params order (the teacher's identity for a user)."""
    return tuple(c for c in categories if c in set(banned))


def row_ban_sets(mode: str, plan: Sequence[tuple[int, int, str, str]], banned: Sequence[Sequence[str]],
                 first: Sequence[str | None]) -> list[list[str]]:
    """Each per-user pair's teacher, as the banned set whose merge of experts it is (``[]``: the base model).
    ``experts``: the pair's user's whole banned set; ``category``: the pair's own category (``first``: each render
    pair's) where its user bans it, else nothing: a pair of a category the user allows is taught the base model
    even where the user bans other categories, whose experts would also move it. ``banned``: per user row."""
    if mode == "experts":
        return [list(banned[u]) for u, *_ in plan]
    if mode == "category":
        return [[first[i]] if first[i] in set(banned[u]) else [] for u, i, *_ in plan]
    raise ValueError(f"psa.teacher must be 'experts' or 'category', got {mode!r}")


def expert_files(categories: Sequence[str], folder: Path = EXPERTS) -> list[Path]:
    return [Path(folder) / f"{c}.safetensors" for c in categories]


def teacher_key(params: Any) -> str:
    """What the teacher's predictions depend on: the experts' files and the merge settings."""
    return files_key(expert_files(params.categories), extra=params.merge.model_dump())


class ExpertsTeacher:
    """A family with one merged-expert adapter per banned set: ``ban_sets`` at construction, more with ``add``
    (the empty set is the base model: no adapter). ``experts``: the folder of the category experts; ``fam``: the
    family to attach the adapters to (None: a base family of its own)."""

    def __init__(self, params: Any, ban_sets: Sequence[Sequence[str]], device: str, experts: Path = EXPERTS,
                 fam: Any = None) -> None:
        from safealign.families import get_family

        self.params, self.cats, self.experts = params, tuple(params.categories), Path(experts)
        self.fam = fam if fam is not None else get_family(params.model.family).from_params(params, BASE, device)
        self._loaded: dict[str, Any] = {}
        self._stats: dict[str, Any] = {}
        self.adapters: dict[tuple[str, ...], str | None] = {}
        for b in ban_sets:
            self.add(b)

    @property
    def keys(self) -> list[tuple[str, ...]]:
        return sorted(self.adapters)

    def _expert(self, c: str) -> Any:
        from safealign.families.lora import read_lora
        from safealign.merging.calibration import input_stats

        if c not in self._loaded:
            f = expert_files([c], self.experts)[0]
            if not f.exists():
                raise FileNotFoundError(f"{f}: the category expert is missing; run `dvc repro train`")
            self._loaded[c] = read_lora(f)
            if self.params.merge.method == "co_merge":  # its input statistics, with only this expert attached
                self._stats[c] = input_stats(self.fam, f, c, self.params)
        return self._loaded[c]

    def add(self, banned: Sequence[str]) -> tuple[str, ...]:
        """Make the adapter of the set ``banned`` (the merge of its experts by ``merge.*``); returns its key."""
        from safealign.families.lora import save_lora
        from safealign.merging.experts import merge_loaded

        key = ban_key(banned, self.cats)
        if key in self.adapters:
            return key
        if not key:
            self.adapters[key] = None
            return key
        m = self.params.merge
        experts = [self._expert(c) for c in key]
        merged = merge_loaded(experts, key, self.params, [self._stats[c] for c in key] if self._stats else None)
        name = ADAPTER.format(sum(v is not None for v in self.adapters.values()))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "lora.safetensors"
            save_lora(path, merged.lora, m.rank, float(m.rank), merged.targets)
            self.fam.load_lora(path, name=name)
        self.fam.unet.requires_grad_(False)
        self.adapters[key] = name
        return key

    def activate(self, banned: Sequence[str]) -> None:
        """From now on the family predicts as the merge of ``banned``'s experts (added if new; a non-empty set)."""
        name = self.adapters[self.add(banned)]
        if name is None:
            raise ValueError("activate: the empty banned set is the base model; use `active([])` for it")
        self.fam.raw_unet.set_adapter(name)

    @contextlib.contextmanager
    def active(self, banned: Sequence[str]) -> Any:
        """Within: the family predicts as the merge of ``banned``'s experts (added if new)."""
        if self.adapters[self.add(banned)] is None:
            if any(self.adapters.values()):
                with self.fam.adapters_disabled():
                    yield
            else:
                yield
            return
        self.activate(banned)
        yield

    def index(self, banned: Sequence[str], categories: Sequence[str]) -> int:
        return self.keys.index(ban_key(banned, categories))

    @torch.no_grad()
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, sets: torch.Tensor) -> torch.Tensor:
        """The teacher's prediction for every row; ``sets``: each row's banned-set index (``index``)."""
        out = torch.empty_like(x_t)
        cond = {k: v for k, v in cond.items() if not k.startswith("xattn.")}  # the teacher has no user branch
        keys = self.keys
        for s in sets.unique().tolist():
            rows = (sets == s).nonzero().flatten()
            part = cond_index(cond, rows.to(next(iter(cond.values())).device))
            with self.active(keys[s]):
                out[rows] = self.fam.predict(x_t[rows], t[rows], part)
        return out

    def render(self, banned: Sequence[str], prompts: Sequence[str], seeds: Sequence[int], steps: int,
               guidance: float, batch_size: int = 64, progress: bool = False, combine: Any = None) -> Any:
        """Render for a user who bans ``banned`` (the router as a model of its own)."""
        with self.active(banned):
            return self.fam.render(prompts, seeds, steps, guidance, batch_size, progress, combine)
