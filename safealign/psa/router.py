"""The ``routed_experts`` method: personalised safety without a branch, by routing each user to the experts of
the categories they ban.

For a user who bans the categories B, the model is the base with the SafetyDPO experts of B merged by the
pipeline's rule (``merge.method``, ``merge.scale``; ``teacher.ExpertsTeacher``), and the base model for a user who
bans nothing. Nothing is trained: ``build`` copies the experts into ``models/aligned/experts/``. It reads the
user's banned list, not the profile's embedding, so it needs a banned list (the users table has one; a typed
profile needs a ``Banned categories:`` sentence). A reference for PSA (``docs/psa.md``): what the learned branch
has to match. Without a user (the generic IP columns of `evaluate`) it renders for the default profile, every
category banned, which is the merge of all experts: the SafetyDPO merged model.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from safealign.core.io import atomic_path
from safealign.psa.teacher import ExpertsTeacher, expert_files

FOLDER = "experts"


class RoutedFamily:
    """A family that renders as the merge of the experts of one banned set."""

    def __init__(self, router: ExpertsTeacher, banned: Sequence[str]) -> None:
        self._router, self.banned = router, list(banned)
        router.add(banned)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._router.fam, name)

    def render(self, prompts: Any, seeds: Any, steps: int, guidance: float, batch_size: int = 64,
               progress: bool = False, combine: Any = None) -> Any:
        return self._router.render(self.banned, prompts, seeds, steps, guidance, batch_size, progress, combine)


class RoutedExperts:
    name = "routed_experts"
    combine = None

    def build(self, params: Any, out: Path, device: str) -> dict[str, Any]:
        out = Path(out)
        for src, dst in zip(expert_files(params.categories), expert_files(params.categories, out / FOLDER),
                            strict=True):
            if not src.exists():
                raise FileNotFoundError(f"{src}: routed_experts needs the category experts; run `dvc repro train`")
            with atomic_path(dst) as tmp:
                shutil.copyfile(src, tmp)
        info = {"method": self.name, "merge": params.merge.method, "experts": list(params.categories)}
        with atomic_path(out / "method.json") as tmp:
            tmp.write_text(json.dumps(info, sort_keys=True) + "\n")
        return info

    def attach(self, fam: Any, folder: Path, params: Any) -> list[Path]:
        """The router on ``fam``, rendering for the default profile (every category banned) until told a user."""
        self.router = ExpertsTeacher(params, [list(params.categories)], str(fam.device), Path(folder) / FOLDER, fam)
        self.router.activate(list(params.categories))  # fam renders as the merged model (attack, IP columns)
        return expert_files(params.categories, Path(folder) / FOLDER)

    def renderer(self, fam: Any) -> RoutedFamily:
        return RoutedFamily(self.router, list(self.router.cats))

    def for_user(self, fam: Any, vector: torch.Tensor, banned: Sequence[str] | None = None) -> RoutedFamily:
        if banned is None:
            raise ValueError("routed_experts renders for a banned list: give a users-table row or a profile with a "
                             "'Banned categories:' sentence")
        return RoutedFamily(self.router, banned)

