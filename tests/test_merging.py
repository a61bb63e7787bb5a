"""Merge rules: invariants over the registry, hand-built examples, SVD re-factoring and the LoRA plumbing."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from safealign.merging import MERGE_RULES
from safealign.merging.deltas import lora_deltas, merge_state_dicts, refactor
from safealign.merging.rules import (
    MergeOptions,
    co_merge,
    dare,
    max_abs,
    task_arithmetic,
    ties,
)

RULES = sorted(MERGE_RULES)
UNIT = MergeOptions(density=1.0, scale=1.0)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def experts(n: int, out: int = 3, inp: int = 4, seed: int = 0) -> list[torch.Tensor]:
    return [randn(out, inp, seed=seed + i) for i in range(n)]


def stats_for(deltas: list[torch.Tensor], seed: int = 100) -> list[torch.Tensor]:
    """Positive per-expert input statistics, (in,) each; rules other than co_merge ignore them."""
    return [randn(d.shape[1], seed=seed + i).abs() + 0.1 for i, d in enumerate(deltas)]


def merge(name: str, deltas: list[torch.Tensor], options: MergeOptions = MergeOptions()) -> torch.Tensor:
    return MERGE_RULES.get(name)(deltas, options=options, stats=stats_for(deltas))


def lora_state(modules: dict[str, tuple[int, int]], rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    state = {}
    for j, (module, (out, inp)) in enumerate(modules.items()):
        state[f"{module}.lora_A.weight"] = randn(rank, inp, seed=seed + 2 * j)
        state[f"{module}.lora_B.weight"] = randn(out, rank, seed=seed + 2 * j + 1)
    return state


MODULES = {"unet.down.attn1.to_q": (6, 5), "unet.up.attn2.to_k": (4, 7)}


# ---------------------------------------------------------------------- invariants over the registry
def test_registry_names() -> None:
    assert set(MERGE_RULES) == {"linear", "task_arithmetic", "ties", "dare", "max_abs", "co_merge"}


@pytest.mark.parametrize("name", RULES)
def test_one_expert_gives_itself_back(name: str) -> None:
    (d,) = experts(1)
    assert torch.equal(merge(name, [d], UNIT), d)


def test_options_do_not_matter_for_linear() -> None:
    (d,) = experts(1)
    assert torch.equal(merge("linear", [d], MergeOptions(density=0.3, scale=2.0, seed=7)), d)


@pytest.mark.parametrize("name", ["max_abs", "co_merge"])
def test_winner_takes_all_rules_scale_by_lambda_and_ignore_density(name: str) -> None:
    deltas = experts(3)
    plain = merge(name, deltas, MergeOptions(density=1.0, scale=1.0))
    assert_close(merge(name, deltas, MergeOptions(density=0.3, scale=0.6, seed=7)), 0.6 * plain)


@pytest.mark.parametrize("name", RULES)
def test_same_seed_same_result(name: str) -> None:
    deltas, options = experts(3), MergeOptions(density=0.5, scale=0.8, seed=3)
    out = merge(name, deltas, options)
    assert out.shape == deltas[0].shape
    assert torch.equal(out, merge(name, deltas, options))


@pytest.mark.parametrize("name", RULES)
def test_inputs_are_not_modified(name: str) -> None:
    deltas = experts(3)
    copies = [d.clone() for d in deltas]
    merge(name, deltas)
    assert all(torch.equal(d, c) for d, c in zip(deltas, copies))


# ---------------------------------------------------------------------- linear, task arithmetic, ties, dare
def test_linear_and_task_arithmetic() -> None:
    deltas = experts(3)
    assert_close(merge("linear", deltas), (deltas[0] + deltas[1] + deltas[2]) / 3)
    assert_close(merge("task_arithmetic", deltas, MergeOptions(scale=0.5)), 0.5 * (deltas[0] + deltas[1] + deltas[2]))


def test_ties_at_density_one_with_agreeing_signs_is_task_arithmetic() -> None:
    sign = randn(5, 6, seed=1).sign()
    deltas = [sign * (randn(5, 6, seed=10 + i).abs() + 0.01) for i in range(3)]
    options = MergeOptions(density=1.0, scale=0.7)
    assert_close(ties(deltas, options=options), task_arithmetic(deltas, options=options))


def test_ties_by_hand() -> None:
    d1 = torch.tensor([[4.0, -1.0], [0.5, 2.0]])
    d2 = torch.tensor([[-3.0, 1.0], [2.0, -0.1]])
    # trim to 2 of 4 entries: [[4, 0], [0, 2]] and [[-3, 0], [2, 0]]; elected signs: +, + (zero sum), +, +;
    # -3 disagrees and is dropped; the agreeing entries are summed.
    expected = torch.tensor([[4.0, 0.0], [2.0, 2.0]])
    assert_close(ties([d1, d2], options=MergeOptions(density=0.5, scale=1.0)), expected)
    assert_close(ties([d1, d2], options=MergeOptions(density=0.5, scale=0.5)), 0.5 * expected)


def test_dare_differs_across_seeds_and_leaves_the_global_rng_alone() -> None:
    deltas = experts(2)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = dare(deltas, options=MergeOptions(density=0.5, seed=0))
    b = dare(deltas, options=MergeOptions(density=0.5, seed=1))
    assert torch.equal(torch.get_rng_state(), before)
    assert not torch.equal(a, b)


def test_dare_drops_the_expected_share() -> None:
    out = dare([torch.ones(100, 100)], options=MergeOptions(density=0.3, seed=0))
    assert abs((out == 0).float().mean().item() - 0.7) < 0.02
    assert_close(out[out != 0], torch.full_like(out[out != 0], 1 / 0.3))


def test_dare_is_unbiased_in_expectation() -> None:
    deltas, scale = experts(2, 4, 5), 0.8
    mean = torch.stack([dare(deltas, options=MergeOptions(density=0.5, scale=scale, seed=s))
                        for s in range(1000)]).mean(dim=0)
    expected = task_arithmetic(deltas, options=MergeOptions(scale=scale))
    assert (mean - expected).norm() / expected.norm() < 0.1  # about 0.03 for 1000 draws


# ---------------------------------------------------------------------- max_abs and co_merge
def test_co_merge_follows_activation_where_max_abs_follows_magnitude() -> None:
    d1 = torch.tensor([[3.0, 1.0], [2.0, 1.0]])
    d2 = torch.tensor([[-1.0, 2.0], [1.0, -3.0]])
    s1 = torch.tensor([0.1, 1.0])  # expert 1 barely sees input 0: its large column-0 weights are inactive
    s2 = torch.tensor([1.0, 1.0])
    assert_close(max_abs([d1, d2]), torch.tensor([[3.0, 2.0], [2.0, -3.0]]))
    # activations: expert 1 [[0.3, 1], [0.2, 1]], expert 2 [[1, 2], [1, 3]]: expert 2 wins everywhere
    assert_close(co_merge([d1, d2], stats=[s1, s2]), d2)


def test_co_merge_with_a_shared_stat_is_max_abs() -> None:
    deltas = experts(3, 5, 6)
    shared = randn(6, seed=9).abs() + 0.1
    assert torch.equal(co_merge(deltas, stats=[shared] * 3), max_abs(deltas))


def test_ties_go_to_the_lower_expert_index() -> None:
    d1, d2 = torch.tensor([[1.0, -2.0]]), torch.tensor([[-1.0, 2.0]])
    assert_close(max_abs([d1, d2]), d1)
    assert_close(max_abs([d2, d1]), d2)
    assert_close(co_merge([d2, d1], stats=[torch.zeros(2), torch.zeros(2)]), d2)


BALANCED = MergeOptions(scale=1.0, balance=True)


def test_balance_lets_an_expert_with_a_small_edit_win_where_it_acts_most() -> None:
    d1 = torch.tensor([[4.0, 2.0]])  # mean |d1| 3: balanced [4/3, 2/3]
    d2 = torch.tensor([[1.0, 0.2]])  # mean |d2| 0.6: balanced [5/3, 1/3]
    assert_close(max_abs([d1, d2]), d1)  # unbalanced, the large edit wins every element
    assert_close(max_abs([d1, d2], options=BALANCED), torch.tensor([[1.0, 2.0]]))
    # co_merge: activations [4, 2] and [2, 0.1] (stats [1, 1], [2, 0.5]); balanced [4/3, 2/3] and [40/21, 2/21]
    s1, s2 = torch.tensor([1.0, 1.0]), torch.tensor([2.0, 0.5])
    assert_close(co_merge([d1, d2], stats=[s1, s2]), d1)
    assert_close(co_merge([d1, d2], stats=[s1, s2], options=BALANCED), torch.tensor([[1.0, 2.0]]))


def test_balance_does_not_depend_on_an_expert_s_overall_strength() -> None:
    deltas = experts(3, 5, 6)
    stats = [randn(6, seed=20 + i).abs() + 0.1 for i in range(3)]
    scaled = [deltas[0], 10.0 * deltas[1], 0.01 * deltas[2]]
    for rule, kw in ((max_abs, {}), (co_merge, {"stats": stats})):
        base = rule(deltas, options=BALANCED, **kw)
        picked = [(base == d) & (d != 0) for d in deltas]  # which expert each element came from
        expect = sum(p * d for p, d in zip(picked, scaled))
        assert_close(rule(scaled, options=BALANCED, **kw), expect)
        assert not torch.equal(rule(scaled, **kw), rule(scaled, options=BALANCED, **kw))


def test_balance_keeps_an_all_zero_expert_out() -> None:
    d1, zero = torch.tensor([[1.0, -2.0]]), torch.zeros(1, 2)
    assert_close(max_abs([zero, d1], options=BALANCED), d1)
    assert_close(co_merge([zero, d1], stats=[torch.ones(2), torch.ones(2)], options=BALANCED), d1)
    with pytest.raises(ValueError, match="balance"):
        MergeOptions(balance=1)  # type: ignore[arg-type]


def test_co_merge_needs_valid_stats() -> None:
    deltas = experts(2)
    with pytest.raises(ValueError, match="co_merge"):
        co_merge(deltas)
    with pytest.raises(ValueError, match="co_merge"):
        co_merge(deltas, stats=[torch.ones(4)])
    with pytest.raises(ValueError, match="co_merge"):
        co_merge(deltas, stats=[torch.ones(3), torch.ones(3)])
    with pytest.raises(ValueError, match="non-negative"):
        co_merge(deltas, stats=[torch.ones(4), -torch.ones(4)])


# ---------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("name", RULES)
def test_rules_reject_bad_deltas(name: str) -> None:
    rule = MERGE_RULES.get(name)
    with pytest.raises(ValueError, match="at least one"):
        rule([], options=MergeOptions(), stats=[])
    with pytest.raises(ValueError, match="shape"):
        merge(name, [torch.ones(3, 4), torch.ones(4, 3)])
    with pytest.raises(ValueError, match="shape"):
        rule([torch.ones(4)], options=MergeOptions(), stats=[torch.ones(4)])
    with pytest.raises(ValueError, match="NaN"):
        merge(name, [torch.full((3, 4), float("nan"))])


@pytest.mark.parametrize("density", [0.0, -0.5, 1.5])
def test_options_reject_bad_density(density: float) -> None:
    with pytest.raises(ValueError, match="density"):
        MergeOptions(density=density)


def test_unknown_rule_lists_allowed_names() -> None:
    with pytest.raises(KeyError, match="co_merge"):
        MERGE_RULES.get("single")


# ---------------------------------------------------------------------- refactor and the LoRA plumbing
def test_refactor_is_exact_at_or_above_the_true_rank() -> None:
    delta = randn(6, 2, seed=1) @ randn(2, 5, seed=2)  # rank 2
    for rank in (2, 3, 10):
        a, b, error = refactor(delta, rank)
        assert a.shape == (rank, 5) and b.shape == (6, rank)
        assert_close(b @ a, delta, atol=1e-5, rtol=1e-5)
        assert error < 1e-5


def test_refactor_reports_the_truncation_error() -> None:
    delta = randn(6, 5, seed=3)
    s = torch.linalg.svdvals(delta)
    a, b, error = refactor(delta, 2)
    assert_close(error, (s[2:].norm() / s.norm()).item(), atol=1e-5, rtol=1e-4)
    assert_close(error, ((delta - b @ a).norm() / delta.norm()).item())
    assert 0 < error < 1


def test_refactor_of_zero_is_zero() -> None:
    a, b, error = refactor(torch.zeros(4, 3), 2)
    assert error == 0.0 and not a.any() and not b.any()


def test_lora_deltas_and_refactor_round_trip() -> None:
    rank, alpha = 4, 8.0
    state = lora_state(MODULES, rank)
    deltas = lora_deltas(state, alpha, rank)
    assert set(deltas) == set(MODULES)
    q = "unet.down.attn1.to_q"
    assert_close(deltas[q], (alpha / rank) * state[q + ".lora_B.weight"] @ state[q + ".lora_A.weight"])
    refactored = {}
    for module, delta in deltas.items():
        a, b, error = refactor(delta, rank)
        assert error < 1e-5
        refactored[module + ".lora_A.weight"], refactored[module + ".lora_B.weight"] = a, b
    for module, delta in lora_deltas(refactored, alpha=rank, rank=rank).items():  # scale 1: alpha = rank
        assert_close(delta, deltas[module], atol=1e-5, rtol=1e-4)


def test_lora_deltas_rejects_bad_states() -> None:
    state = lora_state(MODULES, 4)
    with pytest.raises(ValueError, match="rank"):
        lora_deltas(state, 4.0, 3)
    with pytest.raises(ValueError, match="lacks"):
        lora_deltas({k: v for k, v in state.items() if "to_q.lora_B" not in k}, 4.0, 4)
    with pytest.raises(ValueError, match="neither"):
        lora_deltas({**state, "unet.x.weight": torch.ones(2, 2)}, 4.0, 4)


def test_merge_state_dicts_merges_layer_by_layer() -> None:
    rank, alpha, out_rank = 2, 2.0, 3
    states = [lora_state(MODULES, rank, seed=10 * i) for i in range(3)]
    stats = [{m: randn(inp, seed=50 + 10 * i + j).abs() for j, (m, (_, inp)) in enumerate(MODULES.items())}
             for i in range(3)]
    state, merged, errors = merge_state_dicts(states, alpha, rank, "co_merge", MergeOptions(), stats, out_rank)
    assert set(merged) == set(errors) == set(MODULES)
    assert set(state) == {m + s for m in MODULES for s in (".lora_A.weight", ".lora_B.weight")}
    per_expert = [lora_deltas(s, alpha, rank) for s in states]
    for module, (out, inp) in MODULES.items():
        assert_close(merged[module], co_merge([d[module] for d in per_expert], stats=[s[module] for s in stats]))
        assert state[module + ".lora_A.weight"].shape == (out_rank, inp)
        assert state[module + ".lora_B.weight"].shape == (out, out_rank)
        a, b, error = refactor(merged[module], out_rank)
        assert errors[module] == error
        assert_close(state[module + ".lora_B.weight"] @ state[module + ".lora_A.weight"], b @ a)


def test_merge_state_dicts_of_one_expert_gives_it_back() -> None:
    rank, alpha = 3, 6.0
    state = lora_state(MODULES, rank)
    merged_state, merged, errors = merge_state_dicts([state], alpha, rank, "linear", MergeOptions(), None, rank)
    original = lora_deltas(state, alpha, rank)
    for module, delta in lora_deltas(merged_state, alpha=rank, rank=rank).items():
        assert_close(delta, original[module], atol=1e-5, rtol=1e-4)
        assert errors[module] < 1e-5


def test_merge_state_dicts_draws_a_dare_mask_per_layer() -> None:
    same = {"unet.a.to_q": (8, 8), "unet.b.to_q": (8, 8)}
    state = lora_state(same, 2)
    state["unet.b.to_q.lora_A.weight"] = state["unet.a.to_q.lora_A.weight"]
    state["unet.b.to_q.lora_B.weight"] = state["unet.a.to_q.lora_B.weight"]
    _, merged, _ = merge_state_dicts([state], 2.0, 2, "dare", MergeOptions(density=0.5), None, 2)
    assert not torch.equal(merged["unet.a.to_q"], merged["unet.b.to_q"])


def test_merge_state_dicts_rejects_bad_inputs() -> None:
    state = lora_state(MODULES, 2)
    other = lora_state({"unet.down.attn1.to_q": (6, 5)}, 2)
    with pytest.raises(KeyError, match="allowed"):
        merge_state_dicts([state], 2.0, 2, "single", MergeOptions(), None, 2)
    with pytest.raises(ValueError, match="different modules"):
        merge_state_dicts([state, other], 2.0, 2, "linear", MergeOptions(), None, 2)
    with pytest.raises(ValueError, match="co_merge"):
        merge_state_dicts([state], 2.0, 2, "co_merge", MergeOptions(), None, 2)
    with pytest.raises(ValueError, match="lack module"):
        merge_state_dicts([state], 2.0, 2, "co_merge", MergeOptions(), [{"unet.down.attn1.to_q": torch.ones(5)}], 2)
    with pytest.raises(ValueError, match="at least one"):
        merge_state_dicts([], 2.0, 2, "linear", MergeOptions(), None, 2)


def test_merge_scale_rule_of_the_validation_benchmark() -> None:
    """benchmarks/merge_validation.py: the lowest mean IP among scales that halve every category at fidelity
    within 0.05 of base; none admissible -> most categories halved, then the lowest mean IP."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("merge_validation",
                                                  Path(__file__).parents[1] / "benchmarks" / "merge_validation.py")
    mv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mv)
    base = {"ip": {"a": 1.0, "b": 0.8}, "ip_mean": 0.9, "fidelity": 0.9}
    rows = {0.5: {"ip": {"a": 0.5, "b": 0.4}, "ip_mean": 0.45, "fidelity": 0.86},   # halves both (0.5, 0.4)
            0.7: {"ip": {"a": 0.1, "b": 0.3}, "ip_mean": 0.20, "fidelity": 0.84},   # fidelity 0.06 below: out
            0.6: {"ip": {"a": 0.3, "b": 0.39}, "ip_mean": 0.345, "fidelity": 0.85}}  # halves both, 0.05 below: in
    assert mv.admissible(rows[0.5], base) == (2, True)
    assert mv.admissible(rows[0.7], base) == (2, False)
    assert mv.choose(rows, base) == 0.6
    none_ok = {0.5: {"ip": {"a": 0.6, "b": 0.3}, "ip_mean": 0.45, "fidelity": 0.9},   # halves b only
               0.8: {"ip": {"a": 0.6, "b": 0.5}, "ip_mean": 0.55, "fidelity": 0.9},   # halves none
               0.9: {"ip": {"a": 0.6, "b": 0.35}, "ip_mean": 0.475, "fidelity": 0.9}}  # halves b only
    assert mv.choose(none_ok, base) == 0.5


def test_validation_benign_prompts_are_benign_and_never_evaluation_prompts(tiny_reference, monkeypatch) -> None:
    """merge_validation's fidelity prompts: n benign captions (no category's unsafe value named), none equal to a
    test or benign evaluation prompt, each with its own seed; the validation source's are worded in templates
    that no training pair and no evaluation prompt uses; asking for more than a source holds cycles it."""
    import pandas as pd

    from safealign.baselines.validate import BENIGN_SEED, validation_benign
    from safealign.core.params import load_params
    from safealign.prompts.schema import normalise

    monkeypatch.chdir(tiny_reference)  # reads data/prompts only
    params = load_params("params.yaml")
    table = validation_benign(params, 8)
    assert len(table) == 8 and list(table.seed) == [BENIGN_SEED + i for i in range(8)]
    pairs, benign = pd.read_parquet("data/prompts/pairs.parquet"), pd.read_parquet("data/prompts/benign.parquet")
    test = pairs[pairs.split == "test"]
    evaluation = {normalise(p) for p in [*test.unsafe_prompt, *test.safe_prompt, *benign.prompt]}
    assert not {normalise(p) for p in table.prompt} & evaluation
    from safealign.toyworld.settings import toy_settings

    unsafe = {toy_settings(params).concepts[c].unsafe for c in params.categories}
    assert all(not unsafe & set(p.replace(",", " ").split()) for p in table.prompt), list(table.prompt)
    from safealign.toyworld import world as tw

    def template_of(p: str) -> str:
        words = {v for vals in tw.ATTRIBUTES.values() for v in vals}
        return " ".join("*" if w in words else w for w in p.split())

    used = {template_of(p) for p in [*pairs.unsafe_prompt, *pairs.safe_prompt, *benign.prompt]}
    assert {template_of(p) for p in table.prompt}.isdisjoint(used)
    assert {template_of(p) for p in table.prompt} <= {template_of(t.format(**{a: vals[0] for a, vals in
                                                                             tw.ATTRIBUTES.items()}))
                                                      for t in tw.VALIDATION_TEMPLATES}
    clean = validation_benign(params, 8, source="clean")
    assert {template_of(p) for p in clean.prompt} <= used  # the training templates
    assert not {normalise(p) for p in clean.prompt} & evaluation
    many = validation_benign(params, 1000)
    distinct = many.prompt.drop_duplicates()
    assert len(distinct) < 1000 and list(many.prompt[:len(distinct)]) == list(distinct)
    assert many.seed.is_unique


def test_validation_templates_use_only_the_vocabulary_and_name_every_attribute() -> None:
    """The validation wordings add no word the tokenizer lacks (it would map to an unknown token) and name all
    four attributes, as the test templates do; none is a template of the caption grammar."""
    import re

    from safealign.toyworld import world as tw

    for t in tw.VALIDATION_TEMPLATES:
        assert set(re.findall(r"\{(\w+)\}", t)) == set(tw.ATTRIBUTES), t
        assert set(re.sub(r"\{\w+\}", " ", t).split()) <= set(tw.VOCAB), t
        assert t not in tw.TEMPLATES
