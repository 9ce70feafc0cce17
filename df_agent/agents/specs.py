"""One declarative spec per tool: its name, its description, its input model and its operation.

Both adapters are built from `SPECS`: the LangChain tools (`df_agent.tools`) and the MCP server
(`df_agent.agents.mcp`). A tool's description is read from ``prompts/_tools/<name>.txt``, its
arguments are the fields of its input model (`df_agent.agents.inputs`), and its operation is a
`Toolbox` method taking that model; a spec whose operation takes another model fails at import.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from pydantic import ValidationError

from df_agent.agents.answers import ToolAnswer
from df_agent.agents.errors import ToolInputError
from df_agent.agents.inputs import (
    ArbitrateInput,
    AskInput,
    FocusedInput,
    PipelineInput,
    RecallInput,
    ToolInput,
    ZoomInput,
)
from df_agent.agents.operations import Toolbox
from df_agent.engine import InputLimitError
from df_agent.observers import StepObserver

_TEXTS = resources.files("df_agent.prompts") / "_tools"


def _description(name: str) -> str:
    return (_TEXTS / f"{name}.txt").read_text(encoding="utf-8").removesuffix("\n")


@dataclass(frozen=True)
class ToolSpec:
    """One tool, as every adapter offers it.

    Attributes:
        name: The tool's name, as a planner calls it.
        input: The input model: the tool's arguments, their types and descriptions.
        operation: The `Toolbox` method that runs the tool on a validated `input`.
        needs_memory: Offered only when the toolbox's engine has a searchable memory.
        description: What a planner reads about the tool (default: ``prompts/_tools/<name>.txt``).
    """

    name: str
    input: type[ToolInput]
    operation: Callable[[Toolbox, Any], ToolAnswer]
    needs_memory: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        takes = typing.get_type_hints(self.operation).get("args")
        if takes is not self.input:
            raise TypeError(f"tool {self.name!r}: its operation takes {takes}, not {self.input.__name__}")
        if not self.description:
            object.__setattr__(self, "description", _description(self.name))

    def parse(self, arguments: Mapping[str, Any] | ToolInput) -> ToolInput:
        """The arguments as the input model.

        Raises:
            pydantic.ValidationError: If an argument is missing, unknown or malformed
                (`explain` words it for a planner).
        """
        if isinstance(arguments, self.input):
            return arguments
        return self.input.model_validate(dict(arguments))

    def call(
        self,
        toolbox: Toolbox,
        arguments: Mapping[str, Any] | ToolInput,
        observer: StepObserver | None = None,
    ) -> ToolAnswer:
        """Run the tool on `toolbox`; the engine's steps report to `observer` if one is given.

        Raises:
            pydantic.ValidationError: If the arguments do not fit the input model.
            df_agent.agents.errors.PlannerError: If the call is one a planner can fix, including an
                input over one of the engine's limits (`df_agent.engine.InputLimitError`).
        """
        args = self.parse(arguments)
        try:
            if observer is None:
                return self.operation(toolbox, args)
            with toolbox.engine.observing(observer):
                return self.operation(toolbox, args)
        except InputLimitError as exc:
            raise ToolInputError(str(exc)) from None

    def explain(self, error: ValidationError) -> str:
        """A validation error of this tool's arguments as one message naming each bad argument."""
        problems = []
        for item in error.errors():
            where = ".".join(str(part) for part in item.get("loc", ())) or "arguments"
            if item.get("type") == "extra_forbidden":
                problems.append(f"{where}: unknown argument")
            else:
                problems.append(f"{where}: {item.get('msg')}")
        takes = ", ".join(self.input.model_fields)
        return (
            f"Invalid arguments ({'; '.join(problems)}). {self.name} takes: {takes}. "
            "Fix them and call the tool again."
        )

    def offered(self, toolbox: Toolbox) -> bool:
        """Whether the tool is offered over `toolbox` (recall only with a searchable memory)."""
        return not self.needs_memory or toolbox.memory is not None


SPECS: tuple[ToolSpec, ...] = (
    ToolSpec("dualfocus_answer", PipelineInput, Toolbox.dualfocus_answer),
    ToolSpec("global_answer", AskInput, Toolbox.global_answer),
    ToolSpec("zoom_region", ZoomInput, Toolbox.zoom_region),
    ToolSpec("focused_answer", FocusedInput, Toolbox.focused_answer),
    ToolSpec("arbitrate_answers", ArbitrateInput, Toolbox.arbitrate_answers),
    ToolSpec("recall_visual_qa", RecallInput, Toolbox.recall_visual_qa, needs_memory=True),
)
BY_NAME: dict[str, ToolSpec] = {spec.name: spec for spec in SPECS}
DESCRIPTIONS: dict[str, str] = {spec.name: spec.description for spec in SPECS}


def offered_specs(toolbox: Toolbox) -> list[ToolSpec]:
    """The specs of the tools offered over `toolbox`, in the order planners see them."""
    return [spec for spec in SPECS if spec.offered(toolbox)]


__all__ = ["BY_NAME", "DESCRIPTIONS", "SPECS", "ToolSpec", "offered_specs"]
