"""Rendering for one user: prompts rendered by the aligned model of a per-user method (``models/aligned``,
``method`` psa: the trained branch; routed_experts: the experts of the banned categories) for a profile given as
text or as a row of the users table, written as PNGs with the judge's verdicts.

A verdict names the categories the image shows and, where the profile's banned list is known (a users-table row,
or a text with a ``Banned categories: a, b.`` sentence, as ``profile_text`` writes), whether a banned one is
shown. Whether an allowed concept is kept needs what the prompt carries, which a free prompt does not say: the
`evaluate` stage measures that on the test prompts.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safealign.core.io import atomic_path
from safealign.core.paths import ALIGNED, BASE
from safealign.families import get_family
from safealign.families.rendering import save_png
from safealign.methods import METHODS
from safealign.psa import JUDGES
from safealign.psa.embed import list_items
from safealign.psa.method import embed_texts, read_users


def banned_from_text(profile: str, categories: tuple[str, ...]) -> list[str] | None:
    """The categories a hand-typed profile bans, in params order; None without a banned list (the parser the
    embedder's fields use: ``safealign.psa.embed.list_items``)."""
    names = list_items(profile)
    return None if names is None else [c for c in categories if c in names]


def render_for_profile(params: Any, profile: str | None, user: str | None, prompts: list[str], out: Path,
                       seed: int = 0, device: str = "cpu") -> dict[str, Any]:
    cats = tuple(params.categories)
    if user is not None:
        users, vectors, _ = read_users()
        hit = users.index[users.user_id == user].tolist()
        if not hit:
            raise ValueError(f"--user {user!r}: not in data/users/users.parquet")
        vector, profile, banned = vectors[hit[0]], users.profile[hit[0]], list(users.banned[hit[0]])
    else:
        assert profile is not None
        vector, banned = embed_texts(params, [profile])[0], banned_from_text(profile, cats)
    fam = get_family(params.model.family).from_params(params, BASE, device)
    method = METHODS.get(params.method)()
    if not hasattr(method, "for_user"):
        raise ValueError(f"method {params.method!r} ignores users; render for a profile with method psa or "
                         "routed_experts (`dvc exp run -S method=psa`, then `dvc exp apply`)")
    method.attach(fam, ALIGNED, params)
    view = method.for_user(fam, vector, banned)
    sp = params.sampling
    images = view.render(prompts, [seed + i for i in range(len(prompts))], sp.steps, sp.guidance, sp.batch_size)
    judge = JUDGES.get(params.psa.judge)(params)
    shown = judge.shown(images, [profile] * len(images))
    out = Path(out)
    verdicts = []
    for i, (p, img, s) in enumerate(zip(prompts, images, shown)):
        name = f"{i:03d}.png"
        save_png(out / name, img)
        names = [c for c, x in zip(cats, s) if x]
        v: dict[str, Any] = {"image": name, "prompt": p, "seed": seed + i, "shown": names}
        if banned is not None:
            v["banned_shown"] = [c for c in names if c in banned]
            v["banned_respected"] = not v["banned_shown"]
        verdicts.append(v)
    report = {"profile": profile, "banned": banned, "images": len(images), "judge": judge.protocol(),
              "verdicts": verdicts, "output": str(out)}
    with atomic_path(out / "verdicts.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return {k: report[k] for k in ("profile", "banned", "images", "output")} | {
        "banned_respected": sum(bool(v.get("banned_respected")) for v in verdicts)}
