"""ChatModelBackend over langchain-openai's ChatOpenAI pointed at the local test server (backed by the
shipped model): the same replies as in process, token log-probabilities read from response_metadata
when the model returns them, the macro answer and box request sent together, a full ask on each
profile."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from openai_server import OpenAITestServer
from PIL import Image

from df_agent import DualFocus
from df_agent.backends.base import Conversation, Request
from df_agent.backends.hf import HFBackend
from df_agent.prompt_sets import load_prompts

langchain_openai = pytest.importorskip("langchain_openai")
from df_agent.backends.chat_model import ChatModelBackend, token_logprobs  # noqa: E402

LOCATE_PREFIX = load_prompts("dualfocus").locate.split("{question}")[0]


@pytest.fixture(scope="module", params=["vllm", "hosted", "bare"])
def server(request: pytest.FixtureRequest, served: HFBackend) -> Iterator[OpenAITestServer]:
    with OpenAITestServer(served, profile=request.param, api_key="sk-local") as running:
        yield running


def chat(server: OpenAITestServer, **kwargs: object):
    return langchain_openai.ChatOpenAI(
        model="df-test", base_url=server.url, api_key="sk-local", temperature=0, max_retries=0, **kwargs
    )


def test_chat_model_replies_equal_the_in_process_model(
    server: OpenAITestServer, served: HFBackend, scene: Image.Image
) -> None:
    server.reset()
    backend = ChatModelBackend(chat(server, logprobs=True))
    assert (backend.model_id, backend.prompt_family, backend.box_convention.value) == (
        "df-test",
        "dualfocus",
        "fraction",
    )
    assert backend.abilities.generation_logprobs and not backend.abilities.prompt_logprobs
    requests = [
        Request(Conversation().user("What colour is the square?", [scene]), 12),
        Request(Conversation().user(LOCATE_PREFIX + "What colour is the square?", [scene]), 32, "box"),
    ]
    server.delay = 0.2
    try:
        generations = backend.generate_many(requests)
    finally:
        server.delay = 0.0
    assert server.max_in_flight == 2  # batch sent them together
    sent = [r.body for r in server.records]
    assert all(
        part["type"] in ("image_url", "text") for body in sent for part in body["messages"][0]["content"]
    )
    for request, generation in zip(requests, generations, strict=True):
        assert generation.text == served.generate(request.conversation, 32)
        if server.profile == "bare":
            assert generation.token_logprobs is None
        else:
            own = served.score(request.conversation, [generation.text])[0]
            assert generation.mean_nll == pytest.approx(own, abs=1e-4)


def test_chat_model_without_logprobs_declares_none(server: OpenAITestServer, scene: Image.Image) -> None:
    backend = ChatModelBackend(chat(server))
    assert not backend.abilities.generation_logprobs
    [generation] = backend.generate_many([Request(Conversation().user("What colour?", [scene]), 4)])
    assert generation.token_logprobs is None and generation.text


def test_chat_model_ask_runs_the_vote_its_replies_allow(
    server: OpenAITestServer, served: HFBackend, scene: Image.Image
) -> None:
    backend = ChatModelBackend(chat(server, logprobs=True), logprobs=server.profile != "bare")
    result = DualFocus(backend, max_new_tokens=16).ask(scene, "What colour is the square?")
    reference = DualFocus(served, max_new_tokens=16).ask(scene, "What colour is the square?")
    assert (result.macro_answer, result.box_text, result.micro_answer) == (
        reference.macro_answer,
        reference.box_text,
        reference.micro_answer,
    )
    if result.vote is not None:
        expected = "generation_logprobs" if server.profile != "bare" else ("micro_policy", "judge")
        assert result.vote in expected and result.vote_reason


def test_chat_model_reads_ollama_and_openai_logprob_shapes() -> None:
    from langchain_core.messages import AIMessage

    openai_shape = AIMessage(
        "red", response_metadata={"logprobs": {"content": [{"token": "red", "logprob": -0.5}]}}
    )
    ollama_shape = AIMessage(
        "red",
        response_metadata={"logprobs": [{"token": "re", "logprob": -0.25}, {"token": "d", "logprob": -0.75}]},
    )
    assert token_logprobs(openai_shape) == (-0.5,)
    assert token_logprobs(ollama_shape) == (-0.25, -0.75)
    assert token_logprobs(AIMessage("red")) is None
    assert token_logprobs(AIMessage("red", response_metadata={"logprobs": [{"token": "x"}]})) is None


def test_chat_model_presets_by_name_and_bad_input() -> None:
    gemini = ChatModelBackend(langchain_openai.ChatOpenAI(model="gemini-2.5-flash", api_key="x"))
    assert (gemini.prompt_family, gemini.box_convention.value) == ("chat_gemini", "gemini_1000")
    qwen = ChatModelBackend(
        langchain_openai.ChatOpenAI(model="qwen2.5vl:7b", api_key="x"), prompt_family="chat"
    )
    assert (qwen.prompt_family, qwen.box_convention.value) == ("chat", "pixels")
    with pytest.raises(TypeError, match="BaseChatModel"):
        ChatModelBackend("gpt-4o")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="user turn"):
        gemini.generate(Conversation().user("q").assistant("a"))
