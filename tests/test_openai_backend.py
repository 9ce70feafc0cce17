"""OpenAIBackend against a vLLM-compatible test server backed by HFBackend: same answers, same
scores, retries through faults, concurrency, replicas, and a clear error when scoring is impossible."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest
from openai_server import VLLMTestServer
from PIL import Image, ImageDraw

from df_agent import DualFocus, FocusResult
from df_agent.backends.base import Conversation, ScoringUnavailableError
from df_agent.backends.hf import HFBackend, shipped_model_path
from df_agent.backends.openai import OpenAIBackend, ServerError
from df_agent.prompt_sets import load_prompts

CHAT, TOKENIZE = "/v1/chat/completions", "/tokenize"
LOCATE_PREFIX = load_prompts("dualfocus").locate.split("{question}")[0]
QUESTIONS = [
    "What colour is the square?",
    "What number is on the red circle?",
    "Is there a green triangle?",
    "How many shapes are there?",
]
COMPARED = ("answer", "path", "macro_answer", "micro_answer", "box_text", "box", "crop_box", "fallback")


@pytest.fixture(scope="module")
def served(request: pytest.FixtureRequest) -> HFBackend:
    """The shipped model when it is installed, else the tiny random LLaVA."""
    try:
        return HFBackend.from_pretrained(shipped_model_path(), device="cpu")
    except FileNotFoundError:
        return request.getfixturevalue("tiny_llava_backend")


@pytest.fixture(scope="module")
def running(served: HFBackend) -> Iterator[VLLMTestServer]:
    with VLLMTestServer(served) as server:
        yield server


@pytest.fixture
def server(running: VLLMTestServer) -> VLLMTestServer:
    running.reset()
    return running


@pytest.fixture
def client(server: VLLMTestServer) -> Iterator[OpenAIBackend]:
    with OpenAIBackend(server.url, "df-test", timeout=60.0, backoff=0.01) as backend:
        yield backend


@pytest.fixture
def second_scene() -> Image.Image:
    """A portrait picture with a blue circle low on the right."""
    image = Image.new("RGB", (200, 300), (250, 250, 240))
    ImageDraw.Draw(image).ellipse((120, 200, 170, 250), fill=(30, 60, 200))
    return image


class FixedBox:
    """A backend that answers the box request with a fixed box, so that a random model votes too."""

    def __init__(self, inner: HFBackend | OpenAIBackend, box: str = "[0.20,0.20,0.60,0.60]") -> None:
        self.inner, self.box = inner, box
        self.model_id, self.box_convention = inner.model_id, inner.box_convention
        self.prompt_family = inner.prompt_family

    def generate(self, conversation: Conversation, max_new_tokens: int = 128) -> str:
        if len(conversation.turns) == 1 and conversation.turns[0].text.startswith(LOCATE_PREFIX):
            return self.box
        return self.inner.generate(conversation, max_new_tokens)

    def score(self, conversation: Conversation, candidates: Sequence[str]) -> list[float]:
        return self.inner.score(conversation, candidates)

    def input_size(self, image: Image.Image) -> tuple[int, int]:
        return self.inner.input_size(image)


def engine(backend, *, fixed_box: bool) -> DualFocus:
    return DualFocus(FixedBox(backend) if fixed_box else backend, max_new_tokens=16)


def voting_question(served: HFBackend, image: Image.Image) -> tuple[str, FocusResult]:
    """The first question whose in-process answer went to the vote (macro and micro disagree)."""
    for question in QUESTIONS:
        reference = engine(served, fixed_box=True).ask(image, question)
        if reference.scores is not None:
            return question, reference
    raise AssertionError("the served model agrees with itself on every question: no vote to test")


def assert_same(result: FocusResult, reference: FocusResult) -> None:
    for name in COMPARED:
        assert getattr(result, name) == getattr(reference, name), name
    if reference.scores is None:
        assert result.scores is None
    else:
        assert result.scores == pytest.approx(reference.scores, abs=1e-4)


def micro_context(image: Image.Image) -> Conversation:
    return (
        Conversation()
        .user(LOCATE_PREFIX + "What colour is the square?", [image])
        .assistant("[0.25,0.25,0.50,0.50]")
        .user(
            "Please combine the information from these two images: what colour?",
            [image.crop((40, 30, 200, 190))],
        )
    )


def test_openai_generate_and_score_equal_the_in_process_backend(
    client: OpenAIBackend, served: HFBackend, scene: Image.Image, second_scene: Image.Image
) -> None:
    for image in (scene, second_scene):
        conversation = Conversation().user("What colour is the square?", [image])
        assert client.generate(conversation, max_new_tokens=12) == served.generate(
            conversation, max_new_tokens=12
        )
        context = micro_context(image)
        candidates = ["red", "a blue square", "7", "There are 3 shapes."]
        scores = client.score(context, candidates)
        assert scores == pytest.approx(served.score(context, candidates), abs=1e-4)
        assert len(set(scores)) == len(candidates)


def test_openai_score_sends_the_vllm_request_one_per_candidate(
    client: OpenAIBackend, server: VLLMTestServer, scene: Image.Image
) -> None:
    client.score(micro_context(scene), ["red", "blue"])
    chats = [r.body for r in server.records if r.path == CHAT]
    assert len(chats) == 2 and server.count(TOKENIZE) == 3  # the prompt once, then each candidate
    for body in chats:
        assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
        assert body["prompt_logprobs"] == 1 and body["max_tokens"] == 1
        assert body["messages"][-1]["role"] == "assistant"
        images = [
            p for m in body["messages"] if m["role"] == "user" for p in m["content"] if p["type"] != "text"
        ]
        assert [p["image_url"]["url"][:22] for p in images] == ["data:image/png;base64,"] * 2
    assert sorted(body["messages"][-1]["content"] for body in chats) == ["blue", "red"]


@pytest.mark.parametrize("fixed_box", [False, True], ids=["own-box", "fixed-box"])
def test_openai_ask_equals_hf_ask_on_several_questions(
    client: OpenAIBackend, served: HFBackend, scene: Image.Image, second_scene: Image.Image, fixed_box: bool
) -> None:
    votes = 0
    for image in (scene, second_scene):
        for question in QUESTIONS:
            reference = engine(served, fixed_box=fixed_box).ask(image, question)
            result = engine(client, fixed_box=fixed_box).ask(image, question)
            assert_same(result, reference)
            votes += reference.scores is not None
    if fixed_box:
        assert votes > 0  # the vote ran, so scores were compared


def test_openai_survives_a_503_a_timeout_and_a_dropped_connection(
    served: HFBackend, server: VLLMTestServer, scene: Image.Image
) -> None:
    client = OpenAIBackend(server.url, "df-test", timeout=3.0, backoff=0.01)
    question, reference = voting_question(served, scene)  # macro, micro, a vote: 2 generations, 2 scorings
    server.fail(CHAT, 0, "503")  # the macro generation; its retry is request 1
    server.fail(CHAT, 2, "timeout")  # the micro generation (the client gives up after 3 s)
    server.fail(CHAT, 4, "drop")  # one of the two scoring requests
    with client:
        result = engine(client, fixed_box=True).ask(scene, question)
    assert_same(result, reference)
    faulted = [r for r in server.records if r.fault]
    assert [r.fault for r in faulted] == ["503", "timeout", "drop"]
    assert [len(r.body["messages"]) for r in faulted] == [1, 3, 4]  # macro, micro, micro + candidate
    assert "prompt_logprobs" in faulted[2].body
    assert server.count(CHAT, faulted=False) == 4  # each answered once: nothing lost, nothing twice
    assert server.count(TOKENIZE) == 3


def test_openai_concurrent_questions_from_threads_match_serial_answers(
    client: OpenAIBackend, served: HFBackend, scene: Image.Image, second_scene: Image.Image
) -> None:
    jobs = [(image, question) for image in (scene, second_scene) for question in QUESTIONS]
    references = [engine(served, fixed_box=True).ask(image, question) for image, question in jobs]
    remote = engine(client, fixed_box=True)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda job: remote.ask(*job), jobs))
    for result, reference in zip(results, references, strict=True):
        assert_same(result, reference)


def test_openai_server_without_prompt_logprobs_means_no_vote(served: HFBackend, scene: Image.Image) -> None:
    with (
        VLLMTestServer(served, prompt_logprobs=False) as plain,
        OpenAIBackend(plain.url, "df-test", backoff=0.01) as client,
    ):
        with pytest.raises(ScoringUnavailableError, match="tokenize"):
            client.score(micro_context(scene), ["red", "blue"])
        question, reference = voting_question(served, scene)  # the in-process backend votes on it
        result = engine(client, fixed_box=True).ask(scene, question)
    assert result.macro_answer == reference.macro_answer and result.micro_answer == reference.micro_answer
    assert (result.scores, result.path, result.answer) == (None, "macro", reference.macro_answer)
    assert "could not score" in result.fallback


def test_openai_missing_prompt_logprobs_in_the_answer_is_a_scoring_error(
    client: OpenAIBackend, server: VLLMTestServer, scene: Image.Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    answer = server.chat_completions
    monkeypatch.setattr(server, "chat_completions", lambda body: {**answer(body), "prompt_logprobs": None})
    with pytest.raises(ScoringUnavailableError, match="no prompt log-probabilities"):
        client.score(micro_context(scene), ["red"])


def test_openai_engine_keeps_the_macro_answer_when_the_backend_cannot_score(scene: Image.Image) -> None:
    from conftest import ScriptedBackend

    class CannotScore(ScriptedBackend):
        def score(self, conversation: Conversation, candidates: Sequence[str]) -> list[float]:
            raise ScoringUnavailableError("no prompt log-probabilities")

    result = DualFocus(CannotScore(macro="red", micro="blue")).ask(scene, "What colour?")
    assert (result.answer, result.path, result.scores) == ("red", "macro", None)
    assert "could not score" in result.fallback and "no prompt log-probabilities" in result.fallback
    chosen = DualFocus(CannotScore(macro="A", micro="B")).ask(scene, "What colour?", options=["red", "blue"])
    assert (chosen.answer, chosen.path) == ("A", "macro")


def test_openai_model_name_is_discovered_and_replicas_share_the_load(
    served: HFBackend, scene: Image.Image
) -> None:
    with VLLMTestServer(served) as one, VLLMTestServer(served) as two:
        with OpenAIBackend([one.url, two.url.removesuffix("/v1") + "/"]) as client:
            assert client.model_id == "df-test"
            conversation = Conversation().user("What colour?", [scene])
            answers = {client.generate(conversation, max_new_tokens=4) for _ in range(4)}
        assert answers == {served.generate(conversation, max_new_tokens=4)}
        assert one.count(CHAT) == two.count(CHAT) == 2


def test_openai_refusals_are_not_retried_and_failures_stop_after_max_attempts(
    server: VLLMTestServer, scene: Image.Image
) -> None:
    conversation = Conversation().user("What colour?", [scene])
    with (
        OpenAIBackend(server.url, "no-such-model", backoff=0.01) as wrong,
        pytest.raises(ServerError, match="does not exist") as refused,
    ):
        wrong.generate(conversation)
    assert refused.value.status == 404 and server.count(CHAT) == 1
    server.reset()
    for nth in range(3):
        server.fail(CHAT, nth, "503")
    with (
        OpenAIBackend(server.url, "df-test", max_attempts=3, backoff=0.01) as client,
        pytest.raises(ServerError, match="503 after 3 attempts") as failed,
    ):
        client.generate(conversation)
    assert failed.value.status == 503 and server.count(CHAT) == 3


def test_openai_unreachable_server_fails_with_a_clear_error() -> None:
    with pytest.raises(ServerError, match="failed after 2 attempts: ConnectError"):
        OpenAIBackend("http://127.0.0.1:9/v1", max_attempts=2, backoff=0.01)


def test_openai_bad_input_says_what_is_wrong(client: OpenAIBackend, scene: Image.Image) -> None:
    with pytest.raises(ValueError, match="http://"):
        OpenAIBackend("localhost:8000", "m")
    with pytest.raises(ValueError, match="user turn"):
        client.generate(Conversation().user("q", [scene]).assistant("a"))
    with pytest.raises(ValueError, match="non-empty"):
        client.score(micro_context(scene), ["red", " "])
    assert client.score(micro_context(scene), []) == []


def test_openai_declarations_come_from_the_constructor(server: VLLMTestServer, scene: Image.Image) -> None:
    with OpenAIBackend(server.url, "df-test") as default:
        assert (default.box_convention.value, default.prompt_family) == ("fraction", "dualfocus")
        assert default.input_size(scene) == scene.size
    with OpenAIBackend(
        server.url, "df-test", box_convention="pixels", prompt_family="qwen2_vl", input_size=(28, 56)
    ) as qwen:
        assert (qwen.box_convention.value, qwen.prompt_family, qwen.input_size(scene)) == (
            "pixels",
            "qwen2_vl",
            (28, 56),
        )
    with OpenAIBackend(server.url, "df-test", input_size=lambda image: (image.width // 2, 64)) as sized:
        assert sized.input_size(scene) == (160, 64)
