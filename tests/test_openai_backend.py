"""OpenAIBackend against the local OpenAI-compatible test server (backed by the shipped model) in its
three profiles: same answers and scores as in process, capabilities detected once, generation
log-probabilities, concurrency, retries, bounded waits on a silent server, and the official `openai`
client against the same server."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest
from openai_server import OpenAITestServer
from PIL import Image, ImageDraw

from df_agent import DualFocus, FocusResult
from df_agent.backends.base import (
    Abilities,
    Backend,
    Conversation,
    Generation,
    Request,
    ScoringUnavailableError,
)
from df_agent.backends.hf import HFBackend
from df_agent.backends.openai import OpenAIBackend, ServerError
from df_agent.prompt_sets import load_prompts
from df_agent.results import result_differences

CHAT, TOKENIZE, MODELS = "/v1/chat/completions", "/tokenize", "/v1/models"
LOCATE_PREFIX = load_prompts("dualfocus").locate.split("{question}")[0]
QUESTIONS = [
    "What colour is the square?",
    "What number is on the red circle?",
    "Is there a green triangle?",
    "How many shapes are there?",
]
COMPARED = ("answer", "path", "macro_answer", "micro_answer", "box_text", "box", "crop_box")


@pytest.fixture(scope="module")
def running(served: HFBackend) -> Iterator[OpenAITestServer]:
    with OpenAITestServer(served) as server:
        yield server


@pytest.fixture
def server(running: OpenAITestServer) -> OpenAITestServer:
    running.reset()
    return running


@pytest.fixture
def client(server: OpenAITestServer) -> Iterator[OpenAIBackend]:
    with OpenAIBackend(server.url, "df-test", api_key="", backoff=0.01) as backend:
        yield backend


@pytest.fixture
def second_scene() -> Image.Image:
    """A portrait picture with a blue circle low on the right."""
    image = Image.new("RGB", (200, 300), (250, 250, 240))
    ImageDraw.Draw(image).ellipse((120, 200, 170, 250), fill=(30, 60, 200))
    return image


class FixedBox(Backend):
    """A backend that answers the box request with a fixed box, so that a random model votes too."""

    def __init__(self, inner: Backend, box: str = "[0.20,0.20,0.60,0.60]") -> None:
        self.inner, self.box = inner, box
        self.model_id, self.box_convention = inner.model_id, inner.box_convention
        self.prompt_family = inner.prompt_family

    @property
    def abilities(self) -> Abilities:
        return Abilities(
            prompt_logprobs=self.inner.abilities.prompt_logprobs,
            generation_logprobs=self.inner.abilities.generation_logprobs,
        )

    @staticmethod
    def _is_locate(conversation: Conversation) -> bool:
        return len(conversation.turns) == 1 and conversation.turns[0].text.startswith(LOCATE_PREFIX)

    def generate(self, conversation: Conversation, max_new_tokens: int = 128) -> str:
        return self.generate_many([Request(conversation, max_new_tokens)])[0].text

    def generate_many(self, requests: Sequence[Request]) -> list[Generation]:
        others = [r for r in requests if not self._is_locate(r.conversation)]
        answers = iter(self.inner.generate_many(others))
        return [Generation(self.box) if self._is_locate(r.conversation) else next(answers) for r in requests]

    def score(self, conversation: Conversation, candidates: Sequence[str]) -> list[float]:
        return self.inner.score(conversation, candidates)

    def input_size(self, image: Image.Image) -> tuple[int, int]:
        return self.inner.input_size(image)


def engine(backend: Backend, *, fixed_box: bool) -> DualFocus:
    return DualFocus(FixedBox(backend) if fixed_box else backend, max_new_tokens=16)


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


# -- the vLLM-like profile: every vote ---------------------------------------------------------


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


def test_openai_score_is_one_round_trip_of_vllm_requests(
    client: OpenAIBackend, server: OpenAITestServer, scene: Image.Image
) -> None:
    assert client.capabilities == "vllm"  # detected before the reset below
    server.reset()
    server.delay = 0.2
    try:
        client.score(micro_context(scene), ["red", "blue"])
    finally:
        server.delay = 0.0
    chats = [r.body for r in server.records if r.path == CHAT]
    assert len(chats) == 2 and server.count(TOKENIZE) == 1  # the prompt once
    assert server.max_in_flight == 3  # the tokenize and both candidates went out together
    for body in chats:
        assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
        assert body["prompt_logprobs"] == 0 and body["max_tokens"] == 1
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


@pytest.mark.parametrize("profile", ["vllm", "hosted"])
def test_a_batching_server_answers_as_one_that_serves_a_request_at_a_time(
    served: HFBackend, scene: Image.Image, second_scene: Image.Image, profile: str
) -> None:
    jobs = [(image, question) for image in (scene, second_scene) for question in QUESTIONS]
    results = {}
    for batching in (False, True):
        with (
            OpenAITestServer(served, profile=profile, batching=batching) as server,
            OpenAIBackend(server.url, "df-test", capabilities=profile) as client,
        ):
            remote = [engine(client, fixed_box=fixed) for fixed in (False, True)]
            with ThreadPoolExecutor(max_workers=4) as pool:  # questions' requests meet in batches
                results[batching] = list(
                    pool.map(lambda job, remote=remote: [e.ask(*job) for e in remote], jobs)
                )
            largest = server.largest_batch
        assert (largest >= 2) if batching else (largest == 0)
    votes = 0
    for plain, batched in zip(results[False], results[True], strict=True):
        for one, other in zip(plain, batched, strict=True):
            assert result_differences(one, other) == []
            votes += one.scores is not None
    assert votes > 0  # scores from both servers were compared


# -- what each profile offers, detected once ---------------------------------------------------


@pytest.mark.parametrize(
    ("profile", "expected", "probes"),
    [("vllm", (True, True), 2), ("hosted", (False, True), 2), ("bare", (False, False), 2)],
)
def test_openai_detects_what_the_server_offers_once(
    served: HFBackend, profile: str, expected: tuple[bool, bool], probes: int
) -> None:
    with (
        OpenAITestServer(served, profile=profile) as server,
        OpenAIBackend(server.url, backoff=0.01) as client,
    ):
        assert server.count(MODELS) == 1 and client.model_id == "df-test"
        assert client.capabilities == profile
        abilities = client.abilities
        assert (abilities.prompt_logprobs, abilities.generation_logprobs) == expected
        assert client.abilities == abilities and client.capabilities == profile
        assert server.count(CHAT) + server.count(TOKENIZE) == probes  # once, text only
        assert all("image_url" not in str(r.body) for r in server.records)


def test_openai_told_capabilities_are_not_probed(server: OpenAITestServer) -> None:
    with OpenAIBackend(server.url, "df-test", capabilities="hosted") as told:
        assert told.abilities == Abilities(prompt_logprobs=False, generation_logprobs=True)
    assert server.records == []
    with pytest.raises(ValueError, match="capabilities"):
        OpenAIBackend(server.url, "df-test", capabilities="everything")  # type: ignore[arg-type]


def test_openai_hosted_generations_carry_their_own_context_log_probabilities(
    served: HFBackend, scene: Image.Image, second_scene: Image.Image
) -> None:
    with (
        OpenAITestServer(served, profile="hosted", delay=0.2) as server,
        OpenAIBackend(server.url, "df-test", capabilities="hosted") as client,
    ):
        requests = [
            Request(Conversation().user("What colour is the square?", [scene]), 12),
            Request(Conversation().user(LOCATE_PREFIX + "the blue circle", [second_scene]), 32, "box"),
        ]
        generations = client.generate_many(requests)
        assert server.max_in_flight == 2  # sent together
        assert [body["stream"] for body in (r.body for r in server.records)] == [True, True]
        assert all(r.body["logprobs"] is True for r in server.records)
        with pytest.raises(ScoringUnavailableError, match="no prompt log-probabilities"):
            client.score(micro_context(scene), ["red"])
    for request, generation in zip(requests, generations, strict=True):
        assert generation.text == served.generate(request.conversation, request.max_new_tokens)
        assert generation.token_logprobs and all(v <= 0 for v in generation.token_logprobs)
        # the own-context vote's number, without a scoring request: the same as teacher forcing
        own = served.score(request.conversation, [generation.text])[0]
        assert generation.mean_nll == pytest.approx(own, abs=1e-4)


def test_openai_bare_server_gives_text_only(served: HFBackend, scene: Image.Image) -> None:
    with (
        OpenAITestServer(served, profile="bare") as server,
        OpenAIBackend(server.url, "df-test", backoff=0.01) as client,
    ):
        [generation] = client.generate_many([Request(Conversation().user("What colour?", [scene]), 8)])
        assert generation.token_logprobs is None and generation.mean_nll is None
        assert generation.text == served.generate(Conversation().user("What colour?", [scene]), 8)
        with pytest.raises(ScoringUnavailableError, match="'bare'"):
            client.score(micro_context(scene), ["red", "blue"])
        before = server.count(CHAT)
        result = DualFocus(client, max_new_tokens=8).ask(scene, "What colour is the square?")
        assert server.count(CHAT) - before >= 2  # it asked, and the engine did not raise
    assert result.answer and result.scores is None
    assert result.vote in ("micro_policy", "judge") or result.fallback


def test_openai_auto_mode_on_a_bare_server_is_a_traced_fallback(
    served: HFBackend, scene: Image.Image
) -> None:
    with (
        OpenAITestServer(served, profile="bare") as server,
        OpenAIBackend(server.url, "df-test", backoff=0.01) as client,
    ):
        result = DualFocus(client, max_new_tokens=8).ask(scene, "What colour is the square?", mode="auto")
    assert result.answer and result.macro_nll is None
    assert result.auto_reason and "no confidence" in result.auto_reason


# -- the network: keys, retries, silence -------------------------------------------------------


def test_openai_sends_the_api_key_from_the_argument_or_the_environment(
    served: HFBackend, scene: Image.Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    conversation = Conversation().user("What colour?", [scene])
    with OpenAITestServer(served, profile="hosted", api_key="sk-test") as server:
        with OpenAIBackend(server.url, "df-test", api_key="sk-test", capabilities="bare") as keyed:
            assert keyed.generate(conversation, 4)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        with OpenAIBackend(server.url, "df-test", capabilities="bare") as from_env:
            assert from_env.generate(conversation, 4)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
        with (
            OpenAIBackend(server.url, "df-test", capabilities="bare", backoff=0.01) as wrong,
            pytest.raises(ServerError, match="401: Incorrect API key") as refused,
        ):
            wrong.generate(conversation, 4)
        assert refused.value.status == 401 and server.count(CHAT) == 3  # a refusal is not retried


def test_openai_survives_a_503_and_a_dropped_connection_and_logs_each_retry(
    served: HFBackend, server: OpenAITestServer, scene: Image.Image, caplog: pytest.LogCaptureFixture
) -> None:
    conversation = Conversation().user("What colour is the square?", [scene])
    expected = served.generate(conversation, 8)
    server.fail(CHAT, 0, "503")
    server.fail(CHAT, 1, "drop")
    with (
        caplog.at_level(logging.WARNING, "df_agent.backends.openai"),
        OpenAIBackend(server.url, "df-test", capabilities="vllm", backoff=0.01) as client,
    ):
        assert client.generate(conversation, 8) == expected
    assert [r.fault for r in server.records] == ["503", "drop", None]
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) == 2 and "attempt 1: HTTPStatusError" in retries[0] and "attempt 2" in retries[1]


def test_openai_a_silent_answer_fails_within_the_first_byte_timeout(
    server: OpenAITestServer, scene: Image.Image
) -> None:
    server.fail(CHAT, 0, "timeout")
    with OpenAIBackend(server.url, "df-test", capabilities="bare", first_byte_timeout=0.5) as client:
        start = time.monotonic()
        with pytest.raises(ServerError, match=r"sent nothing for 0\.5 s \(first_byte_timeout\)"):
            client.generate(Conversation().user("What colour?", [scene]), 4)
        assert time.monotonic() - start < 3.0  # one wait, not max_attempts of them
    assert server.count(CHAT) == 1


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A socket that accepts connections and never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    stop.set()
    thread.join()
    for connection in held:
        connection.close()
    listener.close()


def test_openai_ask_on_a_server_that_accepts_and_never_answers_fails_clearly_in_bounded_time(
    silent_server: str, scene: Image.Image
) -> None:
    with OpenAIBackend(silent_server, "m", first_byte_timeout=0.5, max_attempts=5) as client:
        start = time.monotonic()
        with pytest.raises(ServerError, match=r"accepted the request but sent nothing for 0\.5 s"):
            DualFocus(client).ask(scene, "What colour is the square?")  # the probe meets the silence
        assert time.monotonic() - start < 3.0
    with OpenAIBackend(silent_server, "m", capabilities="hosted", first_byte_timeout=0.5) as told:
        start = time.monotonic()
        with pytest.raises(ServerError, match="sent nothing"):
            DualFocus(told).ask(scene, "What colour is the square?")  # the generation meets it
        assert time.monotonic() - start < 3.0
    with pytest.raises(ServerError, match="sent nothing"):
        OpenAIBackend(silent_server, first_byte_timeout=0.5)  # listing the models meets it


def test_openai_model_name_is_discovered_and_replicas_share_the_load(
    served: HFBackend, scene: Image.Image
) -> None:
    with OpenAITestServer(served) as one, OpenAITestServer(served) as two:
        with OpenAIBackend([one.url, two.url.removesuffix("/v1") + "/"], capabilities="bare") as client:
            assert client.model_id == "df-test"
            conversation = Conversation().user("What colour?", [scene])
            answers = {client.generate(conversation, max_new_tokens=4) for _ in range(4)}
        assert answers == {served.generate(conversation, max_new_tokens=4)}
        assert one.count(CHAT) == two.count(CHAT) == 2


def test_openai_refusals_are_not_retried_and_failures_stop_after_max_attempts(
    server: OpenAITestServer, scene: Image.Image
) -> None:
    conversation = Conversation().user("What colour?", [scene])
    with (
        OpenAIBackend(server.url, "no-such-model", capabilities="bare", backoff=0.01) as wrong,
        pytest.raises(ServerError, match="does not exist") as refused,
    ):
        wrong.generate(conversation)
    assert refused.value.status == 404 and server.count(CHAT) == 1
    server.reset()
    for nth in range(3):
        server.fail(CHAT, nth, "503")
    with (
        OpenAIBackend(server.url, "df-test", capabilities="bare", max_attempts=3, backoff=0.01) as client,
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
    assert client.generate_many([]) == []


def test_openai_declarations_come_from_the_preset_or_the_constructor(
    server: OpenAITestServer, scene: Image.Image
) -> None:
    with OpenAIBackend(server.url, "df-test") as default:
        assert (default.box_convention.value, default.prompt_family) == ("fraction", "dualfocus")
        assert default.input_size(scene) == scene.size
    with OpenAIBackend(server.url, "gpt-4o-mini") as gpt:  # by name: the chat preset, hosted-like
        assert (gpt.box_convention.value, gpt.prompt_family, gpt.capabilities) == (
            "json_1000",
            "chat",
            "hosted",
        )
    with OpenAIBackend(server.url, "qwen2.5vl:7b") as qwen:  # Ollama tag: pixels of smart_resize
        assert qwen.box_convention.value == "pixels" and qwen.input_size(scene) == (308, 252)
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
    assert server.records == []  # names given, nothing probed


# -- a client nobody here wrote --------------------------------------------------------------


@pytest.mark.parametrize("profile", ["vllm", "hosted", "bare"])
def test_the_official_openai_client_talks_to_every_profile(
    served: HFBackend, scene: Image.Image, profile: str
) -> None:
    openai = pytest.importorskip("openai")
    from df_agent.images import to_data_uri

    with OpenAITestServer(served, profile=profile, api_key="sk-local") as server:
        sdk = openai.OpenAI(base_url=server.url, api_key="sk-local", max_retries=0)
        assert [m.id for m in sdk.models.list()] == ["df-test"]
        content = [
            {"type": "image_url", "image_url": {"url": to_data_uri(scene)}},
            {"type": "text", "text": "What colour is the square?"},
        ]
        messages = [{"role": "user", "content": content}]
        reply = sdk.chat.completions.create(model="df-test", messages=messages, max_tokens=8, logprobs=True)
        expected = served.generate(Conversation().user("What colour is the square?", [scene]), 8)
        assert reply.choices[0].message.content == expected
        logprobs = reply.choices[0].logprobs
        if profile == "bare":
            assert logprobs is None
        else:
            values = [entry.logprob for entry in logprobs.content]
            own = served.score(Conversation().user("What colour is the square?", [scene]), [expected])[0]
            assert -sum(values) / len(values) == pytest.approx(own, abs=1e-4)
        stream = sdk.chat.completions.create(model="df-test", messages=messages, max_tokens=8, stream=True)
        assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == expected
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url, api_key="nope", max_retries=0).models.list()
