"""The model shipped in the package: loads with the Auto classes, finds the object a question names,
reads its digit through the zoom where the whole image cannot, and answers existence questions
(see df_agent/model/README.md for its figures)."""

from __future__ import annotations

from pathlib import Path

import pytest

from df_agent import Box, DualFocus
from df_agent.data.focusshapes import generate

MODEL = Path(__file__).resolve().parents[1] / "df_agent" / "model"


@pytest.fixture(scope="module")
def engine() -> DualFocus:
    return DualFocus.from_pretrained(device="cpu")


@pytest.fixture(scope="module")
def held_out():
    """30 scenes from a seed no training batch uses (training seeds are strings "train:...")."""
    scenes, records = generate(seed=31337, n_scenes=30)
    return {f"images/{s.id}.png": s.image for s in scenes}, records


def test_shipped_model_is_small_and_loads_with_the_auto_classes() -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    assert sum(f.stat().st_size for f in MODEL.iterdir()) < 20 * 2**20
    model = AutoModelForImageTextToText.from_pretrained(MODEL)
    assert model.config.model_type == "llava" and AutoProcessor.from_pretrained(MODEL).chat_template


@pytest.mark.slow
def test_shipped_model_boxes_the_object_the_question_names(engine, held_out) -> None:
    images, records = held_out
    details = [r for r in records if r.qtype == "detail"]
    ious = []
    for r in details:
        location = engine.locate(images[r.image], r.question)
        target = Box(x1=r.box[0], y1=r.box[1], x2=r.box[2], y2=r.box[3])
        ious.append(location.box.iou(target) if location.box is not None else 0.0)
    # Measured 0.655 on 300 scenes (0.66 here); a box at the typical position scores ~0.03.
    assert sum(ious) / len(ious) >= 0.5


@pytest.mark.slow
def test_shipped_model_reads_the_digit_through_the_zoom_not_the_whole_image(engine, held_out) -> None:
    images, records = held_out
    details = [r for r in records if r.qtype == "detail"]
    results = [engine.ask(images[r.image], r.question) for r in details]
    dualfocus = sum(res.answer == r.answer for res, r in zip(results, details, strict=True))
    macro = sum(res.macro_answer == r.answer for res, r in zip(results, details, strict=True))
    # Measured on 300 scenes: DualFocus 0.900, macro-only 0.133 (chance 0.10); here 28 vs 6 of 30.
    assert dualfocus >= macro + 0.5 * len(details)


@pytest.mark.slow
def test_shipped_model_answers_existence_from_the_whole_image(engine, held_out) -> None:
    images, records = held_out
    exist = [r for r in records if r.qtype == "exist"]
    assert {r.answer for r in exist} == {"yes", "no"}
    right = sum(engine.macro(images[r.image], r.question) == r.answer for r in exist)
    # Measured 0.94 on 300 scenes (29 of 30 here); always answering one way scores 0.5.
    assert right >= 0.85 * len(exist)
