"""`df-agent ask`: one question (--json, --annotate, --open), batch mode (--questions) and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from df_agent import FocusResult
from df_agent.cli import main


@pytest.fixture
def image_file(tmp_path: Path) -> Path:
    image = Image.new("RGB", (96, 64), (235, 235, 230))
    ImageDraw.Draw(image).ellipse((20, 10, 50, 40), fill=(220, 30, 30))
    path = tmp_path / "scene.png"
    image.save(path)
    return path


@pytest.fixture
def model(tiny_llava_path: Path) -> list[str]:
    return ["--model", str(tiny_llava_path), "--device", "cpu"]


def test_json_prints_the_full_result(image_file: Path, model: list[str], capsys) -> None:
    assert main(["ask", str(image_file), "What number is on the red circle?", "--json", *model]) == 0
    result = FocusResult.model_validate_json(capsys.readouterr().out)
    assert result.question == "What number is on the red circle?"
    assert result.image_size == (96, 64) and result.mode == "dualfocus"
    assert result.macro_answer is not None and "total" in result.timings


def test_plain_output_is_the_answer_and_a_summary(image_file: Path, model: list[str], capsys) -> None:
    assert main(["ask", str(image_file), "Is there a red circle?", "--mode", "macro", *model]) == 0
    captured = capsys.readouterr()
    assert "path=macro" in captured.err
    assert captured.out.endswith("\n")


def test_annotate_and_open_draw_the_region(
    image_file: Path, model: list[str], tmp_path: Path, monkeypatch
) -> None:
    shown: list[Image.Image] = []
    monkeypatch.setattr(Image.Image, "show", lambda self, title=None: shown.append(self))
    out = tmp_path / "annotated.png"
    assert main(["ask", str(image_file), "What colour?", "--annotate", str(out), "--open", *model]) == 0
    with Image.open(out) as annotated:
        assert annotated.size == (96, 64)
        saved = annotated.convert("RGB").tobytes()
    assert len(shown) == 1 and shown[0].tobytes() == saved


def test_open_alone_shows_without_writing(
    image_file: Path, model: list[str], tmp_path: Path, monkeypatch
) -> None:
    shown: list[Image.Image] = []
    monkeypatch.setattr(Image.Image, "show", lambda self, title=None: shown.append(self))
    assert main(["ask", str(image_file), "What colour?", "--open", "--mode", "macro", *model]) == 0
    assert len(shown) == 1 and shown[0].size == (96, 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene.png"]


def write_questions(folder: Path, lines: list[dict | str]) -> Path:
    path = folder / "questions.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_batch_writes_one_result_per_line(image_file: Path, model: list[str], tmp_path: Path, capsys) -> None:
    questions = write_questions(
        tmp_path,
        [
            {"image": "scene.png", "question": "What number is on the red circle?", "answer": "7"},  # ignored
            {"image": str(image_file), "question": "Is there a circle?", "mode": "macro"},
            "",
            {"image": "scene.png", "question": "Which colour?", "options": ["red", "blue"], "mode": "macro"},
        ],
    )
    assert main(["ask", "--questions", str(questions), *model]) == 0
    captured = capsys.readouterr()
    results = [FocusResult.model_validate_json(line) for line in captured.out.splitlines()]
    assert [r.question for r in results] == [
        "What number is on the red circle?",
        "Is there a circle?",
        "Which colour?",
    ]
    assert [r.mode for r in results] == ["dualfocus", "macro", "macro"]
    assert results[2].options == ["red", "blue"]
    assert "3/3" in captured.err  # the progress bar
    out = tmp_path / "results.jsonl"
    assert main(["ask", "--questions", str(questions), "--output", str(out), *model]) == 0
    assert len(out.read_text().splitlines()) == 3 and capsys.readouterr().out == ""


def test_batch_stops_at_a_bad_image_naming_its_line(
    image_file: Path, model: list[str], tmp_path: Path, capsys
) -> None:
    questions = write_questions(
        tmp_path,
        [{"image": "scene.png", "question": "Colour?"}, {"image": "nowhere.png", "question": "Colour?"}],
    )
    out = tmp_path / "results.jsonl"
    assert main(["ask", "--questions", str(questions), "--output", str(out), "--mode", "macro", *model]) == 2
    err = capsys.readouterr().err
    assert "questions.jsonl:2: image file" in err and "nowhere.png' not found" in err
    assert "Traceback" not in err
    assert len(out.read_text().splitlines()) == 1  # the first answer was kept


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"image": "scene.png", "question": "ok?"}', "{not json"], "questions.jsonl:2: not JSON"),
        ([{"question": "where is the image?"}], "questions.jsonl:1: needs an 'image'"),
        ([{"image": "scene.png", "question": " "}], "questions.jsonl:1: needs a non-empty 'question'"),
        ([{"image": "scene.png", "question": "q", "mode": "zoom"}], "mode must be one of dualfocus, macro"),
        ([{"image": "scene.png", "question": "q", "options": "red"}], "'options' must be a list of strings"),
        ([""], "holds no questions"),
    ],
)
def test_a_bad_questions_file_is_refused_before_the_model_loads(
    tmp_path: Path, image_file: Path, lines: list, message: str, capsys
) -> None:
    questions = write_questions(tmp_path, lines)
    # a model path that does not exist: the file is checked first, so loading is never reached
    assert main(["ask", "--questions", str(questions), "--model", str(tmp_path / "no-model")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("df-agent ask: error: ") and message in err


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.png", "image file '{path}' not found"),
        (
            lambda d: _write(d / "notes.png", b"not an image at all"),
            "is not an image in a format PIL can read",
        ),
        (lambda d: _write(d / "empty.png", b""), "is empty (0 bytes)"),
        (lambda d: d, "is a directory, not an image file"),
    ],
)
def test_a_bad_image_exits_2_with_a_clear_message(tmp_path: Path, make, message: str, capsys) -> None:
    path = make(tmp_path)
    assert main(["ask", str(path), "What is this?", "--model", str(tmp_path / "no-model")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("df-agent ask: error: ")
    assert message.format(path=path) in err
    assert "Traceback" not in err


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ask"], "give IMAGE and QUESTION, or --questions FILE.jsonl"),
        (["ask", "scene.png"], "give IMAGE and QUESTION, or --questions FILE.jsonl"),
        (["ask", "scene.png", "q?", "--questions", "questions.jsonl"], "not both"),
        (["ask", "--questions", "questions.jsonl", "--annotate", "a.png"], "do not apply to --questions"),
        (["ask", "scene.png", "q?", "--output", "out.jsonl"], "--output is for batch mode"),
    ],
)
def test_wrong_argument_combinations_are_explained(
    argv: list[str], message: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    write_questions(tmp_path, [{"image": "scene.png", "question": "q"}])
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_the_example_questions_run_as_a_batch(model: list[str], capsys) -> None:
    examples = Path(__file__).resolve().parents[1] / "examples" / "questions.jsonl"
    assert main(["ask", "--questions", str(examples), "--mode", "macro", *model]) == 0
    results = [FocusResult.model_validate_json(line) for line in capsys.readouterr().out.splitlines()]
    assert len(results) == 9 and results[0].question == "What number is on the red circle?"
