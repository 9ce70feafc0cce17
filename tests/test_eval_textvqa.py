"""TextVQA: the official answer normalisation and the leave-one-out VQA accuracy, worked out by hand.

With k of the ten human answers matching, the ten leave-one-out subsets hold k - 1 matches (k times)
or k matches (10 - k times), so the accuracy is (k * min(1, (k-1)/3) + (10-k) * min(1, k/3)) / 10:
k = 0 -> 0, 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, 4 or more -> 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from df_agent.eval import textvqa
from df_agent.eval.textvqa import normalize_answer, vqa_accuracy


def ten(*groups: tuple[str, int]) -> list[str]:
    """Ten human answers: `count` copies of each answer, padded with unrelated answers."""
    answers = [answer for answer, count in groups for _ in range(count)]
    return answers + [f"other{i}" for i in range(10 - len(answers))]


CASES = [
    # (prediction, human answers, accuracy by hand)
    ("coca cola", ten(("coca cola", 10)), 1.0),  # 10 matches
    ("stop", ten(("stop", 1)), 0.3),  # (1 * 0 + 9 * 1/3) / 10
    ("stop", ten(("stop", 2)), 0.6),  # (2 * 1/3 + 8 * 2/3) / 10
    ("stop", ten(("stop", 3)), 0.9),  # (3 * 2/3 + 7 * 1) / 10
    ("stop", ten(("stop", 4)), 1.0),  # (4 * 1 + 6 * 1) / 10
    ("go", ten(("stop", 10)), 0.0),
    ("Coca Cola", ten(("coca cola", 3)), 0.9),  # case
    ("stop.", ten(("stop", 10)), 1.0),  # a final period goes
    ("coca-cola", ten(("coca cola", 4)), 1.0),  # a hyphen inside a word becomes a space
    ("hello !", ten(("hello", 2)), 0.6),  # punctuation next to a space is removed
    ("yes/no", ten(("yes no", 1)), 0.3),  # a slash becomes a space
    ("the beatles", ten(("beatles", 3)), 0.9),  # articles go
    ("an apple", ten(("a apple", 2), ("apple", 2)), 1.0),  # both normalise to "apple": 4 matches
    ("two", ten(("2", 10)), 1.0),  # number words become digits
    ("Ten", ten(("10", 1)), 0.3),
    ("none", ten(("0", 3)), 0.9),  # "none" is 0
    ("dont", ten(("don't", 3)), 0.9),  # contractions get their apostrophe
    ("isnt", ten(("isn't", 2), ("isnt", 2)), 1.0),  # ... on both sides: 4 matches
    # "'s" is split off before contractions are restored, so "whats" -> "what's" but "what's" -> "what 's":
    ("whats", ten(("what's", 2), ("whats", 2)), 0.6),
    ("3.5", ten(("35", 4)), 0.0),  # a period before a digit stays
    ("3.5", ten(("3.5", 1)), 0.3),
    ("1,000", ten(("1000", 4)), 1.0),  # commas are dropped
    ("McDonald's", ten(("mcdonald's", 2)), 0.6),  # "'s" is split off on both sides
    ("what?", ten(("what", 3)), 0.9),  # question marks go
    ("  yes\n", ten(("yes", 3)), 0.9),  # white space
    ("mr. smith", ten(("mr smith", 2)), 0.6),  # a period not before a digit goes, even mid-answer
]


@pytest.mark.parametrize(("prediction", "answers", "expected"), CASES)
def test_vqa_accuracy_by_hand(prediction: str, answers: list[str], expected: float) -> None:
    assert len(answers) == 10
    assert vqa_accuracy(prediction, answers) == pytest.approx(expected)


def test_at_least_fifteen_hand_worked_cases() -> None:
    assert len(CASES) >= 15


def test_a_mixed_answer_set_scores_each_answer_by_its_own_count() -> None:
    answers = ["red"] * 5 + ["dark red"] * 3 + ["maroon"] * 2
    assert vqa_accuracy("dark red", answers) == pytest.approx(0.9)
    assert vqa_accuracy("maroon", answers) == pytest.approx(0.6)
    assert vqa_accuracy("Red.", answers) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("The Two Dogs.", "2 dogs"),
        ("dont", "don't"),
        ("a b c", "b c"),
        ("x  -  y", "x y"),
        ("5.", "5"),
        ("(hi)", "hi"),
    ],
)
def test_normalisation(raw: str, normal: str) -> None:
    assert normalize_answer(raw) == normal


def test_no_human_answers_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one human answer"):
        vqa_accuracy("x", [])


def test_reader_builds_the_ocr_prompt_only_when_asked(tmp_path: Path) -> None:
    questions = tmp_path / "TextVQA_0.5.1_val.json"
    record = {"question_id": 7, "image_id": "abc", "question": "what brand?", "answers": ["nokia"] * 10}
    questions.write_text(json.dumps({"dataset_type": "val", "data": [record]}))
    ocr = tmp_path / "ocr.json"
    ocr.write_text(json.dumps({"data": [{"image_id": "abc", "ocr_tokens": ["NOKIA", "5110"]}]}))
    [plain] = textvqa.read_questions(questions, tmp_path / "train_images")
    assert (plain.id, plain.question, plain.image) == (
        "7",
        "what brand?",
        str(tmp_path / "train_images" / "abc.jpg"),
    )
    [with_ocr] = textvqa.read_questions(questions, tmp_path, ocr_path=ocr, ocr_in_prompt=True)
    assert with_ocr.question == "what brand?\nReference OCR token: NOKIA, 5110"
    assert textvqa.judge("Nokia.", with_ocr) == 1.0
    with pytest.raises(ValueError, match="no OCR tokens for image abc"):
        textvqa.read_questions(questions, tmp_path, ocr_in_prompt=True)
    bench = textvqa.benchmark(questions, tmp_path, ocr_path=ocr, ocr_in_prompt=True)
    assert bench.settings["ocr_tokens_in_prompt"] is True


def test_reader_rejects_another_schema(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"questions": []}))
    with pytest.raises(ValueError, match="not a TextVQA question file"):
        textvqa.read_questions(bad, tmp_path)
