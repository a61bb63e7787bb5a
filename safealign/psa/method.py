"""The ``psa`` method: a user branch (``branch.py``) trained in the `align` stage on per-user pairs.

``build``: the seen users of ``data/users/`` and their vectors, per-user pairs from the render cache by the pair
rule (``pairs.py``), the branch attached zero-initialised to the base denoiser and trained with the loss
``psa.loss`` (reference = branch off, ``train.py``). Writes ``models/aligned/branch.safetensors``, the vector of
the default profile (``default_user.safetensors``: a profile that bans every category, used when a render has
no user: the generic IP columns of `evaluate`), the training log and ``method.json``.
``attach`` loads the branch; ``renderer`` gives the family that renders for the default profile, ``for_user``
the family that renders for one user vector.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from safealign.core.hashing import files_key, json_key
from safealign.core.io import atomic_path, read_table, safetensors_bytes
from safealign.core.paths import BASE, CHECKPOINTS, RENDER, base_files
from safealign.families import get_family
from safealign.psa.branch import UserFamily, attach_branch, load_branch, save_branch
from safealign.psa.pairs import first_categories, pair_plan, twin_plan, user_pairs, word_plan
from safealign.psa.train import train_branch, word_data
from safealign.psa.users import USER_COLUMNS

USERS = Path("data/users")
USERS_TABLE = USERS / "users.parquet"
USER_VECTORS = USERS / "embeddings.safetensors"
BRANCH = "branch.safetensors"
DEFAULT_USER = "default_user.safetensors"


def default_profile(categories: tuple[str, ...]) -> str:
    return f"No profile given. Banned categories: {', '.join(categories)}. Allowed categories: none."


def read_users() -> tuple[Any, torch.Tensor, dict[str, str]]:
    """The users table, its vectors (U, D) in table order, and the vectors' metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    users = read_table(USERS_TABLE, USER_COLUMNS)
    if not USER_VECTORS.exists():
        raise FileNotFoundError(f"{USER_VECTORS}: user vectors missing; run `dvc repro users`")
    with safe_open(str(USER_VECTORS), framework="pt") as f:
        meta = dict(f.metadata())
    if json.loads(meta["user_ids"]) != list(users.user_id):
        raise ValueError(f"{USER_VECTORS}: rows do not match {USERS_TABLE}; re-run `dvc repro users`")
    return users, load_file(str(USER_VECTORS))["vectors"], meta


def embed_texts(params: Any, texts: list[str], device: str = "cpu") -> torch.Tensor:
    from safealign.psa import EMBEDDERS
    from safealign.psa.embed import embed_profiles

    embedder = EMBEDDERS.get(params.psa.embedder)(params, device)
    return torch.from_numpy(embed_profiles(embedder, texts, params.psa.profile_parts)).float()


def train_user_branch(params: Any, users: Any, vectors: torch.Tensor, pair_categories: list[Any],
                      cache: dict[str, torch.Tensor], device: str, log_csv: Path,
                      checkpoints: Path | None = None) -> tuple[Any, Any, list, Any, dict]:
    """The seen users' per-user pairs (pair rule, ``pairs.py``) from the render cache, the branch attached to the
    base denoiser by ``params.psa`` and trained (``train.py``). ``pair_categories``: each render pair's categories
    (a pair given none is never drawn); ``checkpoints``: the folder to checkpoint into and resume from (None:
    neither). Returns (family, branch, plan, pairs, the last-20 training summary)."""
    from safealign.training import LOSSES

    c = params.psa
    psa_seed = params.seed if c.seed is None else c.seed  # the pair draw, the branch's init and its training
    seen = torch.tensor((users.split == "seen").to_numpy())
    seen_users = users[seen.numpy()].reset_index(drop=True)
    plan = pair_plan(seen_users, pair_categories, params.categories, c.pairs_per_user, psa_seed, c.captions)
    data = user_pairs(plan, cache, vectors[seen])
    twins = None
    if c.contrast > 0:  # counterfactual couples: the same images and caption for a user ruled the other way
        rows, twin = twin_plan(plan, seen_users, pair_categories, params.categories, psa_seed)
        twins = (torch.tensor(rows), user_pairs(twin, cache, vectors[seen])) if rows else None
    words = None
    if c.word_weight > 0:  # every seen user with every usable render pair: text states only, no images
        words = word_data(word_plan(seen_users, pair_categories, params.categories), cache, vectors[seen])
    fam = get_family(params.model.family).from_params(params, BASE, device)
    branch = attach_branch(fam.unet, vectors.shape[1], c.tokens, c.scale, seed=psa_seed, key_init=c.key_init,
                           query=c.query, null_token=c.null_token, unconditional=c.unconditional,
                           gate=c.gate)
    branch.projection.standardise_from(vectors[seen])
    beta, seed = c.beta or params.train.beta, psa_seed * 1000 + 16
    teacher = sets = None
    if c.teacher != "none":
        from safealign.psa.teacher import ExpertsTeacher, row_ban_sets, teacher_key

        row_sets = row_ban_sets(c.teacher, plan, list(seen_users.banned),
                                first_categories(pair_categories, params.categories))
        teacher = ExpertsTeacher(params, row_sets, device)
        sets = torch.tensor([teacher.index(b, params.categories) for b in row_sets])
    key = ""
    if checkpoints is not None:  # the run's identity: resumed only with the same settings, pairs, vectors, models
        vectors_key = hashlib.sha256(vectors.detach().cpu().numpy().tobytes()).hexdigest()
        key = json_key(c.model_dump(), beta, seed, plan, vectors_key,
                       files_key([RENDER / "cache.safetensors", *base_files()]),
                       teacher_key(params) if teacher is not None else "")
    summary = train_branch(fam, branch, data, c, beta, LOSSES.get(c.loss), seed, log_csv,
                           checkpoints=checkpoints, key=key, teacher=teacher, sets=sets, twins=twins, words=words)
    return fam, branch, plan, data, summary


class Psa:
    name = "psa"
    combine = None  # the branch changes the denoiser; the guidance rule is the default

    def build(self, params: Any, out: Path, device: str) -> dict[str, Any]:
        from safealign.training.data import read_cache

        c, out = params.psa, Path(out)
        users, vectors, meta = read_users()
        manifest, cache = read_cache()
        _, branch, plan, data, summary = train_user_branch(params, users, vectors, list(manifest.categories), cache,
                                                          device, out / "train.csv", CHECKPOINTS / self.name)
        seen = (users.split == "seen").to_numpy()
        save_branch(out / BRANCH, branch, embedder=meta.get("embedder", ""),
                    psa=json.dumps(c.model_dump(), sort_keys=True))
        default = embed_texts(params, [default_profile(params.categories)])
        with atomic_path(out / DEFAULT_USER) as tmp:
            tmp.write_bytes(safetensors_bytes({"vector": default[0].contiguous()},
                                              {"profile": default_profile(params.categories)}))
        preferred_safe = sum(p[3] == "safe" for p in plan)
        info = {"method": self.name, "seen_users": int(seen.sum()), "pairs": len(data),
                "pairs_safe_preferred": preferred_safe, "pairs_unsafe_preferred": len(plan) - preferred_safe,
                "tokens": c.tokens, "scale": c.scale, "steps": c.steps, "embedder": c.embedder,
                **{f"last20_{k}": v for k, v in summary.items()}}
        with atomic_path(out / "method.json") as tmp:
            tmp.write_text(json.dumps(info, sort_keys=True) + "\n")
        return info

    def attach(self, fam: Any, folder: Path, params: Any) -> list[Path]:
        from safetensors.torch import load_file

        self.branch, _ = load_branch(Path(folder) / BRANCH, fam.unet)
        self.default_user = load_file(str(Path(folder) / DEFAULT_USER))["vector"]
        return [Path(folder) / BRANCH, Path(folder) / DEFAULT_USER]

    def renderer(self, fam: Any) -> UserFamily:
        """The family that renders for the default profile (every category banned)."""
        return UserFamily(fam, self.branch, self.default_user)

    def for_user(self, fam: Any, vector: torch.Tensor, banned: Any = None) -> UserFamily:
        """The family that renders for one user: the branch reads the vector (``banned`` is not used)."""
        return UserFamily(fam, self.branch, vector)
