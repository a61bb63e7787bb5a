"""The CoProV2 recipe (METHOD.md section 1) as prompt backends ``local``, ``openai`` and ``vllm``.

Per category and harmful concept (data/taxonomy.yaml) the LLM writes N unsafe prompts; per unsafe prompt it
writes a safe twin that changes as little as possible. Candidates pass filters, and every rejected candidate
is counted by reason in ``stats["rejected"]`` (the stage writes it to metrics/prompts.json):
- reply level: ``llm_error`` (no reply after retries), ``empty_reply``, ``refusal``, ``unparseable``;
- ``too_short``/``too_long`` (words), ``duplicate`` (same normalised text), ``near_duplicate`` (sentence
  embedding cosine >= ``near_duplicate``), ``off_concept`` (an unsafe prompt that is not about its concept);
- twins: ``unchanged``, ``concept_word`` (a keyword of the concept is still there: lexical check),
  ``other_harm_word`` (a keyword of any other concept of the taxonomy),
  ``near_concept`` (embedding similarity to the concept above ``twin_concept_max``, or not lower than the unsafe
  prompt's by ``concept_drop_min``), ``pair_too_far`` (twin-to-unsafe similarity below ``pair_similarity_min``);
- test prompts: ``cross_split_duplicate`` (exact or near duplicate of a training prompt);
- ``surplus``: a good candidate not needed (its category was already full).
Reasons are prefixed by what was rejected: ``unsafe_``, ``twin_``, ``pair_``, ``benign_``.
Splits are by concept: a category's test concepts are never used in training. Benign prompts are plain
scenes that carry no concept keyword and are not close to any concept.

Every LLM reply is journaled (``.cache/prompts/<model>.jsonl``), so a killed stage resumes without asking
again and, given the same replies, writes the same tables.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import yaml
from pydantic import Field, ValidationError

from safealign.core.categories import CATEGORY_TITLES
from safealign.core.errors import ParamsError, validation_lines
from safealign.core.ids import benign_ids, benign_seeds, pair_ids, pair_seeds
from safealign.prompts.filters import (
    Encoder,
    carries_concept,
    content_words,
    is_refusal,
    keyword_stems,
    parse_list,
    parse_single,
)
from safealign.prompts.llm import LLM, LLM_BACKENDS, ChatRequest, Journal, LLMOptions, generate_journaled
from safealign.prompts.requests import benign_request, twin_request, unsafe_request
from safealign.prompts.schema import PAIR_COLUMNS, PromptSets, normalise

if TYPE_CHECKING:
    from safealign.core.params import Params


class RecipeOptions(LLMOptions):
    """``prompts.options`` for the LLM backends: the backend's settings plus the recipe's."""

    taxonomy: str = Field("data/taxonomy.yaml", description="categories -> concepts (with keywords), benign topics")
    journal_dir: str = Field(".cache/prompts", description="where LLM replies are journaled")
    unsafe_per_request: int = Field(4, ge=1, description="N: unsafe prompts asked per concept and request")
    benign_per_request: int = Field(4, ge=1)
    test_concept_share: float = Field(0.25, gt=0, lt=1, description="share of each category's concepts held out")
    max_rounds: int = Field(4, ge=1, description="rounds of requests to fill the counts")
    oversample: float = Field(2.0, ge=1, description="candidates asked per missing pair in a round")
    twin_attempts: int = Field(1, ge=1, description="asks for a safe twin per unsafe prompt before giving it up")
    few_shot: bool = Field(True, description="show one worked example (harmless) in each request")
    min_words: int = Field(5, ge=1)
    max_words: int = Field(50, ge=2, description="CLIP reads 77 tokens: keep prompts short")
    unsafe_concept_min: float = Field(0.25, ge=-1, le=1,
                                      description="an unsafe prompt is this close to its concept (or names a keyword)")
    twin_concept_max: float = Field(0.4, ge=-1, le=1, description="a twin must be at most this close to the concept")
    concept_drop_min: float = Field(0.05, ge=0, le=2, description="... and less close than its unsafe prompt by this")
    pair_similarity_min: float = Field(0.55, ge=-1, le=1, description="a twin stays this close to its unsafe prompt")
    near_duplicate: float = Field(0.92, gt=0, le=1, description="cosine from which two prompts are near duplicates")


def load_options(raw: dict[str, Any], source: str = "params.yaml") -> RecipeOptions:
    try:
        opts = RecipeOptions.model_validate(raw)
    except ValidationError as e:
        raise ParamsError("\n".join(validation_lines(e.errors(), source, prefix="prompts.options."))) from None
    if opts.min_words > opts.max_words:
        raise ParamsError(f"{source}: prompts.options.min_words: {opts.min_words} exceeds max_words {opts.max_words}")
    return opts


# ------------------------------------------------------------------------------------------------ taxonomy
@dataclasses.dataclass(frozen=True)
class Concept:
    category: str
    name: str
    keywords: tuple[str, ...]  # the words that carry the harm (the phrase's content words if none are listed)
    stems: frozenset[str]


@dataclasses.dataclass(frozen=True)
class Taxonomy:
    concepts: dict[str, list[Concept]]
    definitions: dict[str, str]
    benign_topics: list[str]


def load_taxonomy(path: str | Path, categories: Sequence[str]) -> Taxonomy:
    """Read the taxonomy; errors name the file and the key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ParamsError(f"prompts.options.taxonomy: {path} not found") from None
    cats = raw.get("categories") or {}
    concepts, definitions = {}, {}
    for cat in categories:
        if cat not in cats:
            raise ValueError(f"{path}: categories.{cat}: missing")
        entries = cats[cat].get("concepts") or []
        parsed = []
        for i, e in enumerate(entries):
            name, kws = (next(iter(e.items())) if isinstance(e, dict) else (e, []))
            if not isinstance(name, str) or not name.strip() or not isinstance(kws, list):
                raise ValueError(f"{path}: categories.{cat}.concepts[{i}]: expected 'phrase' or 'phrase: [keywords]'")
            words = tuple(str(k) for k in kws) or tuple(content_words(name))
            parsed.append(Concept(cat, name.strip(), words, keyword_stems(name, kws)))
        if len(parsed) < 2:
            raise ValueError(f"{path}: categories.{cat}.concepts: need at least 2 (train and test concepts)")
        if len({c.name for c in parsed}) != len(parsed):
            raise ValueError(f"{path}: categories.{cat}.concepts: a concept is listed twice")
        concepts[cat] = parsed
        definitions[cat] = str(cats[cat].get("definition", ""))
    topics = [str(t) for t in raw.get("benign_topics") or []]
    if not topics:
        raise ValueError(f"{path}: benign_topics: missing or empty")
    return Taxonomy(concepts, definitions, topics)


def split_concepts(concepts: list[Concept], share: float, seed: int) -> tuple[list[Concept], list[Concept]]:
    """(train, test) concepts: a seeded shuffle, ``share`` of them (at least one, at most all but one) to test."""
    order = np.random.default_rng(seed).permutation(len(concepts))
    n_test = min(max(1, round(share * len(concepts))), len(concepts) - 1)
    return [concepts[i] for i in order[n_test:]], [concepts[i] for i in order[:n_test]]


# ------------------------------------------------------------------------------------------------- recipe
@dataclasses.dataclass
class Pair:
    concept: Concept
    unsafe: str
    safe: str


class Bank:
    """Unit embeddings of accepted texts, grown in place, for near-duplicate look-ups."""

    def __init__(self) -> None:
        self._m: np.ndarray | None = None  # (capacity, dim)
        self.n = 0
        self.keys: set[str] = set()

    def add(self, key: str, vec: np.ndarray) -> None:
        if self._m is None:
            self._m = np.zeros((64, len(vec)), np.float32)
        elif self.n == len(self._m):
            self._m = np.concatenate([self._m, np.zeros_like(self._m)])
        self._m[self.n] = vec
        self.n += 1
        self.keys.add(key)

    def max_sim(self, vec: np.ndarray) -> float:
        return float((self._m[:self.n] @ vec).max()) if self._m is not None and self.n else -1.0


class Recipe:
    """State of one run: the LLM, the journal, the encoder, what has been accepted and what was rejected."""

    def __init__(self, llm: LLM, opts: RecipeOptions, taxonomy: Taxonomy, encoder: Encoder, seed: int) -> None:
        self.llm, self.opts, self.tax, self.enc, self.seed = llm, opts, taxonomy, encoder, seed
        safe_name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in llm.model) or "model"
        self.journal = Journal(Path(opts.journal_dir) / f"{safe_name}.jsonl")
        self.rejected: Counter[str] = Counter()
        self.requests = self.journal_hits = 0
        self.all_stems = frozenset().union(*(c.stems for cs in taxonomy.concepts.values() for c in cs))
        self.accepted = Bank()  # every accepted prompt: duplicate and near-duplicate checks
        self.train = Bank()  # accepted training prompts (unsafe and safe): the cross-split check

    def ask(self, requests: list[ChatRequest]) -> list[str | None]:
        replies, hits = generate_journaled(self.llm, requests, self.journal)
        self.requests += len(requests)
        self.journal_hits += hits
        return replies

    def reject(self, kind: str, reason: str, n: int = 1) -> None:
        self.rejected[f"{kind}_{reason}"] += n

    def items(self, kind: str, reply: str | None, limit: int) -> list[str]:
        """Parsed, length-checked items of one reply; reply-level failures are counted once."""
        if reply is None:
            self.reject(kind, "llm_error")
            return []
        if not reply.strip():
            self.reject(kind, "empty_reply")
            return []
        if is_refusal(reply):
            self.reject(kind, "refusal")
            return []
        items = ([t] if (t := parse_single(reply)) else []) if limit == 1 else parse_list(reply)[:limit]
        if not items:
            self.reject(kind, "unparseable")
        return [t for t in items if self.length_ok(kind, t)]

    def length_ok(self, kind: str, text: str) -> bool:
        n = len(text.split())
        if n < self.opts.min_words:
            self.reject(kind, "too_short")
        elif n > self.opts.max_words:
            self.reject(kind, "too_long")
        return self.opts.min_words <= n <= self.opts.max_words

    def novel(self, kind: str, text: str, pending: Bank, cross_split: bool) -> bool:
        """Not a duplicate of anything accepted or pending this round; for test, not close to training."""
        key, vec = normalise(text), self.enc([text])[0]
        if cross_split and (key in self.train.keys or self.train.max_sim(vec) >= self.opts.near_duplicate):
            self.reject(kind, "cross_split_duplicate")
            return False
        if key in self.accepted.keys or key in pending.keys:
            self.reject(kind, "duplicate")
            return False
        if max(self.accepted.max_sim(vec), pending.max_sim(vec)) >= self.opts.near_duplicate:
            self.reject(kind, "near_duplicate")
            return False
        pending.add(key, vec)
        return True

    def accept(self, *texts: str, train: bool = False) -> None:
        for t in texts:
            key, vec = normalise(t), self.enc([t])[0]
            self.accepted.add(key, vec)
            if train:
                self.train.add(key, vec)

    # -------------------------------------------------------------------------------------------- pairs
    def fill(self, split: str, concepts: dict[str, list[Concept]], target: int) -> dict[str, list[Pair]]:
        """Pairs for ``split``: rounds of requests until every category has ``target`` pairs or rounds run out."""
        accepted: dict[str, list[Pair]] = {cat: [] for cat in concepts}
        cursor = {cat: 0 for cat in concepts}
        n = self.opts.unsafe_per_request
        for _ in range(self.opts.max_rounds):
            deficit = {cat: target - len(p) for cat, p in accepted.items() if len(p) < target}
            if not deficit:
                break
            jobs: list[tuple[Concept, ChatRequest]] = []
            for cat, d in deficit.items():
                for _ in range(max(1, math.ceil(self.opts.oversample * d / n))):
                    i = cursor[cat]
                    cursor[cat] += 1
                    c = concepts[cat][i % len(concepts[cat])]
                    jobs.append((c, unsafe_request(CATEGORY_TITLES[cat], self.tax.definitions[cat], c.name, n,
                                                   i // len(concepts[cat]), self.opts, self.opts.few_shot,
                                                   self.seed)))
            candidates: list[tuple[Concept, str]] = []
            pending = Bank()
            for (c, _), reply in zip(jobs, self.ask([r for _, r in jobs])):
                for text in self.items("unsafe", reply, 2 * n):
                    if not self.novel("unsafe", text, pending, cross_split=split == "test"):
                        continue
                    if (not carries_concept(text, c.stems) and
                            float(self.enc.similarity([text], [c.name])[0, 0]) < self.opts.unsafe_concept_min):
                        self.reject("unsafe", "off_concept")
                    elif (sum(k.category == c.category for k, _ in candidates)
                          >= math.ceil(self.opts.oversample * deficit[c.category])):
                        self.reject("unsafe", "surplus")  # enough candidates for this category this round
                    else:
                        candidates.append((c, text))
            self.twins(candidates, accepted, target, train=split == "train")
        return accepted

    def twins(self, candidates: list[tuple[Concept, str]], accepted: dict[str, list[Pair]], target: int,
              train: bool) -> None:
        """Ask safe twins for the candidates (up to ``twin_attempts`` times each) and accept the pairs that pass."""
        todo = candidates
        for attempt in range(self.opts.twin_attempts):
            todo = [(c, u) for c, u in todo if len(accepted[c.category]) < target]
            if not todo:
                return
            replies = self.ask([twin_request(c.name, c.keywords, u, attempt, self.opts, self.opts.few_shot,
                                             self.seed) for c, u in todo])
            retry = []
            for (c, unsafe), reply in zip(todo, replies):
                items = self.items("twin", reply, 1)
                if not items or not self.twin_ok(c, unsafe, items[0]):
                    retry.append((c, unsafe))
                elif len(accepted[c.category]) >= target:
                    self.reject("pair", "surplus")
                else:
                    accepted[c.category].append(Pair(c, unsafe, items[0]))
                    self.accept(unsafe, items[0], train=train)
            todo = retry

    def twin_ok(self, c: Concept, unsafe: str, safe: str) -> bool:
        if normalise(safe) == normalise(unsafe):
            self.reject("twin", "unchanged")
            return False
        if carries_concept(safe, c.stems):
            self.reject("twin", "concept_word")
            return False
        if carries_concept(safe, self.all_stems):
            self.reject("twin", "other_harm_word")  # a keyword of another concept: the twin is not safe either
            return False
        sim_c = self.enc.similarity([unsafe, safe], [c.name])[:, 0]  # (2,): unsafe, twin vs the concept
        if sim_c[1] > self.opts.twin_concept_max or sim_c[1] > sim_c[0] - self.opts.concept_drop_min:
            self.reject("twin", "near_concept")
            return False
        if float(self.enc.similarity([unsafe], [safe])[0, 0]) < self.opts.pair_similarity_min:
            self.reject("twin", "pair_too_far")
            return False
        return True

    # ------------------------------------------------------------------------------------------- benign
    def benign(self, target: int) -> list[str]:
        names = [c.name for cs in self.tax.concepts.values() for c in cs]
        out: list[str] = []
        cursor = 0
        topics = self.tax.benign_topics
        n = self.opts.benign_per_request
        for _ in range(self.opts.max_rounds):
            if len(out) >= target:
                break
            reqs = []
            for _ in range(max(1, math.ceil(1.5 * (target - len(out)) / n))):
                reqs.append(benign_request(topics[cursor % len(topics)], n, cursor // len(topics), self.opts,
                                           self.opts.few_shot, self.seed))
                cursor += 1
            for reply in self.ask(reqs):
                for text in self.items("benign", reply, 2 * n):
                    if len(out) >= target:
                        self.reject("benign", "surplus")
                    elif not self.novel("benign", text, Bank(), cross_split=False):
                        continue
                    elif carries_concept(text, self.all_stems):
                        self.reject("benign", "concept_word")
                    elif float(self.enc.similarity([text], names).max()) > self.opts.twin_concept_max:
                        self.reject("benign", "near_concept")
                    else:
                        out.append(text)
                        self.accept(text)
        return out


def run_recipe(params: Params, llm: LLM, opts: RecipeOptions, tax: Taxonomy, encoder: Encoder) -> PromptSets:
    """The whole recipe with a given LLM: train pairs, then test pairs (unseen concepts), then benign prompts."""
    t0 = time.time()
    train_c, test_c = {}, {}
    for i, cat in enumerate(params.categories):
        train_c[cat], test_c[cat] = split_concepts(tax.concepts[cat], opts.test_concept_share, params.seed * 7919 + i)
    recipe = Recipe(llm, opts, tax, encoder, params.seed)
    train = recipe.fill("train", train_c, params.prompts.train_per_category)
    test = recipe.fill("test", test_c, params.prompts.test_per_category)
    benign = recipe.benign(params.prompts.benign)
    rows = [dict(categories=[cat], concept=p.concept.name, unsafe_prompt=p.unsafe, safe_prompt=p.safe, split=split)
            for split, sets in (("train", train), ("test", test)) for cat in params.categories for p in sets[cat]]
    empty = [f"{split}/{cat}" for split, sets in (("train", train), ("test", test))
             for cat in params.categories if not sets[cat]]
    if empty:
        raise RuntimeError(f"prompts backend: no pair survived for {', '.join(empty)} after "
                           f"{opts.max_rounds} round(s); rejected: {dict(recipe.rejected)}. The replies so far are "
                           f"kept in {recipe.journal.path}; raise prompts.options.max_rounds or check the model.")
    pairs = pd.DataFrame(rows, columns=[c for c in PAIR_COLUMNS if c not in ("pair_id", "seed")])
    pairs.insert(0, "pair_id", pair_ids(len(pairs)))
    pairs["seed"] = pair_seeds(params.seed, len(pairs))
    benign_df = pd.DataFrame({"prompt_id": benign_ids(len(benign)), "prompt": benign,
                              "seed": benign_seeds(params.seed, len(benign))})
    targets = {"train": params.prompts.train_per_category, "test": params.prompts.test_per_category}
    shortfall = {f"{split}/{cat}": targets[split] - len(sets[cat])
                 for split, sets in (("train", train), ("test", test)) for cat in params.categories}
    stats = {
        "backend": params.prompts.backend, "model": llm.model,
        "pairs": {s: int((pairs.split == s).sum()) for s in ("train", "test")},
        "per_category": {cat: {"train": len(train[cat]), "test": len(test[cat])} for cat in params.categories},
        "concepts": {"train": sum(map(len, train_c.values())), "test": sum(map(len, test_c.values()))},
        "multi_label_pairs": 0, "benign": len(benign_df),
        "shortfall": {k: v for k, v in shortfall.items() if v > 0},
        "rejected": dict(sorted(recipe.rejected.items())), "llm_requests": recipe.requests,
    }
    print(f"prompts: {recipe.requests} LLM requests ({recipe.journal_hits} from the journal "
          f"{recipe.journal.path}), {sum(recipe.rejected.values())} candidates rejected, {time.time() - t0:.0f}s")
    return PromptSets(pairs=pairs, benign=benign_df, stats=stats)


def _backend(name: str) -> Callable[[Params], PromptSets]:
    def backend(params: Params) -> PromptSets:
        from safealign.core.runtime import setup_runtime

        opts = load_options(params.prompts.options)
        tax = load_taxonomy(opts.taxonomy, params.categories)  # fail on a bad file before loading any model
        setup_runtime(params)
        encoder = Encoder()
        return run_recipe(params, LLM_BACKENDS.get(name)(opts), opts, tax, encoder)

    backend.__name__ = f"{name}_backend"
    backend.__doc__ = f"The CoProV2 recipe with the {name!r} LLM backend (safealign.prompts.llm)."
    return backend


# The prompt backends named in safealign.prompts.backends: the recipe with each LLM backend.
local_backend = _backend("local")
openai_backend = _backend("openai")
vllm_backend = _backend("vllm")
