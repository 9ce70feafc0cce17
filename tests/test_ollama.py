"""Ollama, through the clients people use: langchain-ollama's ChatOllama (Ollama's native ``/api/chat``
and its ``logprobs``) under ChatModelBackend, and OpenAIBackend on Ollama's OpenAI-compatible ``/v1``,
both against the test server's "ollama" profile (backed by the shipped model)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from openai_server import OpenAITestServer
from PIL import Image, ImageDraw

from df_agent import DualFocus
from df_agent.backends.base import Abilities, Conversation, Request
from df_agent.backends.hf import HFBackend
from df_agent.backends.openai import OpenAIBackend
from df_agent.prompt_sets import load_prompts
from df_agent.results import result_differences

langchain_ollama = pytest.importorskip("langchain_ollama")
from df_agent.backends.chat_model import ChatModelBackend  # noqa: E402

TAG = "df-test:latest"  # an Ollama model tag
LOCATE_PREFIX = load_prompts("dualfocus").locate.split("{question}")[0]
QUESTIONS = ["What colour is the square?", "What number is on the red circle?", "How many shapes are there?"]


@pytest.fixture(scope="module")
def running(served: HFBackend) -> Iterator[OpenAITestServer]:
    with OpenAITestServer(served, TAG, profile="ollama") as server:
        yield server


@pytest.fixture
def server(running: OpenAITestServer) -> OpenAITestServer:
    running.reset()
    return running


@pytest.fixture
def second_scene() -> Image.Image:
    image = Image.new("RGB", (240, 300), (250, 250, 240))
    ImageDraw.Draw(image).ellipse((140, 200, 190, 250), fill=(220, 40, 40))
    ImageDraw.Draw(image).rectangle((20, 20, 70, 70), fill=(30, 60, 200))
    return image


def chat_ollama(server: OpenAITestServer, **kwargs: object):
    return langchain_ollama.ChatOllama(model=TAG, base_url=server.root, temperature=0, **kwargs)


def test_chat_ollama_replies_carry_ollamas_logprobs_and_keep_the_models_options(
    server: OpenAITestServer, served: HFBackend, scene: Image.Image
) -> None:
    backend = ChatModelBackend(chat_ollama(server, logprobs=True))
    assert backend.model_id == TAG and backend.abilities == Abilities(generation_logprobs=True)
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
    bodies = [r.body for r in server.records if r.path == "/api/chat"]
    assert len(bodies) == 2
    for body in bodies:  # the budget reaches Ollama's options, and the model's own options stay
        assert body["options"] == {"num_predict": 32, "temperature": 0}
        assert body["logprobs"] is True and len(body["messages"][0]["images"]) == 1
    for request, generation in zip(requests, generations, strict=True):
        assert generation.text == served.generate(request.conversation, request.max_new_tokens)
        own = served.score(request.conversation, [generation.text])[0]
        assert generation.mean_nll == pytest.approx(own, abs=1e-4)  # the own-context vote's number


def test_dualfocus_over_chat_ollama_equals_openai_backend_on_ollamas_v1_endpoint(
    server: OpenAITestServer, scene: Image.Image, second_scene: Image.Image
) -> None:
    native = DualFocus(ChatModelBackend(chat_ollama(server, logprobs=True)), max_new_tokens=16)
    with OpenAIBackend(server.url, TAG) as client:  # what the server offers is detected: hosted-like
        compatible = DualFocus(client, max_new_tokens=16)
        votes = set()
        for image in (scene, second_scene):
            for question in QUESTIONS:
                one, other = native.ask(image, question), compatible.ask(image, question)
                assert result_differences(one, other) == []
                votes.add(one.vote)
        assert client.capabilities == "hosted"
    assert votes <= {None, "generation_logprobs"}
    assert server.count("/api/chat") > 0 and server.count("/v1/chat/completions") > 0


def test_chat_ollama_without_logprobs_gets_the_declared_policy(
    server: OpenAITestServer, second_scene: Image.Image
) -> None:
    backend = ChatModelBackend(chat_ollama(server))
    assert backend.abilities == Abilities()
    result = DualFocus(backend, max_new_tokens=16).ask(second_scene, "What colour is the circle?")
    assert all("logprobs" not in r.body or r.body["logprobs"] is None for r in server.records)
    if result.macro_answer != result.micro_answer:
        assert result.vote == "micro_policy" and result.answer == result.micro_answer
    assert result.scores is None


def test_ollama_native_api_answers_as_ollama_does(
    server: OpenAITestServer, scene: Image.Image, tmp_path: Path
) -> None:
    import ollama

    client = ollama.Client(host=server.root)
    assert [m.model for m in client.list().models] == [TAG]
    scene.save(tmp_path / "scene.png")
    messages = [
        {"role": "user", "content": "What colour is the square?", "images": [str(tmp_path / "scene.png")]}
    ]
    reply = client.chat(TAG, messages, options={"num_predict": 8}, logprobs=True)
    assert reply.done and reply.done_reason in ("stop", "length") and reply.message.content
    assert reply.logprobs and all(entry.logprob <= 0 for entry in reply.logprobs)
    assert reply.eval_count == len(reply.logprobs) <= 8
    streamed = list(client.chat(TAG, messages, options={"num_predict": 8}, stream=True))
    assert "".join(part.message.content for part in streamed) == reply.message.content
    assert streamed[-1].done and all(part.logprobs is None for part in streamed)
    with pytest.raises(ollama.ResponseError, match="not found") as error:
        client.chat("llava:missing", [{"role": "user", "content": "hi"}])
    assert error.value.status_code == 404
