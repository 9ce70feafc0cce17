"""POPE: the official answer parsing and metrics, against a confusion matrix worked out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from df_agent.eval import pope

# (model answer, label, how the official script reads the answer, confusion cell)
ANSWERS = [
    ("Yes.", "yes", "yes", "tp"),
    ("Yes, there is a dog in the image.", "yes", "yes", "tp"),
    ("No, there is not.", "no", "no", "tn"),
    ("No, there is not", "no", "no", "tn"),
    ("There is no dog in the image.", "no", "no", "tn"),
    ("There is not a dog.", "no", "no", "tn"),
    ("no", "yes", "no", "fn"),
    ("No", "yes", "no", "fn"),
    ("yes", "no", "yes", "fp"),
    ("Yes. There is no cat.", "no", "yes", "fp"),  # only the first sentence counts
    ("I do not see a dog.", "yes", "no", "fn"),
    ("NO", "no", "yes", "fp"),  # the official script is case-sensitive
    ("Not at all.", "no", "yes", "fp"),  # ... so "Not" is not "not"
    ("Nope.", "no", "yes", "fp"),  # "Nope" is not the word "no"
    ("There is a dog, no doubt.", "yes", "no", "fn"),  # commas are dropped before splitting
    ("A dog is present", "yes", "yes", "tp"),
    ("Absolutely", "yes", "yes", "tp"),
    ("", "no", "yes", "fp"),
    ("cannot tell", "yes", "yes", "tp"),
    ("There's nothing, no.", "no", "no", "tn"),
]


def test_the_file_has_twenty_lines_and_every_cell() -> None:
    assert len(ANSWERS) == 20
    assert {cell for *_, cell in ANSWERS} == {"tp", "tn", "fp", "fn"}


@pytest.mark.parametrize(("answer", "reading"), [(a, r) for a, _, r, _ in ANSWERS])
def test_official_answer_parsing(answer: str, reading: str) -> None:
    assert pope.parse_answer(answer) == reading


def test_metrics_equal_the_hand_computed_confusion_matrix(tmp_path: Path) -> None:
    # Written as the official question file and read back, so the reader's labels are what is scored.
    questions = tmp_path / "coco_pope_adversarial.json"
    questions.write_text(
        "".join(
            json.dumps(
                {"question_id": i, "image": f"COCO_{i}.jpg", "text": "Is there a dog?", "label": label}
            )
            + "\n"
            for i, (_, label, _, _) in enumerate(ANSWERS)
        )
    )
    items = pope.read_questions(questions, tmp_path / "images")
    assert [item.category for item in items] == ["adversarial"] * 20
    # By hand: tp = 5, tn = 5, fp = 6, fn = 4.
    metrics = pope.score([a for a, *_ in ANSWERS], [item.answers[0] for item in items])
    assert (metrics["tp"], metrics["tn"], metrics["fp"], metrics["fn"], metrics["n"]) == (5, 5, 6, 4, 20)
    assert metrics["accuracy"] == pytest.approx(10 / 20)
    assert metrics["precision"] == pytest.approx(5 / 11)
    assert metrics["recall"] == pytest.approx(5 / 9)
    assert metrics["f1"] == pytest.approx(0.5)  # 2 * (5/11) * (5/9) / (5/11 + 5/9) = (50/99) / (100/99)
    assert metrics["yes_ratio"] == pytest.approx(11 / 20)
    assert items[0].image == str(tmp_path / "images" / "COCO_0.jpg")


def test_undefined_ratios_are_zero_and_labels_are_case_insensitive() -> None:
    metrics = pope.score(["No.", "no"], ["NO", " no "])
    assert metrics["accuracy"] == 1.0
    assert metrics["precision"] == metrics["recall"] == metrics["f1"] == metrics["yes_ratio"] == 0.0


@pytest.mark.parametrize(
    ("predictions", "labels", "message"),
    [
        (["yes"], ["yes", "no"], "1 predictions but 2 labels"),
        ([], [], "at least one"),
        (["yes"], ["maybe"], "'yes' or 'no'"),
    ],
)
def test_bad_input_is_named(predictions: list[str], labels: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pope.score(predictions, labels)


@pytest.mark.parametrize(
    ("name", "split"),
    [
        ("coco_pope_random.json", "random"),
        ("aokvqa_pope_popular.jsonl", "popular"),
        ("gqa_pope_adversarial.json", "adversarial"),
        ("mine.json", "mine"),
    ],
)
def test_split_from_the_file_name(name: str, split: str) -> None:
    assert pope.split_of(name) == split


def test_a_malformed_question_line_names_the_file_and_line(tmp_path: Path) -> None:
    questions = tmp_path / "coco_pope_random.json"
    good = {"question_id": 1, "image": "a.jpg", "text": "Is there a cat?", "label": "yes"}
    questions.write_text(json.dumps(good) + '\n{"question_id": 2}\n')
    with pytest.raises(ValueError, match=r"coco_pope_random.json:2: not a POPE question line"):
        pope.read_questions(questions, tmp_path)
