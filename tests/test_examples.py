"""`examples/`: the committed scenes and questions are exactly what `make_examples.py` writes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_script():
    spec = importlib.util.spec_from_file_location("make_examples", EXAMPLES / "make_examples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_regenerating_gives_the_committed_files(tmp_path: Path) -> None:
    lines = load_script().main(tmp_path)
    assert (tmp_path / "questions.jsonl").read_text() == (EXAMPLES / "questions.jsonl").read_text()
    for k in range(3):
        with Image.open(tmp_path / f"scene_{k}.png") as new, Image.open(EXAMPLES / f"scene_{k}.png") as old:
            assert new.size == old.size == (320, 320) and new.tobytes() == old.tobytes()
    assert [line["category"] for line in lines] == ["detail", "global", "exist"] * 3


def test_scene_0_answers_the_demo_question() -> None:
    first = json.loads((EXAMPLES / "questions.jsonl").read_text().splitlines()[0])
    assert (first["image"], first["question"]) == ("scene_0.png", "What number is on the red circle?")
    assert first["answer"].isdigit()
    x1, y1, x2, y2 = first["box"]
    with Image.open(EXAMPLES / "scene_0.png") as scene:  # the box holds the red circle's pixels
        region = np.asarray(scene.convert("RGB").crop((x1, y1, x2, y2))).astype(int)
    red = (region[..., 0] > 200) & (region[..., 1] < 60) & (region[..., 2] < 60)
    assert red.mean() > 0.5
