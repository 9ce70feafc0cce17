"""The same bad argument gets the same answer through the LangChain tools and over MCP."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from conftest import ScriptedBackend
from fastmcp import Client

from df_agent.agents.inputs import ZoomInput
from df_agent.agents.mcp import build_server
from df_agent.agents.registry import ImageRegistry
from df_agent.data.focusshapes import render_scene
from df_agent.engine import DualFocus
from df_agent.images import to_data_uri
from df_agent.tools import DualFocusToolkit

SCENE = render_scene("surfaces-test")


class Recalling:
    def recall(self, query: str, image: Any = None, k: int = 5) -> list[Any]:
        return []


def toolkit() -> tuple[DualFocusToolkit, str]:
    """A toolkit whose registry keeps one image or crop; returns it and the id of a crop evicted."""
    engine = DualFocus(ScriptedBackend(box="[0.25,0.25,0.50,0.50]"), memory=Recalling())
    kit = DualFocusToolkit(engine=engine, registry=ImageRegistry(max_cached=1))
    kit.register_image(SCENE.image, "scene")
    evicted = kit.toolbox.zoom_region(ZoomInput(image="scene", question="Where is the star?")).crop_id
    kit.registry.resolve(to_data_uri(render_scene("another").image))  # pushes the crop out
    assert evicted is not None and evicted not in kit.registry
    return kit, evicted


ASK = {"image": "scene", "question": "What number is on the star?"}
CASES = [
    ("global_answer", {**ASK, "colour": "red"}, "colour: unknown argument"),
    ("zoom_region", {**ASK, "options": ["a", "b"]}, "options: unknown argument"),
    ("global_answer", {"image": "scene"}, "question: Field required"),
    ("global_answer", {**ASK, "question": "  "}, "question: String should have at least 1 character"),
    ("dualfocus_answer", {**ASK, "options": ["a"] * 27}, "options: List should have at most 26 items"),
    ("focused_answer", {**ASK, "box": [1, 2, 3]}, "box: List should have at least 4 items"),
    ("focused_answer", {**ASK, "box": [1, 2, 30, 40], "box_units": "inches"}, "box_units: Input should be"),
    ("focused_answer", ASK, "give the region either as crop_id"),
    ("focused_answer", {**ASK, "crop_id": "EVICTED"}, "was evicted from the cache"),
    ("focused_answer", {**ASK, "crop_id": "crop-000000000000"}, "unknown image id"),
    ("focused_answer", {**ASK, "box": [500, 500, 600, 600]}, "lies outside the 320x320 image"),
    ("arbitrate_answers", {**ASK, "candidates": ["a"], "box": [1, 1, 9, 9]}, "candidates: List should have"),
    ("arbitrate_answers", {**ASK, "candidates": ["a", " "], "box": [1, 1, 9, 9]}, "candidates.1: String"),
    ("zoom_region", {**ASK, "image": "../../etc/passwd"}, "file paths are disabled"),
    ("zoom_region", {**ASK, "image": "EVICTED"}, "was evicted from the cache"),
    ("recall_visual_qa", {"question": "anything?", "k": 50}, "k: Input should be less than or equal to 20"),
    ("global_answer", {**ASK, "question": "Why? " * 500}, "the limit is 2,000 (max_question_chars)"),
    ("zoom_region", {**ASK, "question": "Why? " * 500}, "the limit is 2,000 (max_question_chars)"),
    ("focused_answer", {**ASK, "question": "Why? " * 500, "box": [1, 1, 9, 9]}, "(max_question_chars)"),
    ("arbitrate_answers", {**ASK, "candidates": ["a", "b" * 600], "box": [1, 1, 9, 9]}, "(max_option_chars)"),
    ("dualfocus_answer", {**ASK, "options": ["a", "b" * 600]}, "the limit is 500 (max_option_chars)"),
]


@pytest.fixture(scope="module")
def surfaces() -> tuple[DualFocusToolkit, str, list[Any]]:
    """One toolkit and the MCP server over the same toolbox; every case's MCP result, in one session."""
    kit, evicted = toolkit()

    async def over_mcp():
        async with Client(build_server(kit.toolbox)) as client:
            return [
                await client.call_tool(tool, with_evicted(args, evicted), raise_on_error=False)
                for tool, args, _ in CASES
            ]

    return kit, evicted, asyncio.run(over_mcp())


def with_evicted(args: dict[str, Any], evicted: str) -> dict[str, Any]:
    return {k: (evicted if v == "EVICTED" else v) for k, v in args.items()}


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{t}-{e[:24]}" for t, _, e in CASES])
def test_langchain_and_mcp_give_the_same_message(surfaces: tuple, case: int) -> None:
    kit, evicted, over_mcp = surfaces
    tool, args, expected = CASES[case]
    langchain_tool = next(t for t in kit.get_tools() if t.name == tool)
    call = {"type": "tool_call", "id": "call-1", "name": tool, "args": with_evicted(args, evicted)}
    message = langchain_tool.invoke(call)
    assert message.status == "error" and expected in message.content, message.content
    assert over_mcp[case].is_error and over_mcp[case].content[0].text == message.content
    assert len(kit.engine.backend.generated) == 1  # only the zoom of the setup ran the model
