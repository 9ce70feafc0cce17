"""The tools' input models: each tool's arguments, written once, described for a planner.

Every field's description is read from ``prompts/_tools/fields.toml``, so the LangChain tools and the
MCP server describe each argument with the same words. The models forbid unknown arguments and strip
surrounding whitespace from texts, so a bad argument gets the same answer on every surface.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from df_agent.prompt_sets import OPTION_LETTERS

_FIELDS: dict[str, str] = tomllib.loads(
    (resources.files("df_agent.prompts") / "_tools" / "fields.toml").read_text(encoding="utf-8")
)

BoxUnits = Literal["pixels", "fraction"]
BoxFrame = Literal["image", "root"]
Text = Annotated[str, Field(min_length=1)]
ImageArg = Annotated[str, Field(min_length=1, description=_FIELDS["image"])]
QuestionArg = Annotated[str, Field(min_length=1, description=_FIELDS["question"])]
OptionsArg = Annotated[
    list[Text] | None, Field(max_length=len(OPTION_LETTERS), description=_FIELDS["options"])
]
CropIdArg = Annotated[str | None, Field(min_length=1, description=_FIELDS["crop_id"])]
BoxArg = Annotated[list[float] | None, Field(min_length=4, max_length=4, description=_FIELDS["box"])]
BoxUnitsArg = Annotated[BoxUnits, Field(description=_FIELDS["box_units"])]
BoxFrameArg = Annotated[BoxFrame, Field(description=_FIELDS["box_frame"])]
ZoomDeeperArg = Annotated[bool, Field(description=_FIELDS["zoom_deeper"])]
CandidatesArg = Annotated[list[Text], Field(min_length=2, description=_FIELDS["candidates"])]
RecallQuestionArg = Annotated[str, Field(min_length=1, description=_FIELDS["recall_question"])]
RecallImageArg = Annotated[str | None, Field(min_length=1, description=_FIELDS["recall_image"])]
RecallKArg = Annotated[int, Field(ge=1, le=20, strict=True, description=_FIELDS["recall_k"])]


class ToolInput(BaseModel):
    """Base of the input models: unknown arguments are refused, texts are stripped."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class AskInput(ToolInput):
    """An image and a question about it (`dualfocus_answer`, `global_answer`)."""

    image: ImageArg
    question: QuestionArg
    options: OptionsArg = None


class PipelineInput(AskInput):
    """An image, a question, and whether to zoom one level deeper when unsure (`dualfocus_answer`)."""

    zoom_deeper: ZoomDeeperArg = False


class ZoomInput(ToolInput):
    """An image and the question whose region to find (`zoom_region`)."""

    image: ImageArg
    question: QuestionArg


class FocusedInput(ToolInput):
    """An image, a question and the region to zoom into (`focused_answer`)."""

    image: ImageArg
    question: QuestionArg
    crop_id: CropIdArg = None
    box: BoxArg = None
    box_units: BoxUnitsArg = "pixels"
    box_frame: BoxFrameArg = "image"
    options: OptionsArg = None


class ArbitrateInput(ToolInput):
    """An image, a question, candidate answers and the region whose zoomed context scores them."""

    image: ImageArg
    question: QuestionArg
    candidates: CandidatesArg
    crop_id: CropIdArg = None
    box: BoxArg = None
    box_units: BoxUnitsArg = "pixels"
    box_frame: BoxFrameArg = "image"


class RecallInput(ToolInput):
    """A question to find similar past questions for, optionally about one image (`recall_visual_qa`)."""

    question: RecallQuestionArg
    image: RecallImageArg = None
    k: RecallKArg = 5


__all__ = [
    "ArbitrateInput",
    "AskInput",
    "BoxFrame",
    "BoxUnits",
    "FocusedInput",
    "PipelineInput",
    "RecallInput",
    "ToolInput",
    "ZoomInput",
]
