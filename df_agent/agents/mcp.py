"""Serve the DualFocus tools over MCP (stdio by default, streamable HTTP with --http PORT).

The tools are built from the same specs as the LangChain toolkit (`df_agent.agents.specs`): each
tool's input schema is its spec's input model, and its arguments are validated by that model, so a
bad argument gets the same message as through LangChain. The image-reference rules are the
registry's: image ids, data URIs, paths only under ``--allow-root`` folders, URLs only with
``--allow-urls``. `zoom_region` returns the crop as an MCP image; every tool also returns its full
result as structured content. Each engine step is reported to the client as a progress notification
(when the client sent a progress token). A planner's mistake comes back as a tool error
whose message says what to fix; other failures are masked. Needs the ``mcp`` extra (fastmcp).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from df_agent.agents.errors import PlannerError
from df_agent.agents.operations import Toolbox
from df_agent.agents.specs import ToolSpec, offered_specs

if TYPE_CHECKING:
    from fastmcp import Context, FastMCP
    from fastmcp.tools import Tool

INSTRUCTIONS = (
    "DualFocus answers questions about images by looking at the whole picture, then zooming into the "
    "region the question is about. Call dualfocus_answer for a whole answer, or drive the steps: "
    "global_answer, zoom_region (returns the crop and a crop id), focused_answer, arbitrate_answers. "
    "Images are image ids, base64 data URIs, or paths the server allows; a crop id is an image too, so "
    "zoom_region on a crop zooms within the zoom. Boxes are given in the pixels of the image passed (box, "
    "crop_box) and of the root image it was cut from (box_root, crop_box_root)."
)


class _ProgressStep:
    def __init__(self, observer: ProgressObserver, step: str) -> None:
        self._observer, self._step = observer, step

    def end(self, outputs: dict[str, Any], seconds: float) -> None:
        self._observer.finished(self._step, f"{self._step} done in {seconds:.2f} s")

    def fail(self, error: BaseException, seconds: float) -> None:
        self._observer.finished(self._step, f"{self._step} failed after {seconds:.2f} s")


class ProgressObserver:
    """A step observer, run in a worker thread, that tells the MCP client about each finished step.

    Each step becomes a progress notification (progress = steps finished so far, message = the step
    and its seconds), sent through the request's context on the event loop.

    Args:
        context: The request's fastmcp `Context`.
    """

    def __init__(self, context: Context) -> None:
        self._context = context
        self.steps = 0

    def start(self, step: str, inputs: dict[str, Any]) -> _ProgressStep:
        """Track `step`."""
        return _ProgressStep(self, step)

    def finished(self, step: str, message: str) -> None:
        """Send `message` about `step` to the client."""
        import anyio.from_thread

        self.steps += 1
        anyio.from_thread.run(self._context.report_progress, self.steps, None, message)


def spec_tool(spec: ToolSpec, toolbox: Toolbox) -> Tool:
    """The MCP tool of `spec` over `toolbox`: the spec's input model is its schema and its validator."""
    import anyio.to_thread
    from fastmcp.exceptions import ToolError
    from fastmcp.server.dependencies import get_context
    from fastmcp.tools import Tool, ToolResult
    from fastmcp.utilities.types import Image

    from df_agent.agents.answers import preview_png

    class SpecTool(Tool):
        async def run(self, arguments: dict[str, Any]) -> ToolResult:
            try:
                args = spec.parse(arguments)
            except ValidationError as exc:
                raise ToolError(spec.explain(exc)) from None
            observer = ProgressObserver(get_context())
            try:
                answer = await anyio.to_thread.run_sync(spec.call, toolbox, args, observer)
            except PlannerError as exc:
                raise ToolError(str(exc)) from None
            content: Any = answer.summary()
            pictures = answer.pictures()
            if pictures:
                content = [content, *(Image(data=preview_png(p), format="png") for p in pictures)]
            return ToolResult(content=content, structured_content=answer.model_dump(mode="json"))

    return SpecTool(name=spec.name, description=spec.description, parameters=spec.input.model_json_schema())


def build_server(toolbox: Toolbox, *, name: str = "df-agent") -> FastMCP:
    """An MCP server offering the toolbox's operations as tools.

    Args:
        toolbox: The engine (with its memory, if any) and image registry the tools work on;
            `recall_visual_qa` is offered only when the engine has a searchable memory.
        name: The server's name.
    """
    from fastmcp import FastMCP

    server = FastMCP(name, instructions=INSTRUCTIONS, mask_error_details=True)
    for spec in offered_specs(toolbox):
        server.add_tool(spec_tool(spec, toolbox))
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
    engine = DualFocus.from_pretrained(args.model, device=args.device, memory=memory)
    server = build_server(Toolbox(engine, registry))
    if args.http is None:
        server.run(transport="stdio", show_banner=False)
    else:
        server.run(transport="http", host=args.host, port=args.http, show_banner=False)
    return 0


__all__ = ["INSTRUCTIONS", "ProgressObserver", "add_arguments", "build_server", "run", "spec_tool"]
