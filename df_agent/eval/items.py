"""The question every benchmark reader produces, and exact-match judging of short answers."""

from __future__ import annotations

import re
import string

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from df_agent.boxes import Box
from df_agent.prompt_sets import OPTION_LETTERS

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


class EvalItem(BaseModel):
    """One benchmark question: the image, the question, the accepted answers and how to file it."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    id: str = Field(description="Unique within the run; results are resumed by it.")
    image: str | Image.Image = Field(description="A path, a data URI, or an image in memory.")
    question: str = Field(min_length=1)
    answers: list[str] = Field(min_length=1, description="Accepted answers (TextVQA: the ten human ones).")
    category: str = Field(default="all", description="The group this question is reported under.")
    options: list[str] | None = Field(default=None, description="Multiple-choice options, if any.")
    target_box: Box | None = Field(default=None, description="The region the question is about.")
    image_id: str | None = Field(default=None, description="How result rows name an in-memory image.")

    @property
    def image_name(self) -> str:
        """How the image is named in result rows: `image_id`, its path, "<data URI>" or "<in memory>"."""
        if self.image_id is not None:
            return self.image_id
        if not isinstance(self.image, str):
            return "<in memory>"
        return "<data URI>" if self.image.startswith("data:") else self.image


def normalize_answer(text: str) -> str:
    """Lower case, punctuation removed, runs of white space made one space: "Red." -> "red"."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def exact_match(prediction: str, item: EvalItem) -> float:
    """1.0 if the prediction equals an accepted answer once both are normalised, else 0.0.

    With options, an answer given as an option's text also matches that option's letter.
    """
    accepted = {normalize_answer(a) for a in item.answers}
    if item.options:
        for letter, option in zip(OPTION_LETTERS, item.options, strict=False):
            if normalize_answer(option) in accepted or letter.lower() in accepted:
                accepted |= {letter.lower(), normalize_answer(option)}
    return float(normalize_answer(prediction) in accepted)


__all__ = ["EvalItem", "exact_match", "normalize_answer"]
