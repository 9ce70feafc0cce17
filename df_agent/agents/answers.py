"""The tools' results: pydantic models for programs, each with the short `summary()` a planner reads.

A result that holds pictures for the planner to look at (the crops of `zoom_region`) returns them from
`pictures()`; the adapters send them as images next to the summary.

Boxes come in two frames, named in every result: ``box``/``crop_box`` are in the pixels of the image the
caller passed (its id is ``frame``: a whole image, or a crop when zooming within a zoom), and
``box_root``/``crop_box_root`` are in the pixels of the root image it was cut from (``root_id``); for a
whole image the two are the same.
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

    def pictures(self) -> list[Image.Image]:
        """Pictures for the planner to look at next to the summary (none by default)."""
        return []


class Framed(ToolAnswer):
    """A result about one image: its id, its root's id, and the sizes of both."""

    image_id: str = Field(description="The image the call was about.")
    root_id: str = Field(description="The root image it was cut from (image_id itself for a whole image).")
    frame: str = Field(description="The image whose pixels box and crop_box are in: image_id.")
    image_size: tuple[int, int] = Field(description="(width, height) of the image the call was about.")
    root_size: tuple[int, int] = Field(description="(width, height) of the root image.")

    def _in(self) -> str:
        """Words naming the frame of `box` / `crop_box`."""
        w, h = self.image_size
        return f"pixels of {self.frame!r} ({w}x{h})"

    def _root(self, box: Box | None) -> str:
        """The root-frame part of a box's description ('' when the image is its own root)."""
        if self.root_id == self.image_id:
            return ""
        w, h = self.root_size
        return f", that is {_box_list(box)} in pixels of the root image {self.root_id!r} ({w}x{h})"


class GlobalAnswer(ToolAnswer):
    """The answer from the whole image (the macro step)."""

    image_id: str
    question: str
    options: list[str] | None = None
    answer: str

    def summary(self) -> str:
        """The text a planner reads."""
        return f"Answer from the whole image: {self.answer}"


class Region(BaseModel):
    """One located region and the crop made from it, in both frames."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    box: Box = Field(description="The located region in pixels of the image passed (the frame).")
    box_root: Box = Field(description="The same region in pixels of the root image.")
    box_normalized: tuple[float, float, float, float] = Field(
        description="The located region as fractions of the image passed's width and height."
    )
    crop_box: Box = Field(description="The square region actually cropped, pixels of the image passed.")
    crop_box_root: Box = Field(description="The cropped region in pixels of the root image.")
    crop_box_normalized: tuple[float, float, float, float]
    crop_id: str = Field(description="The crop's image id, for later calls (as crop_id, or as the image).")
    box_text: str = Field(description="The box as the micro step shows it to the model (the image's frame).")
    crop: Image.Image | None = Field(default=None, exclude=True, repr=False)


class RegionAnswer(Framed):
    """The regions a question is about, as the model located them, and the crop made from each.

    The first region's fields are repeated at the top level (``box``, ``crop_id``, ...), so a caller
    that expects one region reads it there; ``regions`` holds every region the model wrote.
    """

    question: str
    box_text: str = Field(description="The model's reply to the box request, verbatim.")
    box: Box | None = Field(
        description="The (first) located region, pixels of the image passed; None if unreadable."
    )
    box_root: Box | None = Field(default=None, description="The (first) located region in root pixels.")
    box_normalized: tuple[float, float, float, float] | None = Field(
        default=None, description="The located region as fractions of the image's width and height."
    )
    crop_box: Box | None = Field(default=None, description="The square region actually cropped, pixels.")
    crop_box_root: Box | None = Field(default=None, description="The cropped region in root pixels.")
    crop_box_normalized: tuple[float, float, float, float] | None = None
    crop_id: str | None = Field(default=None, description="The (first) crop's image id, for later calls.")
    regions: list[Region] = Field(default_factory=list, description="Every region the model wrote, in order.")
    failure: str | None = Field(default=None, description="Why no box could be read, if none was.")

    @property
    def crop(self) -> Image.Image | None:
        """The (first) crop."""
        return self.regions[0].crop if self.regions else None

    def summary(self) -> str:
        """The text a planner reads."""
        if not self.regions:
            return (
                f"The model gave no readable region ({self.failure}); its reply was {self.box_text!r}. "
                f"Choose a region yourself and call focused_answer with box=[x1, y1, x2, y2] in {self._in()} "
                "(or box_units='fraction')."
            )
        lines = []
        for i, r in enumerate(self.regions, 1):
            label = (
                f"Region {i} of {len(self.regions)}" if len(self.regions) > 1 else "Region for the question"
            )
            lines.append(
                f"{label}: box {_box_list(r.box)} in {self._in()}{self._root(r.box_root)} "
                f"(fractions {_fractions(r.box_normalized)}). Cropped the square region "
                f"{_box_list(r.crop_box)}{self._root(r.crop_box_root)} as crop id {r.crop_id!r}."
            )
        lines.append(
            f"Model's box text {self.box_text!r}. Pass a crop id as crop_id to focused_answer or "
            "arbitrate_answers, or as the image to zoom_region to zoom further into it."
        )
        return "\n".join(lines)

    def pictures(self) -> list[Image.Image]:
        """The crops, in order."""
        return [r.crop for r in self.regions if r.crop is not None]


class FocusedAnswer(Framed):
    """The answer from the image passed and the crop of one region (the micro step)."""

    question: str
    options: list[str] | None = None
    crop_id: str
    crop_box: Box = Field(description="The cropped region in pixels of the image passed (the frame).")
    crop_box_root: Box = Field(description="The cropped region in pixels of the root image.")
    box_text: str = Field(description="The box as the model's conversation showed it.")
    answer: str

    def summary(self) -> str:
        """The text a planner reads."""
        return (
            f"Answer from the zoomed view of region {_box_list(self.crop_box)} in {self._in()}"
            f"{self._root(self.crop_box_root)} (crop id {self.crop_id!r}): {self.answer}"
        )


class ArbitrationAnswer(Framed):
    """The perplexity vote between candidates in the zoomed context of one region."""

    question: str
    crop_id: str
    crop_box: Box = Field(description="The cropped region in pixels of the image passed (the frame).")
    crop_box_root: Box = Field(description="The cropped region in pixels of the root image.")
    arbitration: Arbitration
    answer: str = Field(description="The winning candidate.")

    def summary(self) -> str:
        """The text a planner reads."""
        vote = self.arbitration
        scores = ", ".join(f"{c!r} {s:.3f}" for c, s in zip(vote.candidates, vote.scores, strict=True))
        return (
            f"Winner: {self.answer!r}. Scores (mean negative log-likelihood in the zoomed context of region "
            f"{_box_list(self.crop_box)} in {self._in()}{self._root(self.crop_box_root)}, lower is more "
            f"plausible): {scores}."
        )


class DeeperZoom(BaseModel):
    """``dualfocus_answer(zoom_deeper=True)``: whether it zoomed one level deeper, and how it went.

    The rule: the first zoom's micro answer is scored in the context it was generated in (its mean
    negative log-likelihood; greedy decoding makes this its generation NLL). Above `threshold` the
    model locates the region again inside the crop, the new crop is cut from the root's pixels, and
    the micro step runs on [crop, new crop]. The deeper answer replaces the pipeline's answer when its
    own mean NLL (in its micro context) is lower than the first micro answer's.
    """

    threshold: float = Field(description="The micro answer's mean NLL above which the zoom goes deeper.")
    micro_nll: float | None = Field(default=None, description="The first zoom's micro answer's mean NLL.")
    fired: bool = Field(description="Whether the deeper zoom ran.")
    reason: str = Field(description="Why it ran or not, and what was chosen.")
    box_text: str | None = Field(default=None, description="The model's box reply inside the first crop.")
    box: Box | None = Field(default=None, description="The region located inside the crop, crop pixels.")
    box_root: Box | None = Field(default=None, description="The same region in root pixels.")
    crop_box_root: Box | None = Field(default=None, description="The deeper crop's region in root pixels.")
    crop_id: str | None = Field(default=None, description="The deeper crop's image id.")
    answer: str | None = Field(default=None, description="The deeper micro answer.")
    answer_nll: float | None = Field(default=None, description="Its mean NLL in its micro context.")
    chosen: bool = Field(default=False, description="Whether the deeper answer became the answer.")


class PipelineAnswer(Framed):
    """The whole DualFocus pipeline's result, with the ids a planner can refer to afterwards.

    `result` is the engine's trace (its boxes are in the pixels of the image passed); `answer` is the
    final answer: the trace's, or the deeper zoom's when that was chosen.
    """

    answer: str | None = Field(description="The final answer.")
    crop_id: str | None = Field(default=None, description="The id of the crop looked at, if any.")
    box_root: Box | None = Field(default=None, description="The located region in root pixels.")
    crop_box_root: Box | None = Field(default=None, description="The cropped region in root pixels.")
    result: FocusResult
    deeper: DeeperZoom | None = Field(default=None, description="The deeper zoom, if zoom_deeper was asked.")

    def summary(self) -> str:
        """The text a planner reads."""
        r = self.result
        why = r.fallback or "it won the perplexity vote"
        lines = [f"Answer: {self.answer}"]
        if r.cached:
            lines.append("Answered from memory: the same question about this image was answered before.")
        lines.append(f"Chosen view: {r.path} ({why}).")
        if r.micro_answer is not None:
            lines.append(f"Whole-image answer: {r.macro_answer!r}; zoomed answer: {r.micro_answer!r}.")
        if r.crop_box is not None:
            lines.append(
                f"Region looked at: {_box_list(r.crop_box)} in {self._in()}{self._root(self.crop_box_root)} "
                f"(crop id {self.crop_id!r})."
            )
        if r.scores:
            scores = ", ".join(f"{k} {v:.3f}" for k, v in r.scores.items())
            lines.append(f"Vote (mean negative log-likelihood, lower wins): {scores}.")
        deeper = self.deeper
        if deeper is not None:
            lines.append(f"Deeper zoom: {deeper.reason}.")
            if deeper.crop_id is not None:
                lines.append(
                    f"Deeper region: {_box_list(deeper.crop_box_root)} in pixels of the root image "
                    f"{self.root_id!r} (crop id {deeper.crop_id!r}); its answer: {deeper.answer!r}."
                )
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
    "DeeperZoom",
    "FocusedAnswer",
    "Framed",
    "GlobalAnswer",
    "PastAnswer",
    "PipelineAnswer",
    "RecallAnswer",
    "Region",
    "RegionAnswer",
    "ToolAnswer",
    "preview_png",
]
