"""FocusShapes as a benchmark: fresh scenes from a seed, one question of each type per scene.

Scenes come from `df_agent.data.focusshapes.generate` (so seed S and n N always give the same
questions); answers match when equal after `df_agent.eval.items.normalize_answer` (case and
punctuation). The report has, per question type (``detail``, ``global``, ``exist``) and ``all``:
macro-only, micro-only and DualFocus accuracy, the best-of-two oracle, how often the vote picked each
path, the accuracy of every arbitration method of the engine on the same generations
(``"arbitration": {"official", "own_context", "average"}``), the box failure rate and mean IoU; and at
the top level ``box_parse_failure_rate`` and ``mean_iou_detail`` (IoU of the predicted box with the
asked-about object on detail questions; an unreadable box counts 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from df_agent.boxes import Box
from df_agent.data.focusshapes import generate
from df_agent.eval.harness import Benchmark, ResultRow
from df_agent.eval.items import EvalItem, exact_match

QUESTION_TYPES = ("detail", "global", "exist")


def items(seed: int, n: int, **render_options: Any) -> list[EvalItem]:
    """The questions of `n` fresh scenes of seed `seed`: detail, global and exist for each scene.

    Args:
        seed: The set's seed (use one never used in training).
        n: How many scenes.
        **render_options: Passed to the scene renderer (size, n_objects, ...).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1 scene, got {n}")
    scenes, records = generate(seed, n, **render_options)
    images = {f"images/{scene.id}.png": scene.image for scene in scenes}
    return [
        EvalItem(
            id=record.id,
            image=images[record.image],
            image_id=record.image,
            question=record.question,
            answers=[record.answer],
            category=record.qtype,
            target_box=Box(x1=record.box[0], y1=record.box[1], x2=record.box[2], y2=record.box[3]),
        )
        for record in records
    ]


def _summary(rows: Sequence[ResultRow]) -> dict[str, Any]:
    detail = [row.iou for row in rows if row.category == "detail" and row.iou is not None]
    return {"mean_iou_detail": sum(detail) / len(detail) if detail else 0.0}


def benchmark(seed: int, n: int, **render_options: Any) -> Benchmark:
    """The FocusShapes benchmark of `n` scenes from `seed`, comparing every arbitration method."""
    return Benchmark(
        name="focusshapes",
        items=items(seed, n, **render_options),
        judge=exact_match,
        compare_arbitration=True,
        summarize=_summary,
        settings={"seed": seed, "scenes": n, **render_options},
    )


__all__ = ["QUESTION_TYPES", "benchmark", "items"]
