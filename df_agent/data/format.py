"""The DualFocus training format: one JSON line per grounded question.

Both the FocusShapes generator and the Visual Genome curation write it; the
training recipe reads it and derives the three DualFocus tasks from each record
(macro answer, region as normalised box text, micro answer on [full, crop]).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator

QuestionType = Literal["detail", "global", "exist", "other"]


class FocusRecord(BaseModel):
    """One question about one image, with its answer and the region it is about."""

    id: str = Field(description="Stable id, unique within a data set.")
    image: str = Field(description="Image path, relative to the JSONL file's folder.")
    width: int = Field(gt=0, description="Original image width in pixels.")
    height: int = Field(gt=0, description="Original image height in pixels.")
    question: str = Field(min_length=1)
    answer: str = Field(min_length=1)
    box: tuple[float, float, float, float] = Field(
        description="Target region x1, y1, x2, y2 in original-image pixels."
    )
    qtype: QuestionType = "other"
    source: str = Field(default="unknown", description="focusshapes, visual_genome, ...")

    @model_validator(mode="after")
    def _box_inside_image(self) -> FocusRecord:
        x1, y1, x2, y2 = self.box
        if not (0 <= x1 < x2 <= self.width and 0 <= y1 < y2 <= self.height):
            raise ValueError(f"box {self.box} is empty or outside the {self.width}x{self.height} image")
        return self

    def box_text(self) -> str:
        """The region as the DualFocus models write it: fractions of width/height, 2 decimals."""
        x1, y1, x2, y2 = self.box
        w, h = self.width, self.height
        return f"[{x1 / w:.2f},{y1 / h:.2f},{x2 / w:.2f},{y2 / h:.2f}]"


def write_records(records: Iterable[FocusRecord], path: str | Path) -> int:
    """Write records as JSON lines; returns how many were written."""
    n = 0
    with Path(path).open("w", encoding="utf-8") as f:
        for record in records:
            f.write(record.model_dump_json() + "\n")
            n += 1
    return n


def read_records(path: str | Path) -> Iterator[FocusRecord]:
    """Read records from a JSONL file, naming the line of any malformed record."""
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield FocusRecord.model_validate(json.loads(line))
            except (json.JSONDecodeError, ValueError) as err:
                raise ValueError(f"{path}:{lineno}: not a valid FocusRecord: {err}") from err


__all__ = ["FocusRecord", "QuestionType", "read_records", "write_records"]
