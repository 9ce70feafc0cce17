"""`df-agent ask`: one question (--json, --annotate, --open), batch mode (--questions) and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


def fake_viewer(folder: Path, monkeypatch) -> Path:
    """An `xdg-open` on PATH that records the file it was asked to open, and a display."""
    opened = folder / "opened.txt"
    viewer = folder / "bin" / "xdg-open"
    viewer.parent.mkdir()
    viewer.write_text(f'#!/bin/sh\necho "$1" > {opened}\n')
    viewer.chmod(0o755)
    monkeypatch.setenv("PATH", f"{viewer.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("DISPLAY", ":0")
    return opened


def test_annotate_writes_the_figure_and_says_where(
    image_file: Path, model: list[str], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "figure.png"
    assert main(["ask", str(image_file), "What colour?", "--annotate", str(out), *model]) == 0
    assert f"wrote the figure to {out}" in capsys.readouterr().err
    with Image.open(out) as figure:  # the figure, not the image: a fixed size whatever the image's
        assert figure.size == (1200, 750)


def test_open_shows_the_figure_in_the_viewer(
    image_file: Path, model: list[str], tmp_path: Path, monkeypatch, capsys
) -> None:
    opened = fake_viewer(tmp_path, monkeypatch)
    out = tmp_path / "figure.png"
    assert main(["ask", str(image_file), "What colour?", "--annotate", str(out), "--open", *model]) == 0
    assert opened.read_text().strip() == str(out)


def test_open_without_a_viewer_says_so(
    image_file: Path, model: list[str], tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no xdg-open anywhere
    assert main(["ask", str(image_file), "What colour?", "--open", "--mode", "macro", *model]) == 1
    captured = capsys.readouterr()
    assert "--open: no image viewer found" in captured.err and "the figure is at " in captured.err
    assert "<PIL." not in captured.out + captured.err
    written = Path(captured.err.split("the figure is at ")[1].split(": open it")[0])
    assert written.is_file()
    written.unlink()


def write_questions(folder: Path, lines: list[dict | str]) -> Path:
    path = folder / "questions.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def read_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_batch_writes_one_result_per_line(image_file: Path, model: list[str], tmp_path: Path, capsys) -> None:
    questions = write_questions(
        tmp_path,
        [
            {
                "id": "q1",
                "image": "scene.png",
                "question": "What number is on the red circle?",
                "answer": "7",
            },
            {"image": str(image_file), "question": "Is there a circle?", "mode": "macro"},
            "",
            {
                "id": 3,
                "image": "scene.png",
                "question": "Which colour?",
                "options": ["red", "blue"],
                "mode": "macro",
            },
        ],
    )
    assert main(["ask", "--questions", str(questions), *model]) == 0
    captured = capsys.readouterr()
    lines = read_lines(captured.out)
    results = [FocusResult.model_validate(line) for line in lines]
    assert [r.question for r in results] == [
        "What number is on the red circle?",
        "Is there a circle?",
        "Which colour?",
    ]
    assert [r.mode for r in results] == ["dualfocus", "macro", "macro"]
    assert results[2].options == ["red", "blue"]
    # each line repeats the input's id (when it has one), its image as written and its line number
    assert [(line.get("id"), line["image"], line["line"]) for line in lines] == [
        ("q1", "scene.png", 1),
        (None, str(image_file), 2),
        (3, "scene.png", 4),
    ]
    assert "3/3" in captured.err  # the progress bar
    out = tmp_path / "results.jsonl"
    assert main(["ask", "--questions", str(questions), "--output", str(out), *model]) == 0
    assert len(out.read_text().splitlines()) == 3 and capsys.readouterr().out == ""


def test_a_batch_goes_on_past_bad_lines_and_fails_at_the_end(
    image_file: Path, model: list[str], tmp_path: Path, capsys
) -> None:
    (tmp_path / "broken.png").write_bytes(b"not a png")
    questions = write_questions(
        tmp_path,
        [
            {"id": "a", "image": "scene.png", "question": "Colour?"},
            {"id": "b", "image": "nowhere.png", "question": "Colour?"},
            "{not json",
            {"id": "d", "image": "broken.png", "question": "Colour?"},
            {"id": "e", "image": "scene.png", "question": "Shape?"},
        ],
    )
    out = tmp_path / "results.jsonl"
    assert main(["ask", "--questions", str(questions), "--output", str(out), "--mode", "macro", *model]) == 1
    err = capsys.readouterr().err
    assert "3 of 5 questions failed" in err and "Traceback" not in err
    assert "questions.jsonl:2: image file" in err and "nowhere.png' not found" in err
    lines = read_lines(out.read_text())
    assert [line["line"] for line in lines] == [1, 2, 3, 4, 5]  # in order, one per question
    assert ["error" in line for line in lines] == [False, True, True, True, False]
    assert lines[2]["error"].startswith("not JSON") and "not an image" in lines[3]["error"]
    assert [lines[0]["question"], lines[4]["question"]] == ["Colour?", "Shape?"]


def test_resume_skips_what_the_output_already_answers(
    image_file: Path, model: list[str], tmp_path: Path, capsys
) -> None:
    questions = write_questions(
        tmp_path,
        [
            {"id": "a", "image": "scene.png", "question": "Colour?"},
            {"image": "missing.png", "question": "Shape?"},
            {"image": "scene.png", "question": "Count?"},
        ],
    )
    out = tmp_path / "results.jsonl"
    args = ["ask", "--questions", str(questions), "--output", str(out), "--mode", "macro", *model]
    assert main(args) == 1
    (tmp_path / "missing.png").write_bytes(image_file.read_bytes())  # the missing image turns up
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    assert "2 of 3 questions already answered" in capsys.readouterr().err
    lines = read_lines(out.read_text())
    assert [(line["line"], "error" in line) for line in lines] == [
        (1, False),
        (2, True),
        (3, False),
        (2, False),
    ]
    assert main([*args, "--resume"]) == 0  # nothing left: no model needed, nothing written
    assert len(out.read_text().splitlines()) == 4


def test_a_batch_of_only_bad_lines_loads_no_model(tmp_path: Path, monkeypatch, capsys) -> None:
    from df_agent.engine import DualFocus

    monkeypatch.setattr(DualFocus, "from_pretrained", _refuse)
    questions = write_questions(
        tmp_path,
        ['{"image": "scene.png", "question": "ok?"', {"question": "where is the image?"}],
    )
    assert main(["ask", "--questions", str(questions)]) == 1
    out = read_lines(capsys.readouterr().out)
    assert [line["line"] for line in out] == [1, 2]
    assert out[0]["error"].startswith("not JSON") and "needs an 'image'" in out[1]["error"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"question": "where is the image?"}, "needs an 'image'"),
        ({"image": "scene.png", "question": " "}, "needs a non-empty 'question'"),
        ({"image": "scene.png", "question": "q", "mode": "zoom"}, "mode must be one of dualfocus, macro"),
        ({"image": "scene.png", "question": "q", "options": "red"}, "'options' must be non-empty strings"),
        (
            {"image": "scene.png", "question": "q", "options": ["red"]},
            "'options': give 2 to 26 options, not 1",
        ),
        ([1, 2], "not a JSON object"),
    ],
)
def test_bad_lines_are_explained(tmp_path: Path, image_file: Path, line, message: str, capsys) -> None:
    questions = write_questions(tmp_path, [line])
    assert main(["ask", "--questions", str(questions)]) == 1
    captured = capsys.readouterr()
    assert message in read_lines(captured.out)[0]["error"]
    assert f"questions.jsonl:1: {message}" in captured.err


def test_an_empty_questions_file_is_refused(tmp_path: Path, capsys) -> None:
    questions = write_questions(tmp_path, [""])
    assert main(["ask", "--questions", str(questions)]) == 2
    assert "holds no questions" in capsys.readouterr().err


def test_max_pixels_downscales_a_large_image(model: list[str], tmp_path: Path, capsys) -> None:
    path = tmp_path / "wide.png"
    Image.new("RGB", (400, 100), (235, 235, 230)).save(path)
    assert (
        main(["ask", str(path), "Colour?", "--mode", "macro", "--max-pixels", "10000", "--json", *model]) == 0
    )
    captured = capsys.readouterr()
    assert FocusResult.model_validate_json(captured.out).image_size == (200, 50)
    assert "downscaled 400x100 to 200x50" in captured.err


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
def test_a_bad_image_exits_2_with_a_clear_message(
    tmp_path: Path, make, message: str, monkeypatch, capsys
) -> None:
    from df_agent.engine import DualFocus

    monkeypatch.setattr(DualFocus, "from_pretrained", _refuse)  # the image is checked first
    path = make(tmp_path)
    assert main(["ask", str(path), "What is this?"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("df-agent ask: error: ")
    assert message.format(path=path) in err
    assert "Traceback" not in err


def _refuse(*args, **kwargs):
    raise AssertionError("the model was loaded")


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
        (["ask", "scene.png", "q?", "--output", "out.jsonl"], "--output and --resume are for batch mode"),
        (["ask", "--questions", "questions.jsonl", "--resume"], "--resume needs --output"),
        (["ask", "scene.png", "q?", "--option", "red"], "give 2 to 26 options, not 1"),
        (["ask", "scene.png", "q?", "--annotate", "no/such/folder/a.png"], "folder not found"),
        (["ask", "scene.png", "q?", "--annotate", "figure.txt"], "--annotate writes .png"),
        (["ask", "--questions", "questions.jsonl", "--output", "no/dir/out.jsonl"], "folder not found"),
        (["ask", "scene.png", "q?", "--max-pixels", "0"], "--max-pixels must be between 1 and"),
        (
            ["ask", "scene.png", "q?", "--model", "./no-such-model"],
            "--model: folder not found: './no-such-model'",
        ),
        (["ask", "scene.png", "q?", "--model", "/no/such/model"], "folder not found"),
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


def test_help_and_argument_errors_do_not_import_torch() -> None:
    probe = (
        "import sys, contextlib, io\n"
        "from df_agent.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        "    for argv in (['--help'], ['ask', '--help'], ['ask', 'x'], ['ask', 'x', 'q', '--option', 'a']):\n"
        "        try:\n"
        "            code = main(argv)\n"
        "        except SystemExit as exit:\n"
        "            code = exit.code\n"
        "        assert code in (0, 2), (argv, code)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_subcommand_is_listed_and_builds(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    listing = capsys.readouterr().out
    assert all(name in listing for name in ("ask", "eval", "memory", "convert-checkpoint", "mcp"))
    for name in ("eval", "memory", "convert-checkpoint", "mcp"):
        with pytest.raises(SystemExit) as exit:
            main([name, "--help"])
        assert exit.value.code == 0 and "usage: df-agent " + name in capsys.readouterr().out


def test_an_unreachable_hub_fails_at_once_naming_what_to_do(tmp_path: Path) -> None:
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "0",
        "HF_ENDPOINT": f"http://127.0.0.1:{port}",
        "HF_HOME": str(tmp_path),
    }
    image = tmp_path / "scene.png"
    Image.new("RGB", (32, 32), (235, 235, 230)).save(image)
    run = subprocess.run(
        [sys.executable, "-m", "df_agent.cli", "ask", str(image), "q?", "--model", "someone/some-model"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2
    assert "cannot give it (no connection" in run.stderr and "HF_HUB_OFFLINE=1" in run.stderr
    assert "local checkpoint folder" in run.stderr
    assert "Retrying" not in run.stderr and "Traceback" not in run.stderr


def test_offline_mode_names_the_local_cache(tmp_path: Path) -> None:
    from df_agent.backends.checkpoints import CheckpointNotFoundError, resolve_checkpoint

    with pytest.raises(CheckpointNotFoundError, match="not in the local hub cache, and HF_HUB_OFFLINE=1"):
        resolve_checkpoint("someone/not-cached-anywhere")  # the suite runs with HF_HUB_OFFLINE=1
    with pytest.raises(CheckpointNotFoundError, match="is a file"):
        resolve_checkpoint(str(_write(tmp_path / "config.json", b"{}")))
