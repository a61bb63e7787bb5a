"""The ``negative_prompt`` method: every category's concept words as the unconditional prompt of guidance.

Classifier-free guidance then pushes away from the concepts: pred = n + guidance * (c - n) with n the prediction
under the negative prompt (diffusers' ``negative_prompt``). The words are the categories' concept words
(``safealign.baselines.concepts``), so the same categories and concepts as the experts'. Sampling-time only.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from safealign.core.io import atomic_path


class NegativeGuidance:
    """A guidance rule (``safealign.families.sampling``) whose unconditional prompt is ``prompt``."""

    def __init__(self, prompt: str) -> None:
        self.prompt = prompt

    def unconditional(self, fam: Any, n: int) -> dict[str, torch.Tensor]:
        c = fam.encode_prompts([self.prompt])
        return {k: v.expand(n, *v.shape[1:]) for k, v in c.items()}

    def __call__(self, uncond: torch.Tensor, cond: torch.Tensor, guidance: float, t: torch.Tensor,
                 state: dict[str, Any]) -> torch.Tensor:
        return uncond + guidance * (cond - uncond)


class NegativePrompt:
    name = "negative_prompt"
    combine = None  # set by attach

    def build(self, params: Any, out: Path, device: str) -> dict[str, Any]:
        from safealign.baselines.concepts import concept_prompt, load_concepts

        info = {"method": self.name, "negative_prompt": concept_prompt(load_concepts(params.categories))}
        with atomic_path(Path(out) / "method.json") as tmp:
            tmp.write_text(json.dumps(info, sort_keys=True) + "\n")
        return info

    def attach(self, fam: Any, folder: Path, params: Any) -> list[Path]:
        path = Path(folder) / "method.json"
        info = json.loads(path.read_text())
        if info.get("method") != self.name:
            raise ValueError(f"{path}: built by method {info.get('method')!r}, not {self.name!r}; run `dvc repro align`")
        self.combine = NegativeGuidance(info["negative_prompt"])
        return [path]
