"""Serve the DualFocus tools over MCP (stdio by default, streamable HTTP with --http PORT).

The same operations as the LangChain toolkit (`df_agent.agents.operations`), with the same image-reference
rules: image ids, data URIs, paths only under ``--allow-root`` folders, URLs only with
``--allow-urls``. `zoom_region` returns the crop as an MCP image; every tool also returns its full
result as structured content. A planner's mistake comes back as a tool error whose message says what
to fix; other failures are masked. Needs the ``mcp`` extra (fastmcp).
"""

import argparse
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from df_agent.agents.operations import (
    DESCRIPTIONS,
    PLANNER_ERRORS,
    BoxArg,
    BoxUnitsArg,
    CandidatesArg,
    CropIdArg,
    ImageArg,
    OptionsArg,
    QuestionArg,
    RecallImageArg,
    RecallKArg,
    RecallQuestionArg,
    Toolbox,
    preview_png,
)

if TYPE_CHECKING:
    from fastmcp import FastMCP

INSTRUCTIONS = (
    "DualFocus answers questions about images by looking at the whole picture, then zooming into the "
    "region the question is about. Call dualfocus_answer for a whole answer, or drive the steps: "
    "global_answer, zoom_region (returns the crop and a crop id), focused_answer, arbitrate_answers. "
    "Images are image ids, base64 data URIs, or paths the server allows."
)
_Function = TypeVar("_Function", bound=Callable[..., Any])


def build_server(toolbox: Toolbox, *, name: str = "df-agent") -> "FastMCP":
    """An MCP server offering the toolbox's operations as tools.

    Args:
        toolbox: The engine, image registry and (optional) memory the tools work on;
            `recall_visual_qa` is offered only when it has a memory.
        name: The server's name.
    """
    from fastmcp import FastMCP
    from fastmcp.exceptions import ToolError
    from fastmcp.tools import ToolResult
    from fastmcp.utilities.types import Image

    server = FastMCP(name, instructions=INSTRUCTIONS, mask_error_details=True)

    def tool(function: _Function) -> _Function:
        """Register `function` under its name and description; planner errors become tool errors."""

        @functools.wraps(function)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return function(*args, **kwargs)
            except PLANNER_ERRORS as exc:
                raise ToolError(str(exc)) from None

        server.tool(call, name=function.__name__, description=DESCRIPTIONS[function.__name__])
        return function

    def result(answer: Any, content: Any = None) -> ToolResult:
        return ToolResult(
            content=content or answer.summary(), structured_content=answer.model_dump(mode="json")
        )

    @tool
    def dualfocus_answer(image: ImageArg, question: QuestionArg, options: OptionsArg = None) -> ToolResult:
        return result(toolbox.dualfocus_answer(image, question, options))

    @tool
    def global_answer(image: ImageArg, question: QuestionArg, options: OptionsArg = None) -> ToolResult:
        return result(toolbox.global_answer(image, question, options))

    @tool
    def zoom_region(image: ImageArg, question: QuestionArg) -> ToolResult:
        region = toolbox.zoom_region(image, question)
        if region.crop is None:
            return result(region)
        return result(region, [region.summary(), Image(data=preview_png(region.crop), format="png")])

    @tool
    def focused_answer(
        image: ImageArg,
        question: QuestionArg,
        crop_id: CropIdArg = None,
        box: BoxArg = None,
        box_units: BoxUnitsArg = "pixels",
        options: OptionsArg = None,
    ) -> ToolResult:
        return result(
            toolbox.focused_answer(
                image, question, crop_id=crop_id, box=box, box_units=box_units, options=options
            )
        )

    @tool
    def arbitrate_answers(
        image: ImageArg,
        question: QuestionArg,
        candidates: CandidatesArg,
        crop_id: CropIdArg = None,
        box: BoxArg = None,
        box_units: BoxUnitsArg = "pixels",
    ) -> ToolResult:
        return result(
            toolbox.arbitrate_answers(
                image, question, candidates, crop_id=crop_id, box=box, box_units=box_units
            )
        )

    if toolbox.memory is not None:

        @tool
        def recall_visual_qa(
            question: RecallQuestionArg, image: RecallImageArg = None, k: RecallKArg = 5
        ) -> ToolResult:
            return result(toolbox.recall_visual_qa(question, image, k))

    return server


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `df-agent mcp` options."""
    parser.add_argument(
        "--http", type=int, metavar="PORT", help="serve streamable HTTP on PORT (default: stdio)"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind with --http (default: 127.0.0.1)"
    )
    parser.add_argument("--model", help="checkpoint folder or hub id (default: the shipped model)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    parser.add_argument(
        "--allow-root",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder whose image files clients may name by path (repeat; default: none, no paths)",
    )
    parser.add_argument("--allow-urls", action="store_true", help="let clients pass http(s) image URLs")
    parser.add_argument(
        "--memory", metavar="DIR", help="log answers to, and offer recall from, a visual Q&A memory in DIR"
    )


def run(args: argparse.Namespace) -> int:
    """Load the model and serve until the client disconnects (stdio) or the process is stopped (HTTP)."""
    from df_agent.agents.registry import ImageRegistry
    from df_agent.engine import DualFocus

    registry = ImageRegistry(args.allow_root, allow_urls=args.allow_urls)
    memory = None
    if args.memory:
        from df_agent.memory import VisualQAMemory

        memory = VisualQAMemory(args.memory)
    engine = DualFocus.from_pretrained(args.model, device=args.device)
    server = build_server(Toolbox(engine, registry, memory))
    if args.http is None:
        server.run(transport="stdio", show_banner=False)
    else:
        server.run(transport="http", host=args.host, port=args.http, show_banner=False)
    return 0


__all__ = ["INSTRUCTIONS", "add_arguments", "build_server", "run"]
