"""The trace of one DualFocus question, and of each step: pydantic models that serialise to JSON."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from df_agent.boxes import Box

Mode = Literal["dualfocus", "macro", "micro", "auto"]
Path = Literal["macro", "micro"]
ArbitrationMethod = Literal["official", "own_context", "average"]


class Location(BaseModel):
    """What the region step produced: the model's raw box text and the box read from it."""

    box_text: str = Field(description="The model's reply to the box request, verbatim.")
    box: Box | None = Field(description="The region in original-image pixels, or None if unreadable.")
    failure: str | None = Field(default=None, description="Why no box could be read, if none was.")


class Zoom(BaseModel):
    """The region actually cropped (square, margin, minimum side, clipped) and the crop itself."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    box: Box = Field(description="The crop's box in original-image pixels.")
    crop: Image.Image = Field(exclude=True, repr=False)


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


class FocusResult(BaseModel):
    """The answer to one question and its full trace."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    question: str
    options: list[str] | None = None
    image_hash: str
    image_size: tuple[int, int] = Field(description="(width, height) of the original image.")
    model_id: str
    mode: Mode
    answer: str
    path: Path = Field(description="Which candidate became the answer.")
    macro_answer: str | None = None
    micro_answer: str | None = None
    box_text: str | None = Field(default=None, description="The model's raw reply to the box request.")
    box: Box | None = Field(default=None, description="The region read from box_text, original pixels.")
    crop_box: Box | None = Field(default=None, description="The square region that was cropped.")
    scores: dict[str, float] | None = Field(
        default=None, description="Mean NLL of each candidate keyed by path; None when no vote ran."
    )
    arbitration: ArbitrationMethod | None = None
    fallback: str | None = Field(default=None, description="Why the macro answer stood without a vote.")
    macro_nll: float | None = Field(
        default=None, description='mode="auto": the macro answer\'s own mean NLL (lower is more confident).'
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

    def plot(self, image: Image.Image, *, source: str | None = None):
        """A matplotlib figure explaining this result (see `df_agent.visualize.figure`)."""
        from df_agent.visualize import figure

        return figure(self, image, source=source)


__all__ = ["Arbitration", "ArbitrationMethod", "FocusResult", "Location", "Mode", "Path", "Zoom"]
