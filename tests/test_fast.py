"""The session (fast) path gives the plain path's results: tiny random LLaVA and Qwen2-VL, the shipped model.

The plain path is the same engine and backend with ``session=False``: no backend session, one
generation per request, each computed from scratch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import pytest
import torch
from conftest import ScriptedBackend
from PIL import Image

from df_agent.backends.base import Conversation, Generation, GuessRejected, Request
from df_agent.backends.hf import HFBackend
from df_agent.backends.hf_fast import SPECULATION_FAILURES_ALLOWED, AnswerDraft, BoxDraft, SpeculationError
from df_agent.boxes import Box
from df_agent.calibration import calibrate_auto_threshold
from df_agent.data.focusshapes import generate
from df_agent.engine import DualFocus
from df_agent.results import FocusResult, result_differences

TINY = ["tiny_llava_backend", "tiny_qwen_backend"]


@pytest.fixture(scope="module")
def questions() -> list[tuple[Image.Image, str]]:
    scenes, records = generate(11, 2)
    images = {f"images/{scene.id}.png": scene.image for scene in scenes}
    return [(images[r.image], r.question) for r in records]


@pytest.fixture(params=TINY)
def backend(request: pytest.FixtureRequest) -> HFBackend:
    return request.getfixturevalue(request.param)


def engines(backend: HFBackend, **kwargs) -> tuple[DualFocus, DualFocus]:
    """The plain and the session path over one fresh backend (its drafts and counters its own)."""
    fresh = HFBackend.from_backend(backend)
    return DualFocus(fresh, session=False, **kwargs), DualFocus(fresh, **kwargs)


def assert_same(plain: FocusResult, fast: FocusResult) -> None:
    assert result_differences(plain, fast) == []


class BoxedHF(HFBackend):
    """Replaces the reply to a box request by a readable box derived from the model's reply.

    Random models never write a readable box; this lets zoom, micro and the vote run on them.
    """

    def generate_many(self, requests) -> list[Generation]:
        replies = super().generate_many(requests)
        return [
            Generation(self._box(g.text), g.token_logprobs) if r.reply == "box" else g
            for r, g in zip(requests, replies, strict=True)
        ]

    def _box(self, text: str) -> str:
        code = sum(text.encode()) % 50
        if self.box_convention.value == "fraction":
            return f"[{code / 100:.2f},{code / 200:.2f},{0.5 + code / 100:.2f},{0.6 + code / 200:.2f}]"
        return f"({code * 10},{code * 5}),({500 + code * 10},{600 + code * 5})"


def boxed(backend: HFBackend, **kwargs) -> tuple[DualFocus, DualFocus]:
    """The plain and the session path over a backend whose boxes are always readable."""
    fresh = BoxedHF(
        backend.model, backend.processor, model_id=backend.model_id, box_convention=backend.box_convention
    )
    return DualFocus(fresh, session=False, **kwargs), DualFocus(fresh, **kwargs)


@pytest.fixture
def vision_calls(backend: HFBackend) -> Iterator[list[int]]:
    """Counts the images run through the vision tower (by plain and fast paths alike)."""
    calls: list[int] = []
    inner = backend.model.model
    tower = getattr(inner, "vision_tower", None) or inner.visual

    def count(module, args, kwargs, output) -> None:
        grid = kwargs.get("grid_thw")
        calls.append(len(grid) if grid is not None else args[0].shape[0])

    handle = tower.register_forward_hook(count, with_kwargs=True)
    yield calls
    handle.remove()


# -- whole questions --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "threshold"), [("dualfocus", 1.0), ("micro", 1.0), ("macro", 1.0), ("auto", 1.0), ("auto", 99.0)]
)
def test_ask_gives_the_plain_result(backend: HFBackend, questions, mode: str, threshold: float) -> None:
    plain, fast = engines(backend, max_new_tokens=6, auto_threshold=threshold)
    assert fast.backend.fast
    for image, question in questions[:3]:
        expected, got = plain.ask(image, question, mode=mode), fast.ask(image, question, mode=mode)
        assert_same(expected, got)
        if mode == "auto":  # random models are never that sure, nor that unsure
            assert (got.box_text is None) == (threshold > 50)


@pytest.mark.parametrize("arbitration", ["official", "own_context", "average"])
def test_zoom_micro_and_vote_give_the_plain_result(backend: HFBackend, questions, arbitration: str) -> None:
    plain, fast = boxed(backend, max_new_tokens=6, arbitration=arbitration)
    results = []
    for image, question in questions[:4]:
        expected, got = plain.ask(image, question), fast.ask(image, question)
        assert_same(expected, got)
        results.append(got)
    assert all(r.crop_box is not None for r in results)
    assert any(r.scores is not None for r in results), "no question went to the vote"


def test_multiple_choice_gives_the_plain_result(backend: HFBackend, questions) -> None:
    plain, fast = boxed(backend, max_new_tokens=4)
    image, question = questions[1]
    options = ["red", "blue", "green"]
    assert_same(plain.ask(image, question, options=options), fast.ask(image, question, options=options))


# -- the steps, inside one session ------------------------------------------------------------------


def test_steps_in_a_session_reuse_images_and_prefixes(backend: HFBackend, questions, vision_calls) -> None:
    plain, fast = engines(backend, max_new_tokens=6)
    image, question = questions[0]
    region = fast.zoom(image, Box(x1=40, y1=60, x2=150, y2=170))
    expected = {
        "macro": plain.macro(image, question),
        "box": plain.locate(image, question).box_text,
    }
    expected["micro"] = plain.micro(image, region.crop, question, box_text=expected["box"])
    candidates = [expected["macro"] or "red", expected["micro"] or "blue"]
    expected_votes = {
        method: plain.arbitrate(
            image, region.crop, question, candidates, box_text=expected["box"], method=method
        )
        for method in ("official", "own_context", "average")
    }
    plain_images = sum(vision_calls)
    vision_calls.clear()
    with fast.backend.session():
        assert fast.macro(image, question) == expected["macro"]
        assert fast.locate(image, question).box_text == expected["box"]
        before = fast.backend.tokens_computed
        assert fast.micro(image, region.crop, question, box_text=expected["box"]) == expected["micro"]
        micro_tokens = fast.backend.tokens_computed - before
        for method, vote in expected_votes.items():
            got = fast.arbitrate(
                image, region.crop, question, candidates, box_text=expected["box"], method=method
            )
            assert got.winner == vote.winner
            assert got.scores == pytest.approx(vote.scores, abs=1e-4)
    assert fast.backend.tokens_computed == 0  # outside a session
    assert sum(vision_calls) == 2, "the full image and the crop are each encoded once"
    assert plain_images > 2 * sum(vision_calls)
    # the micro turn continues the box turn: only its own part and its reply are new
    micro_prompt = prompt_length(
        backend, fast.micro_conversation(image, region.crop, question, expected["box"])
    )
    locate_prompt = prompt_length(backend, fast.locate_conversation(image, question))
    assert 0 < micro_tokens <= micro_prompt - locate_prompt + 6


def prompt_length(backend: HFBackend, conversation: Conversation) -> int:
    text = backend.render(conversation, add_generation_prompt=True)
    return backend.encode([text], conversation.images)["input_ids"].shape[1]


def test_score_matches_plain_for_several_candidates(backend: HFBackend, questions) -> None:
    image, question = questions[0]
    conversation = Conversation().user(question, [image])
    candidates = ["red", "a blue square", "7", "yes"]
    expected = backend.score(conversation, candidates)  # outside a session: the plain path
    with backend.session():
        assert backend.score(conversation, candidates) == pytest.approx(expected, abs=1e-4)
        with pytest.raises(ValueError, match="non-empty"):
            backend.score(conversation, ["red", " "])
        assert backend.score(conversation, []) == []


def test_generation_logprobs_match_plain_and_give_the_scored_nll(backend: HFBackend, questions) -> None:
    image, question = questions[1]
    conversation = Conversation().user(question, [image])
    [plain] = backend.generate_many([Request(conversation, 6)])
    with backend.session():
        [fast] = backend.generate_many([Request(conversation, 6)])
    assert fast.text == plain.text
    assert fast.token_logprobs == pytest.approx(plain.token_logprobs, abs=1e-4)
    assert backend.abilities.generation_logprobs and backend.abilities.session
    if plain.text.strip() and len(plain.token_logprobs) < 6:  # ended by the model: the reply's own NLL
        assert plain.mean_nll == pytest.approx(backend.score(conversation, [plain.text])[0], abs=1e-3)


def test_speculation_error_is_a_guess_rejected() -> None:
    assert issubclass(SpeculationError, GuessRejected)


# -- drafts -----------------------------------------------------------------------------------------


class ReplayDraft:
    """Proposes the next `n` tokens of a known reply, with every `wrong`-th proposal spoilt."""

    def __init__(self, reply: Sequence[int], n: int, wrong: int, vocab: int) -> None:
        self.reply, self.n, self.wrong, self.vocab = list(reply), n, wrong, vocab
        self.calls = 0

    def propose(self, generated: Sequence[int]) -> list[int]:
        self.calls += 1
        proposals = self.reply[len(generated) : len(generated) + self.n]
        if self.wrong and self.calls % self.wrong == 0 and proposals:
            proposals[-1] = (proposals[-1] + 1) % self.vocab
        return proposals

    def ending(self, generated: Sequence[int]) -> list[int]:
        return []

    def learn(self, reply: Sequence[int]) -> None:
        pass


@pytest.mark.parametrize("wrong", [0, 2, 1])
def test_drafts_never_change_the_reply(tiny_llava_backend: HFBackend, questions, wrong: int) -> None:
    backend = tiny_llava_backend
    fast = HFBackend.from_backend(backend)
    image, question = questions[2]
    conversation = Conversation().user(question, [image])
    inputs = backend.encode([backend.render(conversation, add_generation_prompt=True)], [image])
    with torch.inference_mode():
        output = backend.model.generate(
            **inputs, max_new_tokens=24, do_sample=False, pad_token_id=backend.tokenizer.pad_token_id
        )
    reply = output[0, inputs["input_ids"].shape[1] :].tolist()
    passes = []
    original = fast._forward
    fast._forward = lambda *args: passes.append(1) or original(*args)  # type: ignore[method-assign]
    fast.box_draft = ReplayDraft(reply, n=3, wrong=wrong, vocab=len(backend.tokenizer))
    expected = backend.generate(conversation, 24)
    with fast.session():
        assert fast.generate_many([Request(conversation, 24, reply="box")])[0].text == expected
    if wrong == 0:  # right proposals: four tokens a pass
        assert len(passes) <= math.ceil(len(reply) / 4) + 1


class ClosingDraft(ReplayDraft):
    """Says the reply ends with `closing` once `after` tokens are written; proposes nothing."""

    def __init__(self, after: int, closing: Sequence[int]) -> None:
        super().__init__([], 0, 0, 1)
        self.after, self.closing = after, list(closing)

    def ending(self, generated: Sequence[int]) -> list[int]:
        return self.closing if len(generated) == self.after else []


@pytest.fixture
def short_replies(tiny_llava_backend: HFBackend, questions) -> Iterator[tuple[Conversation, list[int]]]:
    """A conversation whose greedy reply ends after 5 tokens: its 5th token is made the end of turn."""
    backend = tiny_llava_backend
    image, question = questions[2]
    conversation = Conversation().user(question, [image])
    inputs = backend.encode([backend.render(conversation, add_generation_prompt=True)], [image])
    with torch.inference_mode():
        output = backend.model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=0)
    reply = output[0, inputs["input_ids"].shape[1] :].tolist()
    end = next(token for token in reply[3:] if token not in reply[:3])
    config = backend.model.generation_config
    saved = config.eos_token_id
    config.eos_token_id = end
    try:
        yield conversation, reply[: reply.index(end) + 1]
    finally:
        config.eos_token_id = saved


def test_speculation_returns_early_and_confirms_in_the_next_pass(tiny_llava_backend, short_replies) -> None:
    conversation, reply = short_replies
    fast = HFBackend.from_backend(tiny_llava_backend)
    expected = tiny_llava_backend.generate(conversation, 8)
    passes = []
    original = fast._run_pass
    fast._run_pass = lambda *args: passes.append(1) or original(*args)  # type: ignore[method-assign]
    fast.box_draft = ClosingDraft(len(reply) - 2, reply[-2:])
    with fast.session(speculate=True):
        assert fast.generate_many([Request(conversation, 8, reply="box")])[0].text == expected
        assert len(passes) == len(reply) - 2  # the last two tokens were not waited for
    assert len(passes) == len(reply) - 1  # ... and were confirmed when the session closed


def test_wrong_speculation_raises_and_engine_redoes_the_question(
    tiny_llava_backend, short_replies, questions
):
    conversation, reply = short_replies
    fast = HFBackend.from_backend(tiny_llava_backend)
    fast.box_draft = ClosingDraft(len(reply) - 2, [reply[-2] + 1, reply[-1]])
    with pytest.raises(SpeculationError), fast.session(speculate=True):
        fast.generate_many([Request(conversation, 8, reply="box")])

    # an engine whose box draft guesses wrong: the question is redone and gives the plain result
    plain, engine = engines(tiny_llava_backend, max_new_tokens=4)
    engine.backend.box_draft = ClosingDraft(2, [5, tiny_llava_backend.model.generation_config.eos_token_id])
    image, question = questions[0]
    assert_same(plain.ask(image, question), engine.ask(image, question))
    assert engine.backend._speculations[1] == 1
    for _ in range(SPECULATION_FAILURES_ALLOWED + 2):
        assert_same(plain.ask(image, question), engine.ask(image, question))
    assert engine.backend._speculations[1] == SPECULATION_FAILURES_ALLOWED + 1  # then it stops guessing


def test_answer_draft_guesses_the_last_answer_and_the_usual_length() -> None:
    draft = AnswerDraft(end_id=3, window=10, agreement=0.9, warmup=4)
    for reply in ([7, 3], [8, 3], [9, 3]):
        draft.learn(reply)
    assert draft.ending([5]) == []  # too few answers seen
    draft.learn([5, 3])
    draft.learn([5, 6])  # cut off, not ended: not counted
    assert draft.ending([5]) == [3] and draft.ending([5, 6]) == []
    assert draft.propose([]) == [5, 3] and draft.propose([5]) == [3] and draft.propose([6]) == []
    draft.learn([5, 6, 3])
    assert draft.ending([5]) == [] == draft.ending([5, 6])  # lengths differ: no guess
    assert draft.propose([5]) == [6, 3]


def test_box_draft_proposes_the_fixed_tokens_of_a_box_and_boxes_seen_before() -> None:
    from df_agent.train.build import build_tokenizer

    tokenizer = build_tokenizer()
    end = tokenizer.eos_token_id
    draft = BoxDraft.for_tokenizer(tokenizer, end)
    assert draft is not None
    ids = tokenizer.encode("[0.12,0.34,0.56,0.78]", add_special_tokens=False)
    open_, comma, close = ids[0], ids[2], ids[-1]
    assert draft.propose([]) == [open_]
    assert draft.propose(ids[:1]) == []  # a number is the model's choice
    assert draft.propose(ids[:2]) == [comma]
    assert draft.propose(ids[:6]) == [comma]
    assert draft.propose(ids[:8]) == draft.ending(ids[:8]) == [close, end]
    assert draft.ending(ids[:6]) == []
    assert draft.propose(tokenizer.encode("5", add_special_tokens=False)) == []  # a number outside a box

    draft.learn([*ids, end])
    draft.learn([*tokenizer.encode("yes", add_special_tokens=False), end])  # not a box: ignored
    assert draft.propose([]) == [*ids, end]
    assert draft.propose(ids[:2]) == [*ids[2:], end]  # begins like the box seen: the rest of it
    assert draft.ending(ids[:2]) == []  # a remembered box is a guess, never a sure ending
    other = tokenizer.encode("[0.50,0.34,0.56,0.78]", add_special_tokens=False)
    assert draft.propose(other[:2]) == [comma]


def test_box_draft_needs_single_token_numbers(
    tiny_llava_backend: HFBackend, tiny_qwen_backend: HFBackend
) -> None:
    assert (
        BoxDraft.for_tokenizer(tiny_llava_backend.tokenizer, tiny_llava_backend.tokenizer.eos_token_id)
        is None
    )
    assert tiny_qwen_backend.box_draft is None  # boxes in 0..1000


# -- the plain path where the fast one cannot serve ---------------------------------------------------


def test_non_greedy_generation_settings_use_the_plain_path(tiny_llava_backend: HFBackend, questions) -> None:
    config = tiny_llava_backend.model.generation_config
    config.repetition_penalty = 1.3
    try:
        plain, fast = engines(tiny_llava_backend, max_new_tokens=6)
        assert not fast.backend.fast
        image, question = questions[0]
        assert_same(plain.ask(image, question), fast.ask(image, question))
    finally:
        config.repetition_penalty = 1.0
    assert HFBackend.from_backend(tiny_llava_backend).fast
    assert not HFBackend.from_backend(tiny_llava_backend, fast=False).abilities.session


def test_eager_attention_gives_the_plain_result(tiny_llava_backend: HFBackend, questions) -> None:
    model = tiny_llava_backend.model
    model.set_attn_implementation("eager")
    try:
        plain, fast = engines(tiny_llava_backend, max_new_tokens=6)
        assert fast.backend.fast
        for image, question in questions[:2]:
            assert_same(plain.ask(image, question), fast.ask(image, question))
    finally:
        model.set_attn_implementation("sdpa")


def test_backends_without_sessions_run_the_plain_protocol(scene: Image.Image) -> None:
    def run(engine_type):
        backend = ScriptedBackend(macro="red", micro="blue", scores={"red": 2.0, "blue": 0.5})
        return DualFocus(backend, session=engine_type).ask(scene, "What colour is the square?"), backend

    (plain, plain_backend), (fast, fast_backend) = run(False), run(True)
    assert_same(plain, fast)
    assert [s for s, _ in plain_backend.generated] == [s for s, _ in fast_backend.generated]


# -- auto -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("nll", "skipped"), [(0.05, True), (0.5, False)])
def test_auto_skips_the_zoom_only_for_a_confident_macro_answer(
    scene: Image.Image, nll: float, skipped: bool
) -> None:
    backend = ScriptedBackend(macro="red", micro="blue", scores={"red": nll, "blue": 0.01})
    result = DualFocus(backend, auto_threshold=0.1).ask(scene, "What colour is the square?", mode="auto")
    assert result.mode == "auto"
    assert result.macro_nll == pytest.approx(nll)
    macro_context, candidates = backend.scored[0]
    assert candidates == ["red"] and macro_context.turns[-1].text == "What colour is the square?"
    if skipped:
        assert (result.answer, result.path, result.box) == ("red", "macro", None)
        assert "confident" in result.fallback
        assert [step for step, _ in backend.generated] == ["macro"]
    else:
        assert (result.answer, result.path) == ("blue", "micro")
        assert [step for step, _ in backend.generated] == ["macro", "locate", "micro"]


def test_calibration_skips_most_without_losing_accuracy() -> None:
    nll = [0.01, 0.02, 0.3, 0.5, 0.9, 1.5]
    macro = [True, True, True, False, False, False]
    full = [True, True, False, True, True, False]
    strict = calibrate_auto_threshold(nll, macro, full)  # at 0.5 one gain (0.3) pays for one loss (0.5)
    assert (strict.threshold, strict.skip_rate) == (0.5, pytest.approx(4 / 6))
    assert strict.accuracy == strict.dualfocus_accuracy == pytest.approx(4 / 6)
    assert strict.macro_accuracy == pytest.approx(3 / 6)
    loose = calibrate_auto_threshold(nll, macro, full, max_accuracy_loss=0.2)
    assert (loose.threshold, loose.skip_rate, loose.accuracy) == (1.5, 1.0, pytest.approx(3 / 6))
    never = calibrate_auto_threshold([0.1, 0.2], [False, False], [True, True])
    assert never.threshold == -math.inf and never.skip_rate == 0
    with pytest.raises(ValueError, match="same non-zero number"):
        calibrate_auto_threshold([0.1], [True, False], [True])


# -- the shipped model --------------------------------------------------------------------------------


@pytest.mark.slow
def test_shipped_model_fast_gives_the_plain_results() -> None:
    from df_agent.backends.hf import shipped_model_path

    try:
        path = shipped_model_path()
    except FileNotFoundError:
        pytest.skip("the shipped model is not in df_agent/model/ yet")
    backend = HFBackend.from_pretrained(path, device="cpu")
    plain, fast = DualFocus(backend, session=False), DualFocus(backend)
    assert fast.backend.fast and fast.backend.box_draft is not None
    scenes, records = generate(4242, 8)
    images = {f"images/{scene.id}.png": scene.image for scene in scenes}
    results = []
    for index, record in enumerate(records):
        image = images[record.image]
        expected, got = plain.ask(image, record.question), fast.ask(image, record.question)
        assert_same(expected, got)
        results.append(got)
        if index < 6:
            for options in ({"mode": "auto"}, {"mode": "micro"}, {"arbitration": "average"}):
                assert_same(
                    plain.ask(image, record.question, **options), fast.ask(image, record.question, **options)
                )
    assert any(r.scores is not None for r in results), "no question went to the vote"
    assert sum(r.box is not None for r in results) >= len(results) // 2
