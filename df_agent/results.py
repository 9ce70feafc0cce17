"""The trace of one DualFocus question, and of each step: pydantic models that serialise to JSON."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from df_agent.boxes import Box

Mode = Literal["dualfocus", "macro", "micro", "auto", "search"]
Path = Literal["macro", "micro"]
ArbitrationMethod = Literal["official", "own_context", "average"]
# The vote that decided between the macro and the micro answer (see `DualFocus`): a perplexity vote
# scored by the backend (the three `ArbitrationMethod`s), each answer's own generation mean NLL, the
# micro answer by policy, or a judge turn.
Vote = Literal["official", "own_context", "average", "generation_logprobs", "micro_policy", "judge"]
UnscoredVote = Literal["micro_policy", "judge"]

# Fields that differ between two runs of the same question or between the paths (a session asks for
# the box together with the macro answer even where mode="auto" then skips the zoom).
_RUN_FIELDS = {"timings", "created_at", "model_calls"}
# Float fields compared with a tolerance by `result_differences`.
_SCORE_FIELDS = {"macro_nll"}


class Location(BaseModel):
    """What the region step produced: the model's raw box text and the boxes read from it.

    A model may write several boxes (see `df_agent.boxes.parse_boxes`): `boxes` holds every readable
    one in the order written and `box` is the first; where the model writes one box, ``boxes ==
    [box]``.
    """

    box_text: str = Field(description="The model's reply to the box request, verbatim.")
    box: Box | None = Field(description="The first readable region, original-image pixels; None if none.")
    boxes: list[Box] = Field(
        default_factory=list,
        description="Every readable region in original-image pixels, in the order written; the first is box.",
    )
    dropped: list[str] = Field(
        default_factory=list,
        description="Why each unreadable box among several was left out ('box 2: ...'); [] for one box.",
    )
    failure: str | None = Field(default=None, description="Why no box could be read, if none was.")

    @model_validator(mode="after")
    def _first_is_box(self) -> Location:
        if not self.boxes and self.box is not None:
            self.boxes = [self.box]
        if (self.boxes[0] if self.boxes else None) != self.box:
            raise ValueError("Location.box must be the first of Location.boxes")
        return self


class Zoom(BaseModel):
    """The region actually cropped (square, margin, minimum side, clipped) and the crop itself."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    box: Box = Field(description="The crop's box in original-image pixels.")
    crop: Image.Image = Field(exclude=True, repr=False)


class FocusRegion(BaseModel):
    """One region the micro step looked at: the model's box and the square region cropped for it."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    box: Box = Field(description="The model's box in original-image pixels.")
    crop_box: Box = Field(
        description="The region cropped for it (squared, margin, minimum side, clipped), original pixels."
    )
    crop: Image.Image | None = Field(default=None, exclude=True, repr=False)


class Arbitration(BaseModel):
    """The perplexity vote: each candidate's mean negative log-likelihood (lower is better)."""

    method: ArbitrationMethod
    candidates: list[str]
    scores: list[float] = Field(description="Mean NLL per candidate, same order; lower is more plausible.")
    winner: int = Field(description="Index of the candidate with the lowest score.")

    @property
    def answer(self) -> str:
        """The winning candidate."""
        return self.candidates[self.winner]


class TileSearch(BaseModel):
    """mode="search": the tiles a large image was split into, how each was ranked, and the tile chosen."""

    presence_question: str | None = Field(
        default=None, description='The existence question asked of every tile ("Is there a red circle?").'
    )
    tiles: list[Box] = Field(
        default_factory=list, description="The tiles in root-image pixels, row by row; [] when not tiled."
    )
    scores: list[float] | None = Field(
        default=None, description="Each tile's presence score, same order; higher: the object more likely."
    )
    ranked_by: Literal["prompt_logprobs", "generation_logprobs"] | None = Field(
        default=None, description="What scores are: log-odds of yes over no (scored) or generated yes/no."
    )
    tile: Box | None = Field(
        default=None, description="The chosen tile (root pixels) DualFocus ran on; None: the whole image."
    )
    model_calls: int = Field(default=0, description="Backend requests the ranking took.")
    reason: str = Field(description="What the search did and why (tiled and ranked, or why not).")


class FocusResult(BaseModel):
    """The answer to one question and its full trace."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    question: str
    options: list[str] | None = None
    image_hash: str
    image_size: tuple[int, int] = Field(description="(width, height) of the original image.")
    model_id: str
    mode: Mode
    answer: str | None = Field(
        description="The answer; with options always an option letter, or None when neither answer is one."
    )
    path: Path | None = Field(description="Which candidate became the answer (None: no answer).")
    macro_answer: str | None = None
    micro_answer: str | None = None
    box_text: str | None = Field(default=None, description="The model's raw reply to the box request.")
    box: Box | None = Field(default=None, description="The region read from box_text, original pixels.")
    crop_box: Box | None = Field(default=None, description="The square region that was cropped.")
    regions: list[FocusRegion] = Field(
        default_factory=list,
        description="Every region the micro step looked at, in the order written (the first: box, "
        "crop_box); more than one only with DualFocus(max_regions>1). [] when there was no zoom.",
    )
    scores: dict[str, float] | None = Field(
        default=None, description="Mean NLL of each candidate keyed by path; None when no vote ran."
    )
    arbitration: ArbitrationMethod | None = Field(
        default=None, description="The perplexity vote's scoring method, when the backend scored the answers."
    )
    vote: Vote | None = Field(default=None, description="The vote that chose between the two answers.")
    vote_reason: str | None = Field(default=None, description="Why that vote ran (what the backend offers).")
    fallback: str | None = Field(
        default=None, description="Why no vote chose the answer (no box, answers agree, no option letter...)."
    )
    macro_nll: float | None = Field(
        default=None, description='mode="auto": the macro answer\'s own mean NLL (lower is more confident).'
    )
    auto_threshold: float | None = Field(
        default=None, description='mode="auto": the macro_nll at or below which the zoom is skipped.'
    )
    auto_reason: str | None = Field(
        default=None, description='mode="auto": where the confidence came from, or why there was none.'
    )
    search: TileSearch | None = Field(default=None, description='mode="search": the tiles, the one chosen.')
    model_calls: int = Field(
        default=0,
        description="Backend requests this answer took: each generation and each scoring call counts one.",
    )
    timings: dict[str, float] = Field(default_factory=dict, description="Seconds spent in each step.")
    cached: bool = Field(default=False, description="True when answered from memory, not the model.")
    warnings: list[str] = Field(
        default_factory=list,
        description="What to doubt: a demonstration model, words the tokenizer does not know, an image "
        "unlike the model's training data.",
    )
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    crop: Image.Image | None = Field(default=None, exclude=True, repr=False)

    def plot(self, image: Image.Image | str, *, source: str | None = None):
        """A matplotlib figure explaining this result (see `df_agent.visualize.figure`)."""
        from df_agent.visualize import figure

        return figure(self, image, source=source)


def result_differences(first: FocusResult, second: FocusResult, *, atol: float = 1e-4) -> list[str]:
    """What differs between two results of one question (timings, model calls aside): [] if they agree.

    Scores (mean NLLs: `scores`, `macro_nll`) agree when within `atol`; every other field must be
    equal (texts, boxes, paths, votes, reasons).

    Args:
        first: One result, e.g. from ``DualFocus(backend, session=False).ask``.
        second: The other, e.g. from ``DualFocus(backend).ask``.
        atol: The largest score difference that still counts as the same.
    """
    differences = []
    a, b = first.model_dump(exclude=_RUN_FIELDS), second.model_dump(exclude=_RUN_FIELDS)
    for name in a:
        x, y = a[name], b[name]
        if name == "scores" and x and y and x.keys() == y.keys():
            same = all(abs(x[k] - y[k]) <= atol for k in x)
        elif name in _SCORE_FIELDS and isinstance(x, float) and isinstance(y, float):
            same = abs(x - y) <= atol
        else:
            same = x == y
        if not same:
            differences.append(f"{name}: {x!r} != {y!r}")
    return differences


__all__ = [
    "Arbitration",
    "ArbitrationMethod",
    "FocusRegion",
    "FocusResult",
    "Location",
    "Mode",
    "Path",
    "TileSearch",
    "UnscoredVote",
    "Vote",
    "Zoom",
    "result_differences",
]
