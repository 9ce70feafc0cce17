"""The DualFocus steps as LangChain tools: one `BaseTool` per step, plus the whole pipeline.

Every tool answers with ``(content, artifact)``: short text (and, for `zoom_region`, the crop as an
image block) for the planner, the step's pydantic result for the program. Planner mistakes become
`ToolException` messages (``handle_tool_error=True``); malformed arguments become a message naming
each bad field. The engine's steps run as nested child runs of the tool run, so any callback handler
sees each step's inputs and outputs (the zoom box, both candidates' scores).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any, Literal

from langchain_core.callbacks import CallbackManagerForChainRun, CallbackManagerForToolRun
from langchain_core.messages.content import create_image_block, create_text_block
from langchain_core.tools import ArgsSchema, BaseTool, ToolException
from pydantic import BaseModel, ValidationError

from df_agent.agents.operations import (
    DESCRIPTIONS,
    PLANNER_ERRORS,
    ArbitrationAnswer,
    BoxArg,
    BoxUnitsArg,
    CandidatesArg,
    CropIdArg,
    FocusedAnswer,
    GlobalAnswer,
    ImageArg,
    OptionsArg,
    QuestionArg,
    RecallAnswer,
    RecallImageArg,
    RecallKArg,
    RecallQuestionArg,
    RegionAnswer,
    StepObserver,
    Toolbox,
    preview_png,
)
from df_agent.results import FocusResult

# -- argument schemas (descriptions from df_agent.agents.operations, shared with the MCP server) --


class ImageQuestionInput(BaseModel):
    """An image and a question about it."""

    image: ImageArg
    question: QuestionArg
    options: OptionsArg = None


class ZoomInput(BaseModel):
    """An image and the question whose region to find."""

    image: ImageArg
    question: QuestionArg


class FocusedInput(BaseModel):
    """An image, a question and the region to zoom into."""

    image: ImageArg
    question: QuestionArg
    crop_id: CropIdArg = None
    box: BoxArg = None
    box_units: BoxUnitsArg = "pixels"
    options: OptionsArg = None


class ArbitrateInput(BaseModel):
    """An image, a question, the candidate answers and the region whose zoomed context scores them."""

    image: ImageArg
    question: QuestionArg
    candidates: CandidatesArg
    crop_id: CropIdArg = None
    box: BoxArg = None
    box_units: BoxUnitsArg = "pixels"


class RecallInput(BaseModel):
    """A question to find similar past questions for, optionally about one image."""

    question: RecallQuestionArg
    image: RecallImageArg = None
    k: RecallKArg = 5


# -- child runs ---------------------------------------------------------------------------------------


class _ChildRun:
    def __init__(self, run: CallbackManagerForChainRun) -> None:
        self._run = run

    def end(self, outputs: dict[str, Any]) -> None:
        self._run.on_chain_end(outputs)

    def fail(self, error: BaseException) -> None:
        self._run.on_chain_error(error)


class ChildRunObserver:
    """A `StepObserver` that reports each engine step as a child chain run of a tool run.

    Args:
        run_manager: The tool run's callback manager; each step becomes a chain run named after the
            step (macro, locate, zoom, micro, arbitrate) with its inputs and outputs.
    """

    def __init__(self, run_manager: CallbackManagerForToolRun) -> None:
        self._children = run_manager.get_child()

    def start(self, step: str, inputs: dict[str, Any]) -> _ChildRun:
        """Start the child run of `step`."""
        return _ChildRun(self._children.on_chain_start(None, inputs, name=step))


def explain_validation_error(error: ValidationError) -> str:
    """A tool-input validation error as one message naming each bad argument, for the planner."""
    problems = []
    for item in error.errors():
        where = ".".join(str(part) for part in item.get("loc", ())) or "arguments"
        problems.append(f"{where}: {item.get('msg')}")
    return "Invalid arguments (" + "; ".join(problems) + "). Fix them and call the tool again."


# -- the tools ----------------------------------------------------------------------------------------


class DualFocusTool(BaseTool):
    """Base of the DualFocus tools: one shared `Toolbox`, content and artifact, planner-readable errors.

    Args:
        toolbox: The engine, image registry and memory the tool works on (share one between tools:
            `DualFocusToolkit.get_tools` does).
    """

    toolbox: Toolbox
    response_format: Literal["content", "content_and_artifact"] = "content_and_artifact"
    handle_tool_error: bool | str | Callable[[ToolException], str] | None = True
    handle_validation_error: bool | str | Callable[[ValidationError], str] | None = explain_validation_error

    def _invoke_step(
        self, operation: Any, *args: Any, run_manager: CallbackManagerForToolRun | None, **kwargs: Any
    ) -> Any:
        """Run a toolbox operation with the steps traced as child runs; planner errors -> ToolException."""
        observer: StepObserver | None = ChildRunObserver(run_manager) if run_manager else None
        try:
            return operation(*args, observer=observer, **kwargs)
        except PLANNER_ERRORS as exc:
            raise ToolException(str(exc)) from None


class DualFocusAnswerTool(DualFocusTool):
    """The whole DualFocus pipeline; the artifact is the `FocusResult` with its full trace."""

    name: str = "dualfocus_answer"
    description: str = DESCRIPTIONS["dualfocus_answer"]
    args_schema: ArgsSchema | None = ImageQuestionInput

    def _run(
        self,
        image: str,
        question: str,
        options: list[str] | None = None,
        run_manager: CallbackManagerForToolRun | None = None,
    ) -> tuple[str, FocusResult]:
        answer = self._invoke_step(
            self.toolbox.dualfocus_answer, image, question, options, run_manager=run_manager
        )
        return answer.summary(), answer.result


class GlobalAnswerTool(DualFocusTool):
    """The macro step: the answer from the whole image."""

    name: str = "global_answer"
    description: str = DESCRIPTIONS["global_answer"]
    args_schema: ArgsSchema | None = ImageQuestionInput

    def _run(
        self,
        image: str,
        question: str,
        options: list[str] | None = None,
        run_manager: CallbackManagerForToolRun | None = None,
    ) -> tuple[str, GlobalAnswer]:
        answer = self._invoke_step(
            self.toolbox.global_answer, image, question, options, run_manager=run_manager
        )
        return answer.summary(), answer


class ZoomRegionTool(DualFocusTool):
    """The locate and zoom steps; the content carries the crop as a standard image block."""

    name: str = "zoom_region"
    description: str = DESCRIPTIONS["zoom_region"]
    args_schema: ArgsSchema | None = ZoomInput

    def _run(
        self, image: str, question: str, run_manager: CallbackManagerForToolRun | None = None
    ) -> tuple[str | list[dict], RegionAnswer]:
        region = self._invoke_step(self.toolbox.zoom_region, image, question, run_manager=run_manager)
        if region.crop is None:
            return region.summary(), region
        picture = base64.b64encode(preview_png(region.crop)).decode("ascii")
        content = [
            dict(create_text_block(region.summary())),
            dict(create_image_block(base64=picture, mime_type="image/png")),
        ]
        return content, region


class FocusedAnswerTool(DualFocusTool):
    """The micro step on a region given as a crop id or a box."""

    name: str = "focused_answer"
    description: str = DESCRIPTIONS["focused_answer"]
    args_schema: ArgsSchema | None = FocusedInput

    def _run(
        self,
        image: str,
        question: str,
        crop_id: str | None = None,
        box: list[float] | None = None,
        box_units: Literal["pixels", "fraction"] = "pixels",
        options: list[str] | None = None,
        run_manager: CallbackManagerForToolRun | None = None,
    ) -> tuple[str, FocusedAnswer]:
        answer = self._invoke_step(
            self.toolbox.focused_answer, image, question,
            crop_id=crop_id, box=box, box_units=box_units, options=options, run_manager=run_manager,
        )  # fmt: skip
        return answer.summary(), answer


class ArbitrateAnswersTool(DualFocusTool):
    """The perplexity vote among candidate answers in the zoomed context of a region."""

    name: str = "arbitrate_answers"
    description: str = DESCRIPTIONS["arbitrate_answers"]
    args_schema: ArgsSchema | None = ArbitrateInput

    def _run(
        self,
        image: str,
        question: str,
        candidates: list[str],
        crop_id: str | None = None,
        box: list[float] | None = None,
        box_units: Literal["pixels", "fraction"] = "pixels",
        run_manager: CallbackManagerForToolRun | None = None,
    ) -> tuple[str, ArbitrationAnswer]:
        answer = self._invoke_step(
            self.toolbox.arbitrate_answers, image, question, candidates,
            crop_id=crop_id, box=box, box_units=box_units, run_manager=run_manager,
        )  # fmt: skip
        return answer.summary(), answer


class RecallVisualQATool(DualFocusTool):
    """Similar past questions and answers from the toolbox's memory."""

    name: str = "recall_visual_qa"
    description: str = DESCRIPTIONS["recall_visual_qa"]
    args_schema: ArgsSchema | None = RecallInput

    def _run(
        self,
        question: str,
        image: str | None = None,
        k: int = 5,
    ) -> tuple[str, RecallAnswer]:
        try:
            answer = self.toolbox.recall_visual_qa(question, image, k)
        except PLANNER_ERRORS as exc:
            raise ToolException(str(exc)) from None
        return answer.summary(), answer


__all__ = [
    "ArbitrateAnswersTool",
    "ArbitrateInput",
    "ChildRunObserver",
    "DualFocusAnswerTool",
    "DualFocusTool",
    "FocusedAnswerTool",
    "FocusedInput",
    "GlobalAnswerTool",
    "ImageQuestionInput",
    "RecallInput",
    "RecallVisualQATool",
    "ZoomInput",
    "ZoomRegionTool",
    "explain_validation_error",
]
