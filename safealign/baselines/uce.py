"""The ``uce`` method: Unified Concept Editing (Gandikota et al., WACV 2024), a closed-form edit of cross-attention.

Every cross-attention key and value projection W (d_out, d_in) of the denoiser is replaced by

    W' = (lam W + s_e sum_i v*_i k_i^T + s_p sum_j (W k_p_j) k_p_j^T) (lam I + s_e sum_i k_i k_i^T + s_p sum_j k_p_j k_p_j^T)^-1

the minimiser of lam |W' - W|^2 + s_e sum_i |W' k_i - v*_i|^2 + s_p sum_j |W' k_p_j - W k_p_j|^2: the concepts' text
embeddings k_i are sent where the old projection sent their safe twins' (v*_i = W k_twin_i), kept embeddings k_p
keep their outputs. Which text states (``uce.prompts``), from ``safealign.baselines.concepts``:

- ``pairs``: every unsafe training prompt of the categories -> its safe twin, position by position of the text
  states (a contextual encoder writes the concept into the positions after its word too); kept: the safe twins
  and the empty prompt. Needs twins of the same token length to be meaningful (the toy's minimal edits, padded
  encoders such as CLIP's 77 positions).
- ``words``: each category's concept words -> its twin's words (the paper's form), kept: the empty prompt.

Cross-attention layers are found as diffusers ``Attention`` modules with ``is_cross_attention`` (no family names).
The edited projections are written to ``models/aligned/uce.safetensors``; ``attach`` loads them over the base.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from safealign.core.io import atomic_path, safetensors_bytes

WEIGHTS = "uce.safetensors"
PROJECTIONS = ("to_k", "to_v")


def uce_edit(w: torch.Tensor, k: torch.Tensor, k_target: torch.Tensor, k_keep: torch.Tensor, lam: float,
             erase_scale: float, preserve_scale: float) -> torch.Tensor:
    """The closed form above. w (d_out, d_in); k, k_target (n, d_in) row-paired; k_keep (m, d_in). Solved in
    float64, returned in w's dtype. With lam = 0 the system needs enough independent constraints to be solvable."""
    w64, k, kt, kp = (x.double() for x in (w, k, k_target, k_keep))
    v_target = kt @ w64.T  # (n, d_out): where the old projection sends the twins
    lhs = lam * w64 + erase_scale * v_target.T @ k + preserve_scale * (kp @ w64.T).T @ kp  # (d_out, d_in)
    gram = (lam * torch.eye(w.shape[1], dtype=torch.float64) + erase_scale * k.T @ k
            + preserve_scale * kp.T @ kp)  # (d_in, d_in), symmetric
    return torch.linalg.solve(gram, lhs.T).T.to(w.dtype)


def cross_attention_projections(unet: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The key and value projections of every cross-attention layer, by module name."""
    out = {}
    for name, m in unet.named_modules():
        if getattr(m, "is_cross_attention", False):
            for proj in PROJECTIONS:
                out[f"{name}.{proj}"] = getattr(m, proj)
    if not out:
        raise ValueError("the denoiser has no cross-attention layer (diffusers Attention with is_cross_attention)")
    return out


@torch.no_grad()
def text_states(fam: Any, prompts: Sequence[str], batch: int = 256) -> torch.Tensor:
    """The text states cross-attention reads, all positions of all prompts: (N * L, D)."""
    rows = [fam.encode_prompts(list(prompts[i:i + batch]))["encoder_hidden_states"].float()
            for i in range(0, len(prompts), batch)]
    states = torch.cat(rows)
    return states.reshape(-1, states.shape[-1]).cpu()


def edit_sets(fam: Any, params: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(k, k_target, k_keep) for ``uce.prompts`` (see the module docstring)."""
    from safealign.baselines.concepts import load_concepts

    concepts = load_concepts(params.categories).values()
    if params.uce.prompts == "pairs":
        unsafe = [p for c in concepts for p in c.unsafe_prompts]
        safe = [p for c in concepts for p in c.safe_prompts]
        keep = sorted(set(safe)) + [""]
    else:
        unsafe, safe, keep = [c.text for c in concepts], [c.safe_text for c in concepts], [""]
    return text_states(fam, unsafe), text_states(fam, safe), text_states(fam, keep)


class UnifiedConceptEditing:
    name = "uce"
    combine = None  # a weight-space method
    edits_base_weights = True  # attach overwrites base weights: an attack loads the unaligned model apart

    def build(self, params: Any, out: Path, device: str) -> dict[str, Any]:
        from safealign.core.paths import BASE
        from safealign.families import get_family

        u = params.uce
        fam = get_family(params.model.family).from_params(params, BASE, device)
        k, k_target, k_keep = edit_sets(fam, params)
        edited, change = {}, {}
        for name, lin in cross_attention_projections(fam.raw_unet).items():
            w = lin.weight.detach().float().cpu()
            new = uce_edit(w, k, k_target, k_keep, u.lam, u.erase_scale, u.preserve_scale)
            edited[f"{name}.weight"] = new.contiguous()
            change[name] = float((new - w).norm() / w.norm())
        md = {"method": self.name, "uce": json.dumps(u.model_dump(), sort_keys=True)}
        with atomic_path(Path(out) / WEIGHTS) as tmp:
            tmp.write_bytes(safetensors_bytes(edited, md))
        info = {"method": self.name, **u.model_dump(), "edited_layers": len(edited), "erase_vectors": len(k),
                "keep_vectors": len(k_keep), "relative_change_mean": sum(change.values()) / len(change)}
        with atomic_path(Path(out) / "method.json") as tmp:
            tmp.write_text(json.dumps(info, sort_keys=True) + "\n")
        return info

    def attach(self, fam: Any, folder: Path, params: Any) -> list[Path]:
        from safetensors.torch import load_file

        path = Path(folder) / WEIGHTS
        state = load_file(str(path))
        layers = cross_attention_projections(fam.raw_unet)
        missing = [n for n in layers if f"{n}.weight" not in state]
        if missing or len(state) != len(layers):
            raise ValueError(f"{path}: does not match this denoiser's cross-attention (e.g. {missing[:1]}); "
                             "run `dvc repro align`")
        with torch.no_grad():
            for name, lin in layers.items():
                lin.weight.copy_(state[f"{name}.weight"].to(lin.weight.dtype))
        return [path]
