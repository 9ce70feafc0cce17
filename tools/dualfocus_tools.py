"""The DualFocus steps as LangChain tools, built from the agent layer's tool specs.

Every tool answers with ``(content, artifact)``: short text (and, for `zoom_region`, each crop as an
image block) for the planner, the step's pydantic result for the program. Each tool's input schema
is its spec's input model (`df_agent.agents.inputs`): unknown or malformed arguments become one
message naming each bad argument, planner mistakes become `ToolException` messages
(``handle_tool_error=True``). The engine's steps run as nested child runs of the tool run, so any
callback handler sees each step's inputs and outputs (the zoom box, both candidates' scores).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any, ClassVar, Literal

from langchain_core.callbacks import CallbackManagerForChainRun, CallbackManagerForToolRun
from langchain_core.messages.content import create_image_block, create_text_block
from langchain_core.tools import BaseTool, ToolException
from pydantic import ValidationError

from df_agent.agents.answers import ToolAnswer, preview_png
from df_agent.agents.errors import PlannerError
from df_agent.agents.operations import Toolbox
from df_agent.agents.specs import BY_NAME, ToolSpec

# -- child runs ---------------------------------------------------------------------------------------


class _ChildRun:
    def __init__(self, run: CallbackManagerForChainRun) -> None:
        self._run = run

    def end(self, outputs: dict[str, Any], seconds: float) -> None:
        self._run.on_chain_end(outputs)

    def fail(self, error: BaseException, seconds: float) -> None:
        self._run.on_chain_error(error)


class ChildRunObserver:
    """A step observer that reports each engine step as a child chain run of a tool run.

    Args:
        run_manager: The tool run's callback manager; each step becomes a chain run named after the
            step (macro, locate, zoom, micro, arbitrate) with its inputs and outputs.
    """

    def __init__(self, run_manager: CallbackManagerForToolRun) -> None:
        self._children = run_manager.get_child()

    def start(self, step: str, inputs: dict[str, Any]) -> _ChildRun:
        """Start the child run of `step`."""
        return _ChildRun(self._children.on_chain_start(None, inputs, name=step))


def _b64_png(picture: Any) -> str:
    return base64.b64encode(preview_png(picture)).decode("ascii")


# -- the tools ----------------------------------------------------------------------------------------


class DualFocusTool(BaseTool):
    """Base of the DualFocus tools: one spec, one shared `Toolbox`, content and artifact.

    A subclass names its spec (`spec`); the tool's name, description and input schema come from it.

    Args:
        toolbox: The engine and image registry the tool works on (share one between tools:
            `DualFocusToolkit.get_tools` does).
    """

    spec: ClassVar[ToolSpec]
    toolbox: Toolbox
    response_format: Literal["content", "content_and_artifact"] = "content_and_artifact"
    handle_tool_error: bool | str | Callable[[ToolException], str] | None = True

    def __init__(self, **data: Any) -> None:
        spec = self.spec
        defaults = {
            "name": spec.name,
            "description": spec.description,
            "args_schema": spec.input,
            "handle_validation_error": spec.explain,
        }
        super().__init__(**{**defaults, **data})

    def _run(self, run_manager: CallbackManagerForToolRun | None = None, **arguments: Any) -> tuple[Any, Any]:
        """Run the spec's operation, its steps traced as child runs; planner errors -> ToolException."""
        observer = ChildRunObserver(run_manager) if run_manager else None
        try:
            answer = self.spec.call(self.toolbox, arguments, observer)
        except PlannerError as exc:
            raise ToolException(str(exc)) from None
        except ValidationError as exc:  # arguments passed to _run directly, past the schema
            raise ToolException(self.spec.explain(exc)) from None
        return self._content(answer), self._artifact(answer)

    @staticmethod
    def _content(answer: ToolAnswer) -> str | list[dict[str, Any]]:
        pictures = answer.pictures()
        if not pictures:
            return answer.summary()
        images = [
            dict(
                create_image_block(
                    base64=base64.b64encode(preview_png(p)).decode("ascii"), mime_type="image/png"
                )
            )
            for p in pictures
        ]
        return [dict(create_text_block(answer.summary())), *images]

    @staticmethod
    def _artifact(answer: ToolAnswer) -> Any:
        return answer


class DualFocusAnswerTool(DualFocusTool):
    """The whole DualFocus pipeline; the artifact is the `PipelineAnswer` (its `result` is the full trace)."""

    spec: ClassVar[ToolSpec] = BY_NAME["dualfocus_answer"]


class GlobalAnswerTool(DualFocusTool):
    """The macro step: the answer from the whole image."""

    spec: ClassVar[ToolSpec] = BY_NAME["global_answer"]


class ZoomRegionTool(DualFocusTool):
    """The locate and zoom steps; the content carries the crop as a standard image block."""

    spec: ClassVar[ToolSpec] = BY_NAME["zoom_region"]


class FocusedAnswerTool(DualFocusTool):
    """The micro step on a region given as a crop id or a box."""

    spec: ClassVar[ToolSpec] = BY_NAME["focused_answer"]


class ArbitrateAnswersTool(DualFocusTool):
    """The perplexity vote among candidate answers in the zoomed context of a region."""

    spec: ClassVar[ToolSpec] = BY_NAME["arbitrate_answers"]


class RecallVisualQATool(DualFocusTool):
    """Similar past questions and answers from the engine's memory."""

    spec: ClassVar[ToolSpec] = BY_NAME["recall_visual_qa"]


TOOL_CLASSES: dict[str, type[DualFocusTool]] = {
    cls.spec.name: cls
    for cls in (
        DualFocusAnswerTool, GlobalAnswerTool, ZoomRegionTool, FocusedAnswerTool, ArbitrateAnswersTool,
        RecallVisualQATool,
    )
}  # fmt: skip

__all__ = [
    "TOOL_CLASSES",
    "ArbitrateAnswersTool",
    "ChildRunObserver",
    "DualFocusAnswerTool",
    "DualFocusTool",
    "FocusedAnswerTool",
    "GlobalAnswerTool",
    "RecallVisualQATool",
    "ZoomRegionTool",
]
