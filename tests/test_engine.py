"""The protocol's logic on a scripted backend: which step runs, with what, and who wins the vote."""

from __future__ import annotations

import json

import pytest
from conftest import ScriptedBackend
from PIL import Image

from df_agent import DualFocus, ImageError
from df_agent.engine import option_letter


def engine(backend: ScriptedBackend, **kwargs) -> DualFocus:
    return DualFocus(backend, **kwargs)


def test_disagreeing_answers_go_to_the_vote_and_the_lower_nll_wins(scene: Image.Image) -> None:
    backend = ScriptedBackend(macro="red", micro="blue", scores={"red": 2.0, "blue": 0.5})
    result = engine(backend).ask(scene, "What colour is the square?")
    assert (result.answer, result.path) == ("blue", "micro")
    assert result.scores == {"macro": 2.0, "micro": 0.5}
    assert result.arbitration == "official"
    assert result.fallback is None
    assert [step for step, _ in backend.generated] == ["macro", "locate", "micro"]
    [(context, candidates)] = backend.scored
    assert candidates == ["red", "blue"]
    assert context.turns[-1].text.endswith(
        "What colour is the square?\nAnswer the question using a single word or phrase"
    )


def test_macro_wins_when_it_is_more_plausible(scene: Image.Image) -> None:
    backend = ScriptedBackend(macro="red", micro="blue", scores={"red": 0.1, "blue": 3.0})
    result = engine(backend).ask(scene, "What colour?")
    assert (result.answer, result.path, result.micro_answer) == ("red", "macro", "blue")


def test_micro_conversation_carries_exactly_two_images_full_then_crop(scene: Image.Image) -> None:
    backend = ScriptedBackend(box="[0.25,0.25,0.50,0.50]")
    result = engine(backend, min_side=0).ask(scene, "What colour?")
    [micro] = [conv for step, conv in backend.generated if step == "micro"]
    full, crop = micro.images
    assert len(micro.images) == 2
    assert full.size == scene.size and full.tobytes() == scene.tobytes()
    assert result.crop_box is not None
    assert crop.size == (result.crop_box.width, result.crop_box.height)
    assert crop.tobytes() == scene.crop(result.crop_box.as_int_tuple()).tobytes()
    # the box turn is replayed: user(image, box request), assistant(box text), user(crop, question)
    assert [t.role for t in micro.turns] == ["user", "assistant", "user"]
    assert micro.turns[1].text == "[0.25,0.25,0.50,0.50]"


def test_crop_box_is_the_official_square_with_margin(scene: Image.Image) -> None:
    # box 80..160 x 60..120 px -> square side 80 around (120, 90) -> 80..160 x 50..130 -> +25 each side
    backend = ScriptedBackend(box="[0.25,0.25,0.50,0.50]")
    result = engine(backend, min_side=0).ask(scene, "What colour?")
    assert result.box is not None and result.box.as_tuple() == (80, 60, 160, 120)
    assert result.crop_box is not None and result.crop_box.as_tuple() == (55, 25, 185, 155)


@pytest.mark.parametrize(
    "box_text",
    ["I cannot tell", "", "[0.5,0.5]", "[0.9,0.9,0.1,0.1]", "[1.5,1.5,2.0,2.0]", "nan nan nan nan"],
)
def test_unreadable_box_means_no_vote_and_the_macro_answer_stands(scene: Image.Image, box_text: str) -> None:
    backend = ScriptedBackend(macro="red", box=box_text, micro="blue")
    result = engine(backend).ask(scene, "What colour?")
    assert (result.answer, result.path) == ("red", "macro")
    assert result.fallback is not None and result.fallback.startswith("no box")
    assert result.scores is None and result.micro_answer is None and result.box is None
    assert result.box_text == box_text
    assert backend.scored == []
    assert "micro" not in [step for step, _ in backend.generated]


def test_no_stale_vote_after_a_question_that_had_a_box(scene: Image.Image) -> None:
    backend = ScriptedBackend(macro="red", micro="blue")
    df = engine(backend)
    df.ask(scene, "first")
    backend.replies["locate"] = "no idea"
    result = df.ask(scene, "second")
    assert len(backend.scored) == 1
    assert result.answer == "red" and result.scores is None and result.micro_answer is None


def test_equal_answers_skip_the_vote(scene: Image.Image) -> None:
    backend = ScriptedBackend(macro="Red.", micro="red")
    result = engine(backend).ask(scene, "What colour?")
    assert result.scores is None and backend.scored == []
    assert result.path == "macro" and "agree" in (result.fallback or "")


@pytest.mark.parametrize(
    ("macro", "micro", "answer", "path", "voted"),
    [
        ("A", "B", None, None, True),  # both valid and different: vote on the options' texts
        ("A.", "(A)", "A", "macro", False),  # same option: no vote
        ("A", "I think so", "A", "macro", False),  # only macro valid
        ("no idea", "B. blue", "B", "micro", False),  # only micro valid
        ("no idea", "maybe", None, None, False),  # neither valid: no answer, the fallback says why
        ("red", "blue", None, None, True),  # option texts count as their letters
    ],
)
def test_multiple_choice_reduces_answers_to_letters(
    scene: Image.Image, macro: str, micro: str, answer: str | None, path: str | None, voted: bool
) -> None:
    backend = ScriptedBackend(macro=macro, micro=micro, scores={"red": 1.0, "blue": 0.2})
    result = engine(backend).ask(scene, "Which colour?", options=["red", "blue", "green"])
    if voted:
        [(_, candidates)] = backend.scored
        assert candidates == ["red", "blue"]
        assert (result.answer, result.path) == ("B", "micro")
    else:
        assert backend.scored == []
        assert (result.answer, result.path) == (answer, path)
    macro_prompt = backend.generated[0][1].turns[-1].text
    assert macro_prompt.endswith("C. green\nAnswer with the option's letter from the given choices directly.")
    locate_prompt = backend.generated[1][1].turns[-1].text
    assert locate_prompt.endswith("asks: Which colour?")  # the bare question, no options


def test_option_letter_forms() -> None:
    options = ["cat", "dog"]
    assert [option_letter(a, options) for a in ["A", "b", "(B)", "B. dog", "Dog", "C", "Apple"]] == [
        "A", None, "B", "B", "B", None, None,
    ]  # fmt: skip


def test_macro_mode_runs_one_generation(scene: Image.Image) -> None:
    backend = ScriptedBackend()
    result = engine(backend).ask(scene, "What colour?", mode="macro")
    assert [s for s, _ in backend.generated] == ["macro"]
    assert (result.answer, result.path, result.box) == ("red", "macro", None)


def test_micro_mode_answers_from_the_crop_without_a_vote(scene: Image.Image) -> None:
    backend = ScriptedBackend()
    result = engine(backend).ask(scene, "What colour?", mode="micro")
    assert [s for s, _ in backend.generated] == ["locate", "micro"]
    assert (result.answer, result.path, result.macro_answer) == ("blue", "micro", None)
    assert backend.scored == []


def test_micro_mode_without_a_box_falls_back_to_macro(scene: Image.Image) -> None:
    backend = ScriptedBackend(box="none")
    result = engine(backend).ask(scene, "What colour?", mode="micro")
    assert (result.answer, result.path) == ("red", "macro") and "no box" in (result.fallback or "")


def test_own_context_scores_each_candidate_where_it_was_generated(scene: Image.Image) -> None:
    def score(conversation, candidate: str) -> float:
        return len(conversation.images) + (0.5 if candidate == "red" else 0.0)

    backend = ScriptedBackend(scores=score)
    result = engine(backend).ask(scene, "What colour?", arbitration="own_context")
    assert [len(conv.images) for conv, _ in backend.scored] == [1, 2]
    assert result.scores == {"macro": 1.5, "micro": 2.0} and result.path == "macro"
    assert result.arbitration == "own_context"


def test_average_scores_each_candidate_in_both_contexts(scene: Image.Image) -> None:
    def score(conversation, candidate: str) -> float:
        return {("red", 1): 1.0, ("red", 2): 3.0, ("blue", 1): 2.5, ("blue", 2): 2.0}[
            (candidate, len(conversation.images))
        ]

    backend = ScriptedBackend(scores=score)
    result = engine(backend, arbitration="average").ask(scene, "What colour?")
    assert result.scores == {"macro": 2.0, "micro": 2.25} and result.answer == "red"


def test_result_is_json_with_timings_and_without_the_crop_pixels(scene: Image.Image) -> None:
    result = engine(ScriptedBackend(scores={"red": 2.0})).ask(scene, "What colour?")
    data = json.loads(result.model_dump_json())
    assert "crop" not in data and result.crop is not None
    assert set(data["timings"]) == {"total", "macro", "locate", "zoom", "micro", "arbitrate"}
    assert data["timings"]["total"] >= data["timings"]["macro"]
    assert data["image_size"] == [320, 240] and len(data["image_hash"]) == 64
    assert data["box"] == {"x1": 80.0, "y1": 60.0, "x2": 160.0, "y2": 120.0}


def test_steps_are_callable_one_by_one(scene: Image.Image) -> None:
    df = engine(ScriptedBackend(scores={"red": 0.3, "blue": 0.9}))
    location = df.locate(scene, "What colour?")
    zoomed = df.zoom(scene, location.box)
    micro = df.micro(scene, zoomed.crop, "What colour?", box_text=location.box_text)
    vote = df.arbitrate(scene, zoomed.crop, "What colour?", ["red", micro], box_text=location.box_text)
    assert (micro, vote.answer, vote.winner) == ("blue", "red", 0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"question": ""}, "question"),
        ({"mode": "zoom"}, "mode"),
        ({"arbitration": "vote"}, "arbitration"),
    ],
)
def test_bad_arguments_say_what_is_wrong(scene: Image.Image, kwargs: dict, message: str) -> None:
    args = {"question": "What colour?", **kwargs}
    with pytest.raises(ValueError, match=message):
        engine(ScriptedBackend()).ask(scene, **args)


def test_bad_image_gives_an_image_error(tmp_path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(ImageError):
        engine(ScriptedBackend()).ask(text, "What colour?")


# -- observers ----------------------------------------------------------------------------------------


class Recorder:
    """A step observer that records (step, inputs, outputs or error, seconds)."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def start(self, step: str, inputs: dict):
        record = {"step": step, "inputs": inputs}
        self.steps.append(record)

        class Run:
            def end(self, outputs: dict, seconds: float) -> None:
                record.update(outputs=outputs, seconds=seconds)

            def fail(self, error: BaseException, seconds: float) -> None:
                record.update(error=error, seconds=seconds)

        return Run()


def test_observers_see_every_step_with_json_inputs_and_outputs(scene: Image.Image) -> None:
    always, once = Recorder(), Recorder()
    df = engine(ScriptedBackend(scores={"red": 2.0, "blue": 0.5}), observers=[always])
    with df.observing(once):
        result = df.ask(scene, "What colour?")
    df.ask(scene, "What colour?")
    steps = ["macro", "locate", "zoom", "micro", "arbitrate"]
    assert [s["step"] for s in once.steps] == steps
    assert [s["step"] for s in always.steps] == steps * 2
    by_step = {s["step"]: s for s in once.steps}
    assert by_step["macro"]["inputs"] == {"question": "What colour?", "options": None}
    assert by_step["macro"]["outputs"] == {"answer": "red"}
    assert by_step["locate"]["outputs"]["box"] == result.box.model_dump()
    assert by_step["zoom"]["outputs"]["crop_box"] == result.crop_box.model_dump()
    assert by_step["arbitrate"]["outputs"]["scores"] == [2.0, 0.5]
    for record in once.steps:
        json.dumps({"inputs": record["inputs"], "outputs": record["outputs"]})  # JSON-able, no images
        assert record["seconds"] >= 0


def test_observing_is_per_context_and_a_failing_step_is_reported(scene: Image.Image) -> None:
    import threading

    class Failing(ScriptedBackend):
        def score(self, conversation, candidates):
            raise RuntimeError("scoring broke")

    df = engine(Failing())
    recorder, other = Recorder(), Recorder()

    def elsewhere() -> None:
        with df.observing(other):
            df.ask(scene, "What colour?", mode="macro")

    with df.observing(recorder):
        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join()
        with pytest.raises(RuntimeError, match="scoring broke"):
            df.ask(scene, "What colour?")
    assert [s["step"] for s in other.steps] == ["macro"]
    assert [s["step"] for s in recorder.steps] == ["macro", "locate", "zoom", "micro", "arbitrate"]
    assert isinstance(recorder.steps[-1]["error"], RuntimeError)
    df.ask(scene, "What colour?", mode="macro")  # outside the block: nobody is told
    assert len(recorder.steps) == 5


# -- votes from what the backend gives ------------------------------------------------------------


def test_a_scoring_backend_runs_the_configured_vote(scene: Image.Image) -> None:
    result = engine(ScriptedBackend(scores={"red": 2.0, "blue": 0.5})).ask(scene, "What colour?")
    assert (result.vote, result.arbitration) == ("official", "official")
    assert "prompt log-probabilities" in result.vote_reason


@pytest.mark.parametrize(("macro_nll", "answer"), [(0.2, "red"), (0.9, "blue")])
def test_generation_logprobs_give_the_own_context_vote_without_scoring(
    scene: Image.Image, macro_nll: float, answer: str
) -> None:
    from conftest import GenerationLogprobsBackend

    backend = GenerationLogprobsBackend(nlls={"red": macro_nll, "blue": 0.5})
    result = engine(backend).ask(scene, "What colour?")
    assert (result.answer, result.vote, result.arbitration) == (answer, "generation_logprobs", None)
    assert result.scores == pytest.approx({"macro": macro_nll, "micro": 0.5})
    assert backend.scored == []
    assert [s for s, _ in backend.generated] == ["macro", "locate", "micro"]


def test_a_bare_backend_takes_the_micro_answer_by_policy(scene: Image.Image) -> None:
    from conftest import BareBackend

    backend = BareBackend(macro="red", micro="blue")
    result = engine(backend).ask(scene, "What colour?")
    assert (result.answer, result.path, result.vote) == ("blue", "micro", "micro_policy")
    assert "no log-probabilities" in result.vote_reason and result.scores is None
    no_box = engine(BareBackend(box="none")).ask(scene, "What colour?")  # no box: macro, and it says so
    assert no_box.path == "macro" and no_box.vote is None and no_box.fallback.startswith("no box")


@pytest.mark.parametrize(
    ("reply", "answer", "vote"),
    [("A", "red", "judge"), ("B", "blue", "judge"), ("?", "blue", "micro_policy")],
)
def test_the_judge_sees_both_views_and_both_answers(
    scene: Image.Image, reply: str, answer: str, vote: str
) -> None:
    from conftest import BareBackend

    backend = BareBackend(macro="red", micro="blue")
    backend.replies["judge"] = reply
    result = engine(backend, unscored_vote="judge").ask(scene, "What colour?")
    assert (result.answer, result.vote) == (answer, vote)
    [judge] = [conversation for step, conversation in backend.generated if step == "judge"]
    assert len(judge.images) == 2 and "A. red" in judge.turns[-1].text and "B. blue" in judge.turns[-1].text
    if vote == "micro_policy":
        assert "neither answer" in result.vote_reason


def test_auto_without_any_confidence_runs_the_full_protocol_and_says_so(scene: Image.Image) -> None:
    from conftest import BareBackend, GenerationLogprobsBackend

    result = engine(BareBackend()).ask(scene, "What colour?", mode="auto")
    assert result.path == "micro" and result.macro_nll is None
    assert "no confidence" in result.auto_reason
    confident = engine(GenerationLogprobsBackend(nlls={"red": 0.1}), auto_threshold=0.2)
    skipped = confident.ask(scene, "What colour?", mode="auto")
    assert (skipped.answer, skipped.fallback, skipped.macro_nll) == (
        "red",
        "confident macro answer; no zoom",
        0.1,
    )
    assert skipped.auto_threshold == 0.2 and "generation" in skipped.auto_reason


# -- input limits -------------------------------------------------------------------------------------


def test_limits_are_checked_before_any_model_work(scene: Image.Image) -> None:
    from df_agent.engine import InputLimitError, InvalidOptionError, QuestionTooLongError, TooManyOptionsError

    backend = ScriptedBackend()
    df = engine(backend, max_question_chars=50, max_option_chars=10)
    cases = [
        ({"question": "x" * 51}, QuestionTooLongError, "max_question_chars"),
        ({"question": "Which?", "options": [str(i) for i in range(27)]}, TooManyOptionsError, "options"),
        ({"question": "Which?", "options": ["red", 3]}, InvalidOptionError, "option"),
        ({"question": "Which?", "options": ["red", ""]}, InvalidOptionError, "option"),
        ({"question": "Which?", "options": "red"}, InvalidOptionError, "options"),
        ({"question": "Which?", "options": ["red", "a" * 11]}, InvalidOptionError, "max_option_chars"),
        ({"question": "Which?", "options": ["a" * 10] * 5}, QuestionTooLongError, "max_question_chars"),
    ]
    for kwargs, error, limit in cases:
        with pytest.raises(error) as caught:
            df.ask(scene, **kwargs)
        assert isinstance(caught.value, (InputLimitError, ValueError)) and caught.value.limit == limit
        assert limit in str(caught.value) or limit in ("option", "options")
    assert backend.generated == []
    with pytest.raises(InvalidOptionError, match="candidate"):
        df.arbitrate(scene, scene, "Which?", ["red", None], box_text="[0,0,1,1]")


def test_the_model_context_limits_the_question(scene: Image.Image) -> None:
    from df_agent.engine import QuestionTooLongError

    class Small(ScriptedBackend):
        context_length = 40

        def count_tokens(self, text: str) -> int:
            return len(text.split())

    df = engine(Small(), max_new_tokens=8)
    assert df.ask(scene, "word " * 30).answer
    with pytest.raises(QuestionTooLongError, match="context_length") as caught:
        df.ask(scene, "word " * 33)
    assert caught.value.limit == "context_length"


def test_multiple_choice_answers_are_letters_or_none_in_every_mode(scene: Image.Image) -> None:
    options = ["red", "blue"]
    for mode in ("macro", "micro", "dualfocus"):
        result = engine(ScriptedBackend(macro="red", micro="purple")).ask(
            scene, "Which?", options=options, mode=mode
        )
        assert result.answer in ("A", None)
        if result.answer is None:
            assert "not one of the options" in result.fallback and result.micro_answer == "purple"
