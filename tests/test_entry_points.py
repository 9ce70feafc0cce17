"""Every entry point runs the session (fast) path: the language model's forward passes of one question.

Each entry point loads the shipped model afresh, so its count is compared with a fresh backend's
first question on the fast path (its drafts start empty too), and must be below the plain path's.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from df_agent.backends.hf import HFBackend, shipped_model_path
from df_agent.data.focusshapes import generate
from df_agent.engine import DualFocus

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def question(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    try:
        shipped_model_path()
    except FileNotFoundError:
        pytest.skip("the shipped model is not in df_agent/model/")
    scenes, records = generate(31, 1)
    record = next(r for r in records if r.qtype == "detail")
    folder = tmp_path_factory.mktemp("entry")
    path = folder / "scene.png"
    scenes[0].image.save(path)
    return path, record.question, record.answer


def passes(action: Callable[[], object]) -> int:
    """Forward passes of the shipped model's language model (a `LlamaModel`) while `action` runs."""
    count = 0

    def hook(module: torch.nn.Module, args: object, output: object) -> None:
        nonlocal count
        count += type(module).__name__ == "LlamaModel"

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        action()
    finally:
        handle.remove()
    return count


@pytest.fixture(scope="module")
def counts(question) -> dict[str, int]:
    """The fast and the plain path's passes for the question on fresh backends."""
    path, text, _ = question
    fast = DualFocus(HFBackend.from_pretrained(device="cpu"))
    plain = DualFocus(HFBackend.from_pretrained(device="cpu"), session=False)
    return {
        "fast": passes(lambda: fast.ask(path, text)),
        "plain": passes(lambda: plain.ask(path, text)),
    }


def check(count: int, counts: dict[str, int]) -> None:
    assert count == counts["fast"]
    assert count < counts["plain"]


def test_dualfocus_from_pretrained(question, counts) -> None:
    path, text, _ = question
    engine = DualFocus.from_pretrained(device="cpu")
    check(passes(lambda: engine.ask(path, text)), counts)


def test_cli_ask(question, counts, capsys) -> None:
    from df_agent.cli import main

    path, text, _ = question
    codes = []
    count = passes(lambda: codes.append(main(["ask", str(path), text, "--device", "cpu", "--json"])))
    assert codes == [0]
    check(count, counts)


def test_eval_harness(question, counts, tmp_path) -> None:
    from df_agent.cli import main
    from df_agent.eval import harness, jsonl

    path, text, answer = question
    questions = tmp_path / "one.jsonl"
    questions.write_text(json.dumps({"image": str(path), "question": text, "answer": answer}) + "\n")
    args = ["eval", "jsonl", "--questions", str(questions), "--json", str(tmp_path / "r.json"), "--quiet"]
    codes = []
    count = passes(lambda: codes.append(main([*args, "--device", "cpu"])))
    assert codes == [0]
    # the harness adds the other votes' scoring to the DualFocus pass: compare harness with harness
    reference = {}
    for name, session in (("fast", True), ("plain", False)):
        engine = DualFocus(HFBackend.from_pretrained(device="cpu"), session=session)
        out = tmp_path / f"{name}.json"
        reference[name] = passes(
            lambda engine=engine, out=out: harness.evaluate(
                engine, jsonl.benchmark(questions), out, progress=False
            )
        )
    check(count, reference)


def test_toolkit_tool_invoke(question, counts) -> None:
    from df_agent.tools import DualFocusToolkit

    path, text, _ = question
    toolkit = DualFocusToolkit.from_pretrained(device="cpu")
    image_id = toolkit.register_image(str(path))
    tool = next(t for t in toolkit.get_tools() if t.name == "dualfocus_answer")
    check(passes(lambda: tool.invoke({"image": image_id, "question": text})), counts)


def test_mcp_server_in_memory(question, counts) -> None:
    from fastmcp import Client

    from df_agent.agents.mcp import build_server
    from df_agent.agents.operations import Toolbox
    from df_agent.agents.registry import ImageRegistry

    path, text, _ = question
    toolbox = Toolbox(DualFocus.from_pretrained(device="cpu"), ImageRegistry())
    toolbox.registry.register(str(path), "scene")
    server = build_server(toolbox)

    async def ask() -> None:
        async with Client(server) as client:
            result = await client.call_tool("dualfocus_answer", {"image": "scene", "question": text})
            assert not result.is_error

    check(passes(lambda: asyncio.run(ask())), counts)
