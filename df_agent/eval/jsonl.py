"""Any JSONL of ``{image, question, answer}`` as a benchmark, judged by exact match.

One JSON object per line: ``{"image", "question", "answer"}``, where ``image`` is a path relative to
the file's folder (or absolute). Optional fields: ``id``, ``answers`` (a list of accepted answers
instead of ``answer``), ``category`` (or ``qtype``, as the project's DualFocus training records name
it), ``options`` (multiple choice; the answer is then a letter or an option's text) and ``box`` (the
target region ``[x1, y1, x2, y2]`` in image pixels, for IoU). FocusShapes data sets written by
`df_agent.data.focusshapes.write_dataset` are such files.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from df_agent.boxes import Box
from df_agent.eval.harness import Benchmark
from df_agent.eval.items import EvalItem, exact_match


class _JsonlLine(BaseModel):
    id: str | int | None = None
    image: str = Field(min_length=1)
    question: str = Field(min_length=1)
    answer: str | int | None = None
    answers: list[str] | None = None
    category: str | None = None
    qtype: str | None = None
    options: list[str] | None = None
    box: tuple[float, float, float, float] | None = None


def read_jsonl(path: str | Path) -> list[EvalItem]:
    """Read a generic ``{image, question, answer}`` JSONL question file (see the module docstring).

    Raises:
        ValueError: If a line is not JSON, lacks a field or has one of the wrong type, naming the line.
    """
    path = Path(path)
    items = []
    with path.open(encoding="utf-8") as f:
        for lineno, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                line = _JsonlLine.model_validate(json.loads(text))
                answers = line.answers or ([str(line.answer)] if line.answer is not None else None)
                if not answers:
                    raise ValueError("needs 'answer' or 'answers'")
                image = Path(line.image)
                items.append(
                    EvalItem(
                        id=str(line.id) if line.id is not None else f"{path.stem}-{lineno}",
                        image=str(image if image.is_absolute() else path.parent / image),
                        question=line.question,
                        answers=answers,
                        category=line.category or line.qtype or "all",
                        options=line.options,
                        target_box=Box(**dict(zip(("x1", "y1", "x2", "y2"), line.box, strict=True)))
                        if line.box
                        else None,
                    )
                )
            except (json.JSONDecodeError, ValidationError, ValueError) as err:
                raise ValueError(f"{path}:{lineno}: not a valid question line: {_first_error(err)}") from None
    return items


def _first_error(err: Exception) -> str:
    if isinstance(err, ValidationError):
        first = err.errors()[0]
        return f"{'.'.join(str(p) for p in first['loc']) or 'line'}: {first['msg']}"
    return str(err)


def benchmark(path: str | Path) -> Benchmark:
    """The questions of a JSONL file, judged by `df_agent.eval.items.exact_match`."""
    return Benchmark(
        name=Path(path).stem, items=read_jsonl(path), judge=exact_match, settings={"questions": str(path)}
    )


__all__ = ["benchmark", "read_jsonl"]
