"""A new user's first hour, scripted: the commands the README shows, on the shipped model.

Ask about an example scene, then about a picture that is not FocusShapes (a warning is expected),
write the explaining figure, run a batch with one missing image (the other answers come back, the
exit status says something failed) and look at the memory an `ask --memory` filled.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from df_agent import FocusResult
from df_agent.backends.caveats import SHIPPED_MODEL_NOTE
from df_agent.cli import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
pytestmark = pytest.mark.slow


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    """A gradient with a caption: nothing like a FocusShapes scene."""
    t = np.linspace(0, 1, 400)[None, :, None] * np.ones((300, 1, 1))
    pixels = np.array([30, 90, 200]) * (1 - t) + np.array([250, 180, 60]) * t
    image = Image.fromarray(pixels.astype(np.uint8))
    ImageDraw.Draw(image).text((40, 130), "HELLO 42", fill=(255, 255, 255), font=ImageFont.load_default(40))
    path = tmp_path / "photo.jpg"
    image.save(path, quality=90)
    return path


def ask_json(argv: list[str], capsys) -> tuple[FocusResult, str]:
    assert main(["ask", *argv, "--json"]) == 0
    captured = capsys.readouterr()
    return FocusResult.model_validate_json(captured.out), captured.err


def test_an_example_scene_answers_with_only_the_demonstration_note(capsys) -> None:
    result, err = ask_json([str(EXAMPLES / "scene_0.png"), "What number is on the red circle?"], capsys)
    assert result.model_id == "df-agent/focusshapes-small"
    assert result.answer is not None and result.answer.isdigit()
    assert result.warnings == [SHIPPED_MODEL_NOTE]  # a FocusShapes scene, words the model knows
    assert f"note: {SHIPPED_MODEL_NOTE}" in err


def test_a_photo_is_answered_with_warnings_that_say_why_to_doubt_it(photo: Path, capsys) -> None:
    result, err = ask_json([str(photo), "What is the person wearing?"], capsys)
    unknown = [w for w in result.warnings if "unknown to the model's tokenizer" in w]
    assert len(unknown) == 1 and "'person', 'wearing'" in unknown[0]
    assert any("does not look like a FocusShapes scene" in w for w in result.warnings)
    assert "warning: the image does not look like a FocusShapes scene" in err


def test_annotate_writes_a_figure_of_the_expected_size(tmp_path: Path, capsys) -> None:
    out = tmp_path / "explained.png"
    assert (
        main(
            [
                "ask",
                str(EXAMPLES / "scene_0.png"),
                "What number is on the red circle?",
                "--annotate",
                str(out),
            ]
        )
        == 0
    )
    assert f"wrote the figure to {out}" in capsys.readouterr().err
    with Image.open(out) as figure:
        assert figure.size == (1200, 750) and figure.format == "PNG"


def test_a_batch_with_a_missing_image_finishes_the_others_and_exits_non_zero(tmp_path: Path, capsys) -> None:
    lines = [json.loads(line) for line in (EXAMPLES / "questions.jsonl").read_text().splitlines()[:3]]
    for n, line in enumerate(lines):
        line["id"] = f"q{n}"
        line["image"] = str(EXAMPLES / line["image"])
    lines.insert(1, {"id": "lost", "image": str(tmp_path / "lost.png"), "question": "What is this?"})
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "answers.jsonl"
    assert main(["ask", "--questions", str(questions), "--output", str(out)]) == 1
    assert "1 of 4 questions failed" in capsys.readouterr().err
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in written] == ["q0", "lost", "q1", "q2"]
    assert "not found" in written[1]["error"]
    assert all(line["answer"] is not None for k, line in enumerate(written) if k != 1)


def test_memory_stats_shows_what_ask_memory_logged(tmp_path: Path, capsys) -> None:
    memory = tmp_path / "memory"
    scene = str(EXAMPLES / "scene_1.png")
    for question in ("How many objects are there?", "Is there a red circle?"):
        assert main(["ask", scene, question, "--memory", str(memory), "--mode", "macro"]) == 0
    capsys.readouterr()
    assert main(["memory", "stats", "--store", str(memory), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["records"] == 2 and stats["pending"] == 0
    assert main(["memory", "search", "how many objects", "--store", str(memory), "-k", "1", "--json"]) == 0
    found = json.loads(capsys.readouterr().out.splitlines()[0])
    assert found["record"]["result"]["question"] == "How many objects are there?"
