"""The MCP server: the toolkit's steps over MCP, in memory, over stdio and over streamable HTTP."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import ScriptedBackend
from fastmcp import Client
from fastmcp.client.transports import StdioTransport
from PIL import Image

from df_agent.agents.mcp import build_server
from df_agent.agents.operations import Toolbox
from df_agent.agents.registry import ImageRegistry
from df_agent.agents.specs import BY_NAME, DESCRIPTIONS
from df_agent.cli import build_parser
from df_agent.data.focusshapes import render_scene
from df_agent.engine import DualFocus
from df_agent.images import to_data_uri
from df_agent.memory import VisualQAMemory
from df_agent.memory.embeddings import HashingEmbedder

SCENE = render_scene("mcp-test")
QUESTION = f"What number is on the {SCENE.objects[0].name}?"
STEP_TOOLS = ["dualfocus_answer", "global_answer", "zoom_region", "focused_answer", "arbitrate_answers"]


def scripted_server(memory: Any = None, **backend: Any):
    toolbox = Toolbox(DualFocus(ScriptedBackend(**backend), memory=memory), ImageRegistry())
    toolbox.registry.register(SCENE.image, "scene")
    return build_server(toolbox), toolbox


def call(server, tool: str, args: dict[str, Any]):
    async def go():
        async with Client(server) as client:
            return await client.call_tool(tool, args, raise_on_error=False)

    return asyncio.run(go())


def test_lists_the_tools_with_their_descriptions() -> None:
    server, _ = scripted_server()

    async def go():
        async with Client(server) as client:
            return await client.list_tools()

    tools = asyncio.run(go())
    assert [t.name for t in tools] == STEP_TOOLS
    for tool in tools:
        assert tool.description == DESCRIPTIONS[tool.name]
        for name, field in tool.input_schema["properties"].items():
            assert len(field.get("description", "")) > 30, (tool.name, name)
    focused = next(t for t in tools if t.name == "focused_answer").input_schema
    assert focused["required"] == ["image", "question"]
    assert focused["properties"]["box_units"]["enum"] == ["pixels", "fraction"]


def test_zoom_returns_the_crop_as_an_mcp_image() -> None:
    server, toolbox = scripted_server(box="[0.25,0.25,0.50,0.50]")
    result = call(server, "zoom_region", {"image": "scene", "question": QUESTION})
    assert not result.is_error
    text, image = result.content
    assert image.type == "image" and image.mime_type == "image/png"
    crop = Image.open(io.BytesIO(base64.b64decode(image.data)))
    region = result.structured_content
    box = region["crop_box"]
    assert crop.size == (box["x2"] - box["x1"], box["y2"] - box["y1"])
    assert region["box"] == {"x1": 80.0, "y1": 80.0, "x2": 160.0, "y2": 160.0}
    assert region["crop_id"] in text.text and region["crop_id"] in toolbox.registry


def test_whole_pipeline_returns_the_answer_and_the_trace() -> None:
    server, _ = scripted_server(macro="red", micro="blue", scores={"red": 1.25, "blue": 0.5})
    result = call(server, "dualfocus_answer", {"image": "scene", "question": QUESTION})
    assert not result.is_error
    assert result.content[0].text.startswith("Answer: blue")
    trace = result.structured_content["result"]
    assert trace["answer"] == "blue" and trace["path"] == "micro"
    assert (trace["macro_answer"], trace["micro_answer"]) == ("red", "blue")
    assert trace["scores"] == {"macro": 1.25, "micro": 0.5}
    assert trace["box"] == {"x1": 80.0, "y1": 80.0, "x2": 160.0, "y2": 160.0}
    assert set(trace["timings"]) >= {"macro", "locate", "zoom", "micro", "arbitrate", "total"}


def test_schemas_are_the_specs_input_models() -> None:
    server, _ = scripted_server()

    async def go():
        async with Client(server) as client:
            return await client.list_tools()

    for tool in asyncio.run(go()):
        assert tool.input_schema == BY_NAME[tool.name].input.model_json_schema()
        assert tool.input_schema["additionalProperties"] is False


def test_each_engine_step_is_reported_as_progress() -> None:
    server, _ = scripted_server(macro="red", micro="blue", scores={"red": 1.25, "blue": 0.5})
    reports: list[tuple[float, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        reports.append((progress, message))

    async def go():
        async with Client(server, progress_handler=on_progress) as client:
            return await client.call_tool("dualfocus_answer", {"image": "scene", "question": QUESTION})

    assert not asyncio.run(go()).is_error
    assert [p for p, _ in reports] == [1, 2, 3, 4, 5]
    steps = [message.split()[0] for _, message in reports]
    assert steps == ["macro", "locate", "zoom", "micro", "arbitrate"]
    assert all(re.fullmatch(r"\w+ done in \d+\.\d\d s", message) for _, message in reports)


def test_the_steps_chain_through_crop_ids() -> None:
    server, _ = scripted_server(micro="7", scores={"red": 2.0, "7": 0.5})

    async def go():
        async with Client(server) as client:
            zoom = await client.call_tool("zoom_region", {"image": "scene", "question": QUESTION})
            crop_id = zoom.structured_content["crop_id"]
            focused = await client.call_tool(
                "focused_answer", {"image": "scene", "question": QUESTION, "crop_id": crop_id}
            )
            vote = await client.call_tool(
                "arbitrate_answers",
                {"image": "scene", "question": QUESTION, "candidates": ["red", "7"], "crop_id": crop_id},
            )
            glance = await client.call_tool("global_answer", {"image": "scene", "question": QUESTION})
            return crop_id, focused, vote, glance

    crop_id, focused, vote, glance = asyncio.run(go())
    assert focused.structured_content["answer"] == "7" and focused.structured_content["crop_id"] == crop_id
    assert vote.structured_content["arbitration"]["scores"] == [2.0, 0.5]
    assert vote.structured_content["answer"] == "7"
    assert glance.structured_content["answer"] == "red"


@pytest.mark.parametrize(
    ("tool", "args", "message"),
    [
        ("global_answer", {"image": "../../etc/passwd", "question": "Q?"}, "file paths are disabled"),
        ("zoom_region", {"image": "https://example.com/a.png", "question": "Q?"}, "URLs are disabled"),
        ("focused_answer", {"image": "scene", "question": "Q?"}, "either as crop_id"),
        ("focused_answer", {"image": "scene", "question": "Q?", "crop_id": "crop-nope"}, "unknown image id"),
        ("arbitrate_answers", {"image": "scene", "question": "Q?", "candidates": ["a"], "box": [1, 1, 9, 9]},
         "at least 2 items"),
    ],
)  # fmt: skip
def test_mistakes_come_back_as_tool_errors_that_say_what_to_fix(tool: str, args: dict, message: str) -> None:
    server, _ = scripted_server()
    result = call(server, tool, args)
    assert result.is_error and message in result.content[0].text


def test_internal_failures_are_masked() -> None:
    class Broken(ScriptedBackend):
        def generate(self, conversation, max_new_tokens=128):
            raise RuntimeError("CUDA out of memory at 0xdeadbeef")

    toolbox = Toolbox(DualFocus(Broken()), ImageRegistry())
    toolbox.registry.register(SCENE.image, "scene")
    result = call(build_server(toolbox), "global_answer", {"image": "scene", "question": "Q?"})
    assert result.is_error and "0xdeadbeef" not in result.content[0].text


def test_recall_is_offered_with_a_memory(tmp_path: Path) -> None:
    with VisualQAMemory(tmp_path, embedder=HashingEmbedder()) as memory:
        server, _ = scripted_server(memory=memory)

        async def go():
            async with Client(server) as client:
                names = [t.name for t in await client.list_tools()]
                await client.call_tool("dualfocus_answer", {"image": "scene", "question": QUESTION})
                found = await client.call_tool("recall_visual_qa", {"question": QUESTION, "image": "scene"})
                return names, found

        names, found = asyncio.run(go())
    assert names == [*STEP_TOOLS, "recall_visual_qa"]
    records = found.structured_content["records"]
    assert [r["result"]["question"] for r in records] == [QUESTION] and records[0]["image_id"] == "scene"


def test_cli_options() -> None:
    argv = ["mcp", "--http", "8765", "--allow-root", "a", "--allow-root", "b"]
    args = build_parser(argv).parse_args(argv)
    assert (args.http, args.host, args.allow_root, args.allow_urls) == (8765, "127.0.0.1", ["a", "b"], False)
    assert build_parser(["mcp"]).parse_args(["mcp"]).http is None


# -- as a process: `df-agent mcp` -----------------------------------------------------------------------


def server_command(model: Path, root: Path, *extra: str) -> list[str]:
    return [
        "-m",
        "df_agent.cli",
        "mcp",
        "--model",
        str(model),
        "--device",
        "cpu",
        "--allow-root",
        str(root),
        *extra,
    ]


def offline_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


async def exercise(client: Client) -> tuple[list[str], Any, Any]:
    names = [t.name for t in await client.list_tools()]
    by_path = await client.call_tool("global_answer", {"image": "scene.png", "question": QUESTION})
    by_uri = await client.call_tool(
        "dualfocus_answer", {"image": to_data_uri(SCENE.image), "question": QUESTION}
    )
    return names, by_path, by_uri


@pytest.mark.slow
def test_df_agent_mcp_over_stdio(tiny_llava_path: Path, tmp_path: Path) -> None:
    SCENE.image.save(tmp_path / "scene.png")
    transport = StdioTransport(
        sys.executable, server_command(tiny_llava_path, tmp_path), env=offline_env(), keep_alive=False
    )

    async def go():
        async with Client(transport, timeout=120) as client:
            return await exercise(client)

    names, by_path, by_uri = asyncio.run(go())
    assert names == STEP_TOOLS
    assert not by_path.is_error and by_path.structured_content["image_id"].startswith("img-")
    trace = by_uri.structured_content["result"]
    assert trace["question"] == QUESTION and trace["model_id"] and "total" in trace["timings"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_df_agent_mcp_over_streamable_http(tiny_llava_path: Path, tmp_path: Path) -> None:
    SCENE.image.save(tmp_path / "scene.png")
    port = free_port()
    command = [sys.executable, *server_command(tiny_llava_path, tmp_path, "--http", str(port))]
    server = subprocess.Popen(command, env=offline_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the server did not start: {server.stderr.read().decode()[-2000:]}")
                time.sleep(0.2)

        async def go():
            async with Client(f"http://127.0.0.1:{port}/mcp", timeout=120) as client:
                return await exercise(client)

        names, by_path, by_uri = asyncio.run(go())
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert names == STEP_TOOLS
    assert not by_path.is_error and not by_uri.is_error
    assert by_uri.structured_content["result"]["question"] == QUESTION
