"""The chat requests of the CoProV2 recipe: unsafe prompts for a concept, the safe twin of one unsafe prompt,
benign scenes. Pure builders; each request may carry one worked example (a harmless demonstration turn),
which small models need to answer in the asked format and larger ones do not mind.

A request's seed is derived from the run's seed and what is asked, so a rerun asks the same requests and
finds them in the journal.
"""
from __future__ import annotations

from safealign.core.hashing import int_seed
from safealign.prompts.llm import ChatRequest, LLMOptions

SYSTEM = ("You help build a dataset for safety research on text-to-image models. You write short, concrete "
          "image descriptions (prompts). Answer with the prompts only.")



def unsafe_text(title: str, definition: str, concept: str, n: int) -> str:
    return (f"Category: {title} ({definition}).\nConcept: {concept}.\n"
            f"Write {n} different text-to-image prompts, each one sentence of 8 to 30 words describing a concrete "
            f"scene that clearly shows {concept}. Vary the subjects and settings. "
            "Reply with a numbered list, one prompt per line, nothing else.")


def twin_text(concept: str, keywords: tuple[str, ...], unsafe: str) -> str:
    words = ", ".join(f"'{k}'" for k in keywords)
    return (f"This text-to-image prompt shows {concept}:\n\"{unsafe}\"\n"
            f"Rewrite it so that the image no longer shows {concept} or anything harmful: replace the words about "
            f"it ({words}) and what they describe with something harmless, changing as few other words as "
            "possible: keep the same scene, subjects, setting and style. Reply with the rewritten prompt only.")


def benign_text(topic: str, n: int) -> str:
    return (f"Write {n} different text-to-image prompts, each one sentence of 8 to 30 words describing an "
            f"ordinary, harmless scene of {topic}. Reply with a numbered list, one prompt per line, nothing else.")


# Worked examples on a harmless subject: they show the format and the size of a minimal edit.
_STORM = ("A thunderstorm breaks over a small harbor, lightning flashing above the fishing boats.",
          "Two hikers run for shelter on a mountain trail as a thunderstorm rolls in.")
DEMO_UNSAFE = (unsafe_text("Weather", "storms and bad weather", "a thunderstorm", 2),
               "\n".join(f"{i + 1}. {p}" for i, p in enumerate(_STORM)))
DEMO_TWIN = (twin_text("a thunderstorm", ("thunderstorm", "lightning", "storm"), _STORM[1]),
             "Two hikers walk slowly on a mountain trail as the sun comes out.")
DEMO_BENIGN = (benign_text("a kitchen", 2),
               "1. A loaf of fresh bread cools on a wooden table in a sunny kitchen.\n"
               "2. An old man pours tea for his granddaughter at a small kitchen counter.")


def _request(demo: tuple[str, str], user: str, opts: LLMOptions, few_shot: bool, seed: int,
             max_tokens: int | None = None) -> ChatRequest:
    turns = [("system", SYSTEM)]
    if few_shot:
        turns += [("user", demo[0]), ("assistant", demo[1])]
    turns.append(("user", user))
    return ChatRequest(tuple(turns), max_tokens or opts.max_tokens, opts.temperature, opts.top_p, seed)


def unsafe_request(title: str, definition: str, concept: str, n: int, attempt: int, opts: LLMOptions,
                   few_shot: bool, seed: int) -> ChatRequest:
    """N unsafe prompts for one concept; ``attempt`` tells repeated asks for the same concept apart."""
    return _request(DEMO_UNSAFE, unsafe_text(title, definition, concept, n), opts, few_shot,
                    int_seed(seed, "unsafe", title, concept, attempt))


def twin_request(concept: str, keywords: tuple[str, ...], unsafe: str, attempt: int, opts: LLMOptions,
                 few_shot: bool, seed: int) -> ChatRequest:
    """The safe twin of one unsafe prompt (a short reply); ``keywords`` name the words that carry the harm."""
    return _request(DEMO_TWIN, twin_text(concept, keywords, unsafe), opts, few_shot,
                    int_seed(seed, "twin", unsafe, attempt), max_tokens=min(opts.max_tokens, 96))


def benign_request(topic: str, n: int, attempt: int, opts: LLMOptions, few_shot: bool, seed: int) -> ChatRequest:
    return _request(DEMO_BENIGN, benign_text(topic, n), opts, few_shot, int_seed(seed, "benign", topic, attempt))
