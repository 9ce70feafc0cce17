"""FocusShapes as a benchmark: fresh scenes from a seed, one question of each type per scene.

Scenes come from `df_agent.data.focusshapes.generate` (so seed S and n N always give the same
questions); answers match when equal after `df_agent.eval.items.normalize_answer` (case and
punctuation). The report has, per question type (``detail``, ``global``, ``exist``) and ``all``:
macro-only, micro-only and DualFocus accuracy, the best-of-two oracle, how often the vote picked each
path, the accuracy of every arbitration method of the engine on the same generations
(``"arbitration": {"official", "own_context", "average"}``), the box failure rate and mean IoU; and at
the top level ``box_parse_failure_rate`` and ``mean_iou_detail`` (IoU of the predicted box with the
asked-about object on detail questions; an unreadable box counts 0), and ``lookalikes``: which object
the errors mistook for the one asked about (see `lookalikes`).

FocusShapes-HR (`benchmark_hr`, ``df-agent eval focusshapes-hr``) is the same on the ``"hr"`` preset's
1280 px canvases, and asks each question a second time with ``mode="search"``: the report adds the
search pass's accuracy (``"mode": {"search": ...}``) and every pass's mean model calls per question
(``model_calls_per_question``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from functools import partial
from typing import Any

from df_agent.boxes import Box
from df_agent.data.focusshapes import PRESETS, Scene, generate
from df_agent.data.format import FocusRecord
from df_agent.eval.harness import Benchmark, ResultRow
from df_agent.eval.items import EvalItem, exact_match, normalize_answer

QUESTION_TYPES = ("detail", "global", "exist")


def items(seed: int, n: int, **render_options: Any) -> list[EvalItem]:
    """The questions of `n` fresh scenes of seed `seed`: detail, global and exist for each scene.

    Args:
        seed: The set's seed (use one never used in training).
        n: How many scenes.
        **render_options: Passed to the scene renderer (size, n_objects, ...).
    """
    return _items(*_generate(seed, n, **render_options))


def _generate(seed: int, n: int, **render_options: Any) -> tuple[dict[str, Scene], list[FocusRecord]]:
    """The scenes by the image name their records use, and the records."""
    if n < 1:
        raise ValueError(f"n must be >= 1 scene, got {n}")
    scenes, records = generate(seed, n, **render_options)
    return {f"images/{scene.id}.png": scene for scene in scenes}, records


def _items(scenes: dict[str, Scene], records: list[FocusRecord]) -> list[EvalItem]:
    return [
        EvalItem(
            id=record.id,
            image=scenes[record.image].image,
            image_id=record.image,
            question=record.question,
            answers=[record.answer],
            category=record.qtype,
            target_box=_box(record.box),
        )
        for record in records
    ]


def _box(xyxy: Sequence[float]) -> Box:
    x1, y1, x2, y2 = xyxy
    return Box(x1=x1, y1=y1, x2=x2, y2=y2)


# what a scene with an absent object holds that looks like it: (same colour present, same shape present)
_LOOKALIKE = {
    (True, True): "both",
    (True, False): "same_color",
    (False, True): "same_shape",
    (False, False): "neither",
}


def _asked(question: str) -> tuple[str, str]:
    """The (colour, shape) an existence question names: "Is there a green square?"."""
    color, shape = question.rstrip("?").split()[-2:]
    return color, shape


def lookalikes(rows: Sequence[ResultRow], scenes: dict[str, Scene]) -> dict:
    """Which object the model took for the one asked about (`scenes`: by the rows' image names).

    - ``detail_box_on``: where each detail question's box landed: on the ``target``, on another object of
      the ``same_color`` or the ``same_shape``, on an ``other_object``, on the ``background`` (IoU < 0.1
      with every object) or ``no_box`` (unreadable).
    - ``exist_no``: DualFocus accuracy on the questions whose answer is "no", by what the scene has that
      looks like the object named: an object of the ``same_color``, of the ``same_shape``, ``both`` or
      ``neither``.
    - ``color_answer``: on "What color is the <shape>?", whether the DualFocus answer is the colour of
      the ``asked`` object, of ``another_object`` or of ``no_object`` in the scene.
    """
    box_on: Counter[str] = Counter()
    exist_no: dict[str, list[float]] = {}
    color_answer: Counter[str] = Counter()
    for row in rows:
        scene, question = scenes[row.image], row.result.question
        if row.category == "detail":
            target = next(o for o in scene.objects if f"the {o.name}?" in question)
            box = row.result.box
            if box is None:
                box_on["no_box"] += 1
                continue
            overlap, hit = max(((box.iou(_box(o.box)), o) for o in scene.objects), key=lambda pair: pair[0])
            box_on[
                "background" if overlap < 0.1 else "target" if hit is target else
                "same_color" if hit.color == target.color else
                "same_shape" if hit.shape == target.shape else "other_object"
            ] += 1  # fmt: skip
        elif row.category == "exist" and row.gold == ["no"]:
            color, shape = _asked(question)
            same_color = any(o.color == color for o in scene.objects)
            same_shape = any(o.shape == shape for o in scene.objects)
            exist_no.setdefault(_LOOKALIKE[same_color, same_shape], []).append(row.correct["dualfocus"])
        elif row.category == "global" and question.startswith("What color"):
            answer = normalize_answer(row.predictions["dualfocus"])
            color_answer[
                "asked" if row.correct["dualfocus"] else
                "another_object" if any(o.color == answer for o in scene.objects) else "no_object"
            ] += 1  # fmt: skip
    return {
        "detail_box_on": dict(box_on),
        "exist_no": {k: {"n": len(v), "dualfocus": sum(v) / len(v)} for k, v in sorted(exist_no.items())},
        "color_answer": dict(color_answer),
    }


def _summary(rows: Sequence[ResultRow], scenes: dict[str, Scene]) -> dict[str, Any]:
    detail = [row.iou for row in rows if row.category == "detail" and row.iou is not None]
    return {
        "mean_iou_detail": sum(detail) / len(detail) if detail else 0.0,
        "lookalikes": lookalikes(rows, scenes),
    }


def benchmark(seed: int, n: int, **render_options: Any) -> Benchmark:
    """The FocusShapes benchmark of `n` scenes from `seed`, comparing every arbitration method."""
    scenes, records = _generate(seed, n, **render_options)
    return Benchmark(
        name="focusshapes",
        items=_items(scenes, records),
        judge=exact_match,
        compare_arbitration=True,
        summarize=partial(_summary, scenes=scenes),
        settings={"seed": seed, "scenes": n, **render_options},
    )


def benchmark_hr(seed: int, n: int) -> Benchmark:
    """FocusShapes-HR: `n` scenes of the "hr" preset from `seed`, each question also asked in search mode.

    Macro-only, micro-only and DualFocus come from the DualFocus pass, as for FocusShapes; search mode
    is a second pass per question (`Benchmark.modes`).
    """
    scenes, records = _generate(seed, n, preset="hr")
    return Benchmark(
        name="focusshapes-hr",
        items=_items(scenes, records),
        judge=exact_match,
        summarize=partial(_summary, scenes=scenes),
        settings={"seed": seed, "scenes": n, "preset": "hr", **PRESETS["hr"]},
        modes=("search",),
    )


__all__ = ["QUESTION_TYPES", "benchmark", "benchmark_hr", "items", "lookalikes"]
