"""The tools' results: pydantic models for programs, each with the short `summary()` a planner reads.

A result that holds a picture for the planner to look at (the crop of `zoom_region`) returns it from
`picture()`; the adapters send it as an image next to the summary.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from df_agent.boxes import Box
from df_agent.results import Arbitration, FocusResult

PREVIEW_MAX_SIDE = 768


def _box_list(box: Box | None) -> str:
    return "none" if box is None else "[" + ", ".join(f"{v:.0f}" for v in box.as_tuple()) + "]"


def _fractions(values: Sequence[float] | None) -> str:
    return "none" if values is None else "[" + ", ".join(f"{v:.3f}" for v in values) + "]"


def preview_png(image: Image.Image, max_side: int = PREVIEW_MAX_SIDE) -> bytes:
    """`image` as PNG bytes, scaled down (never up) so that its longer side is at most `max_side`."""
    if max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class ToolAnswer(BaseModel):
    """Base of the tools' results."""

    def summary(self) -> str:
        """The text a planner reads."""
        raise NotImplementedError

    def picture(self) -> Image.Image | None:
        """A picture for the planner to look at next to the summary, if the result has one."""
        return None


class GlobalAnswer(ToolAnswer):
    """The answer from the whole image (the macro step)."""

    image_id: str
    question: str
    options: list[str] | None = None
    answer: str

    def summary(self) -> str:
        """The text a planner reads."""
        return f"Answer from the whole image: {self.answer}"


class RegionAnswer(ToolAnswer):
    """The region a question is about, as the model located it, and the crop made from it."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    image_id: str
    question: str
    image_size: tuple[int, int] = Field(description="(width, height) of the original image.")
    box_text: str = Field(description="The model's reply to the box request, verbatim.")
    box: Box | None = Field(description="The located region in original-image pixels; None if unreadable.")
    box_normalized: tuple[float, float, float, float] | None = Field(
        default=None, description="The located region as fractions of the image's width and height."
    )
    crop_box: Box | None = Field(default=None, description="The square region actually cropped, pixels.")
    crop_box_normalized: tuple[float, float, float, float] | None = None
    crop_id: str | None = Field(default=None, description="The crop's image id, for later calls.")
    failure: str | None = Field(default=None, description="Why no box could be read, if none was.")
    crop: Image.Image | None = Field(default=None, exclude=True, repr=False)

    def summary(self) -> str:
        """The text a planner reads."""
        w, h = self.image_size
        if self.box is None:
            return (
                f"The model gave no readable region ({self.failure}); its reply was {self.box_text!r}. "
                f"Choose a region yourself and call focused_answer with box=[x1, y1, x2, y2] in pixels of "
                f"the {w}x{h} image (or box_units='fraction')."
            )
        return (
            f"Region for the question: box {_box_list(self.box)} in pixels of the {w}x{h} image "
            f"(fractions {_fractions(self.box_normalized)}); model's box text {self.box_text!r}. "
            f"Cropped the square region {_box_list(self.crop_box)} as crop id {self.crop_id!r}: pass it as "
            "crop_id to focused_answer or arbitrate_answers."
        )

    def picture(self) -> Image.Image | None:
        """The crop."""
        return self.crop


class FocusedAnswer(ToolAnswer):
    """The answer from the full image and the crop of one region (the micro step)."""

    image_id: str
    question: str
    options: list[str] | None = None
    crop_id: str
    crop_box: Box = Field(description="The cropped region in original-image pixels.")
    box_text: str = Field(description="The box as the model's conversation showed it.")
    answer: str

    def summary(self) -> str:
        """The text a planner reads."""
        return (
            f"Answer from the zoomed view of region {_box_list(self.crop_box)} px "
            f"(crop id {self.crop_id!r}): {self.answer}"
        )


class ArbitrationAnswer(ToolAnswer):
    """The perplexity vote between candidates in the zoomed context of one region."""

    image_id: str
    question: str
    crop_id: str
    crop_box: Box
    arbitration: Arbitration
    answer: str = Field(description="The winning candidate.")

    def summary(self) -> str:
        """The text a planner reads."""
        vote = self.arbitration
        scores = ", ".join(f"{c!r} {s:.3f}" for c, s in zip(vote.candidates, vote.scores, strict=True))
        return (
            f"Winner: {self.answer!r}. Scores (mean negative log-likelihood in the zoomed context of region "
            f"{_box_list(self.crop_box)} px, lower is more plausible): {scores}."
        )


class PipelineAnswer(ToolAnswer):
    """The whole DualFocus pipeline's result, with the ids a planner can refer to afterwards."""

    image_id: str
    crop_id: str | None = Field(default=None, description="The id of the crop looked at, if any.")
    result: FocusResult

    def summary(self) -> str:
        """The text a planner reads."""
        r = self.result
        w, h = r.image_size
        why = r.fallback or "it won the perplexity vote"
        lines = [f"Answer: {r.answer}"]
        if r.cached:
            lines.append("Answered from memory: the same question about this image was answered before.")
        lines.append(f"Chosen view: {r.path} ({why}).")
        if r.micro_answer is not None:
            lines.append(f"Whole-image answer: {r.macro_answer!r}; zoomed answer: {r.micro_answer!r}.")
        if r.crop_box is not None:
            lines.append(
                f"Region looked at: {_box_list(r.crop_box)} in pixels of the {w}x{h} image "
                f"(crop id {self.crop_id!r})."
            )
        if r.scores:
            scores = ", ".join(f"{k} {v:.3f}" for k, v in r.scores.items())
            lines.append(f"Vote (mean negative log-likelihood, lower wins): {scores}.")
        return "\n".join(lines)


class PastAnswer(BaseModel):
    """A logged answer found by recall, its distance to the query, and the id of its image if held."""

    record_id: str
    distance: float = Field(description="Cosine distance to the query; smaller is more similar.")
    image_id: str | None = Field(default=None, description="The id of its image, if the registry holds it.")
    result: FocusResult


class RecallAnswer(ToolAnswer):
    """Past questions and answers similar to a question."""

    question: str
    image_id: str | None = Field(default=None, description="The image the search was limited to, if any.")
    records: list[PastAnswer]

    def summary(self) -> str:
        """The text a planner reads."""
        scope = f" about image {self.image_id!r}" if self.image_id else ""
        if not self.records:
            return f"No past questions{scope} are similar to {self.question!r}."
        lines = [f"{len(self.records)} past answer(s){scope} similar to {self.question!r}, closest first:"]
        for i, past in enumerate(self.records, 1):
            image = f", image {past.image_id!r}" if past.image_id and not self.image_id else ""
            lines.append(
                f"{i}. Q: {past.result.question!r} A: {past.result.answer!r} "
                f"(distance {past.distance:.3f}{image}, {past.result.created_at:%Y-%m-%d})"
            )
        return "\n".join(lines)


__all__ = [
    "PREVIEW_MAX_SIDE",
    "ArbitrationAnswer",
    "FocusedAnswer",
    "GlobalAnswer",
    "PastAnswer",
    "PipelineAnswer",
    "RecallAnswer",
    "RegionAnswer",
    "ToolAnswer",
    "preview_png",
]
