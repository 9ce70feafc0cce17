import asyncio
import tomllib
from importlib import resources

import pytest
from conftest import ScriptedBackend

from df_agent.agents.operations import Toolbox
from df_agent.agents.registry import ImageRegistry
from df_agent.agents.specs import DESCRIPTIONS
from df_agent.engine import DualFocus
from df_agent.prompt_sets import families, load_prompts


def test_dualfocus_prompts_are_the_official_wording() -> None:
    prompts = load_prompts("dualfocus")
    q = "What is on the sign?"
    assert prompts.locate.format(question=q) == (
        "Please provide the bounding box coordinate of the region this question asks: What is on the sign?"
    )
    assert prompts.micro.format(question=q) == (
        "Please combine the information from these two images and answer this question: What is on the sign?"
    )
    assert prompts.score.format(question=q) == (
        "Please combine the information from these two images and answer this question: What is on the sign?"
        "\nAnswer the question using a single word or phrase"
    )
    assert prompts.macro.format(question=q) == q


def test_options_are_lettered_with_the_letter_hint() -> None:
    text = load_prompts("dualfocus").with_options("Which colour?", ["red", "blue"])
    assert (
        text
        == "Which colour?\nA. red\nB. blue\nAnswer with the option's letter from the given choices directly."
    )
    assert load_prompts("dualfocus").with_options("Which colour?", None) == "Which colour?"


def test_every_family_has_every_step_with_a_question_slot() -> None:
    assert {"dualfocus", "qwen2_vl"} <= set(families())
    for family in families():
        prompts = load_prompts(family)
        for step in ("macro", "locate", "micro", "score"):
            assert "{question}" in getattr(prompts, step)


def test_unknown_family_names_the_shipped_ones() -> None:
    with pytest.raises(ValueError, match="dualfocus"):
        load_prompts("nope")


def tool_texts() -> dict[str, str]:
    """The planner-facing tool descriptions in prompts/_tools/, by tool name."""
    folder = resources.files("df_agent.prompts") / "_tools"
    return {
        p.name.removesuffix(".txt"): p.read_text(encoding="utf-8").removesuffix("\n")
        for p in folder.iterdir()
        if p.name.endswith(".txt")
    }


class Recalling:
    """A memory that can be searched, so that recall_visual_qa is offered; it is never called here."""

    def recall(self, query: str, image: object = None, k: int = 5) -> list:
        raise AssertionError("not called")


def test_langchain_tools_are_described_by_the_prompt_files() -> None:
    pytest.importorskip("langchain_core")
    from df_agent.tools import DualFocusToolkit

    texts = tool_texts()
    fields = tomllib.loads(
        (resources.files("df_agent.prompts") / "_tools" / "fields.toml").read_text("utf-8")
    )
    tools = DualFocusToolkit(engine=DualFocus(ScriptedBackend(), memory=Recalling())).get_tools()
    assert sorted(t.name for t in tools) == sorted(texts) == sorted(DESCRIPTIONS)
    used = set()
    for tool in tools:
        assert texts[tool.name].strip() and tool.description == texts[tool.name] == DESCRIPTIONS[tool.name]
        for field in tool.tool_call_schema.model_json_schema()["properties"].values():
            assert field["description"] in fields.values(), (tool.name, field)
            used.add(field["description"])
    assert used == set(fields.values())


def test_mcp_tools_are_described_by_the_prompt_files() -> None:
    pytest.importorskip("fastmcp")
    from fastmcp import Client

    from df_agent.agents.mcp import build_server

    server = build_server(Toolbox(DualFocus(ScriptedBackend(), memory=Recalling()), ImageRegistry()))

    async def listed():
        async with Client(server) as client:
            return await client.list_tools()

    texts = tool_texts()
    tools = asyncio.run(listed())
    assert sorted(t.name for t in tools) == sorted(texts)
    assert all(t.description == texts[t.name] for t in tools)
