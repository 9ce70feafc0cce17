"""The LangChain toolkit: standard tool suites, child runs, an agent, image-reference safety, async."""

from __future__ import annotations

import asyncio
import base64
import builtins
import io
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from conftest import ScriptedBackend
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.tools import BaseTool, ToolException
from langchain_tests.integration_tests import ToolsIntegrationTests
from langchain_tests.unit_tests import ToolsUnitTests
from PIL import Image

import df_agent
import df_agent.tools
from df_agent.agents.answers import PipelineAnswer, RegionAnswer
from df_agent.agents.errors import ToolInputError
from df_agent.agents.inputs import PipelineInput
from df_agent.agents.operations import Toolbox, planner_box
from df_agent.agents.registry import ImageRegistry
from df_agent.boxes import Box, BoxConvention, format_box, parse_box, zoom_box
from df_agent.data.focusshapes import Scene, render_scene
from df_agent.engine import DualFocus
from df_agent.memory import MemoryUnavailableError, VisualQAMemory
from df_agent.memory.embeddings import HashingEmbedder
from df_agent.results import FocusResult
from df_agent.tools import (
    ArbitrateAnswersTool,
    DualFocusAnswerTool,
    DualFocusToolkit,
    FocusedAnswerTool,
    GlobalAnswerTool,
    RecallVisualQATool,
    ZoomRegionTool,
)

SHIPPED = (Path(df_agent.__file__).parent / "model" / "config.json").is_file()
SCENE = render_scene("tools-test")
TARGET = SCENE.objects[0]
QUESTION = f"What number is on the {TARGET.name}?"


# -- shared state for the standard suites: one engine per session ------------------------------------


@pytest.fixture(scope="session")
def model_memory(tmp_path_factory: pytest.TempPathFactory):
    memory = VisualQAMemory(tmp_path_factory.mktemp("memory"), embedder=HashingEmbedder())
    yield memory
    memory.close()


@pytest.fixture(scope="session")
def model_engine(request: pytest.FixtureRequest, model_memory: VisualQAMemory) -> DualFocus:
    """The shipped model when it exists, else the tiny random LLaVA (short answers keep it fast)."""
    if SHIPPED:
        return DualFocus.from_pretrained(device="cpu", memory=model_memory)
    return DualFocus(request.getfixturevalue("tiny_llava_backend"), max_new_tokens=8, memory=model_memory)


@pytest.fixture(scope="session")
def model_toolbox(model_engine: DualFocus) -> Toolbox:
    registry = ImageRegistry()
    registry.register(SCENE.image, "scene")
    toolbox = Toolbox(model_engine, registry)
    toolbox.dualfocus_answer(PipelineInput(image="scene", question=QUESTION))  # something to recall
    return toolbox


EXAMPLES: dict[type[BaseTool], dict[str, Any]] = {
    DualFocusAnswerTool: {"image": "scene", "question": QUESTION},
    GlobalAnswerTool: {"image": "scene", "question": "How many objects are there?"},
    ZoomRegionTool: {"image": "scene", "question": QUESTION},
    FocusedAnswerTool: {
        "image": "scene", "question": QUESTION, "box": list(TARGET.box), "box_units": "pixels",
    },
    ArbitrateAnswersTool: {
        "image": "scene", "question": QUESTION, "candidates": ["3", "8"], "box": [0.1, 0.1, 0.4, 0.4],
        "box_units": "fraction",
    },
    RecallVisualQATool: {"question": "which number is on the shape?", "image": "scene", "k": 3},
}  # fmt: skip


class StandardCase:
    """Binds a tool class and its example call to the session's toolbox for the langchain-tests suites."""

    tool_class: type[BaseTool]

    @pytest.fixture(autouse=True)
    def _bind_toolbox(self, model_toolbox: Toolbox) -> None:
        self.toolbox = model_toolbox

    @property
    def tool_constructor(self) -> type[BaseTool]:
        return self.tool_class

    @property
    def tool_constructor_params(self) -> dict[str, Any]:
        return {"toolbox": self.toolbox}

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return EXAMPLES[self.tool_class]


class DualFocusAnswerCase(StandardCase):
    tool_class = DualFocusAnswerTool


class GlobalAnswerCase(StandardCase):
    tool_class = GlobalAnswerTool


class ZoomRegionCase(StandardCase):
    tool_class = ZoomRegionTool


class FocusedAnswerCase(StandardCase):
    tool_class = FocusedAnswerTool


class ArbitrateAnswersCase(StandardCase):
    tool_class = ArbitrateAnswersTool


class RecallCase(StandardCase):
    tool_class = RecallVisualQATool


class TestDualFocusAnswerUnit(DualFocusAnswerCase, ToolsUnitTests):
    pass


class TestDualFocusAnswerIntegration(DualFocusAnswerCase, ToolsIntegrationTests):
    pass


class TestGlobalAnswerUnit(GlobalAnswerCase, ToolsUnitTests):
    pass


class TestGlobalAnswerIntegration(GlobalAnswerCase, ToolsIntegrationTests):
    pass


class TestZoomRegionUnit(ZoomRegionCase, ToolsUnitTests):
    pass


class TestZoomRegionIntegration(ZoomRegionCase, ToolsIntegrationTests):
    pass


class TestFocusedAnswerUnit(FocusedAnswerCase, ToolsUnitTests):
    pass


class TestFocusedAnswerIntegration(FocusedAnswerCase, ToolsIntegrationTests):
    pass


class TestArbitrateAnswersUnit(ArbitrateAnswersCase, ToolsUnitTests):
    pass


class TestArbitrateAnswersIntegration(ArbitrateAnswersCase, ToolsIntegrationTests):
    pass


class TestRecallUnit(RecallCase, ToolsUnitTests):
    pass


class TestRecallIntegration(RecallCase, ToolsIntegrationTests):
    pass


def test_the_standard_examples_really_ran_the_model(model_toolbox: Toolbox) -> None:
    """The suites accept any content; check that the examples above give real, successful results."""
    for tool_class, example in EXAMPLES.items():
        message = tool_class(toolbox=model_toolbox).invoke(tool_call(tool_class, example))
        assert message.status == "success", message.content
        if tool_class is RecallVisualQATool:
            assert message.artifact.records[0].result.question == QUESTION


# -- helpers ----------------------------------------------------------------------------------------


def tool_call(
    tool: type[BaseTool] | BaseTool, args: dict[str, Any], call_id: str = "call-1"
) -> dict[str, Any]:
    name = tool.name if isinstance(tool, BaseTool) else tool.spec.name
    return {"type": "tool_call", "id": call_id, "name": name, "args": args}


class StepRecorder(BaseCallbackHandler):
    """Records each chain run whose parent is a tool run: the tool, the step name, inputs and outputs."""

    run_inline = True

    def __init__(self) -> None:
        self.tool_runs: dict[UUID, str] = {}
        self.open: dict[UUID, dict[str, Any]] = {}
        self.steps: list[dict[str, Any]] = []

    def on_tool_start(
        self, serialized: dict[str, Any], input_str: str, *, run_id: UUID, **kwargs: Any
    ) -> None:
        self.tool_runs[run_id] = serialized["name"]

    def on_chain_start(
        self, serialized: Any, inputs: Any, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        if parent_run_id in self.tool_runs:
            self.open[run_id] = {
                "tool": self.tool_runs[parent_run_id],
                "step": kwargs.get("name"),
                "inputs": inputs,
            }

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        if run_id in self.open:
            self.steps.append({**self.open.pop(run_id), "outputs": outputs})

    def of(self, tool: str) -> dict[str, dict[str, Any]]:
        return {s["step"]: s for s in self.steps if s["tool"] == tool}


def scripted_toolkit(scene: Scene | None = None, **backend: Any) -> DualFocusToolkit:
    toolkit = DualFocusToolkit(engine=DualFocus(ScriptedBackend(**backend)))
    toolkit.register_image((scene or SCENE).image, "scene")
    return toolkit


def tools_of(toolkit: DualFocusToolkit) -> dict[str, BaseTool]:
    return {tool.name: tool for tool in toolkit.get_tools()}


def text_of(message: BaseMessage) -> str:
    if isinstance(message.content, str):
        return message.content
    return "\n".join(block["text"] for block in message.content if block.get("type") == "text")


# -- the toolkit -------------------------------------------------------------------------------------


def test_toolkit_shares_one_toolbox_and_offers_recall_only_with_a_memory(tmp_path: Path) -> None:
    toolkit = scripted_toolkit()
    tools = toolkit.get_tools()
    assert [t.name for t in tools] == [
        "dualfocus_answer", "global_answer", "zoom_region", "focused_answer", "arbitrate_answers",
    ]  # fmt: skip
    assert all(t.toolbox is toolkit.toolbox for t in tools)
    assert all(t.response_format == "content_and_artifact" and t.handle_tool_error for t in tools)
    with VisualQAMemory(tmp_path, embedder=HashingEmbedder()) as memory:
        with_memory = DualFocusToolkit(engine=DualFocus(toolkit.engine.backend, memory=memory)).get_tools()
        assert with_memory[-1].name == "recall_visual_qa"
    with pytest.raises(ValueError, match="give it to the engine"):
        DualFocusToolkit(engine=toolkit.engine, memory=memory)


def test_every_argument_is_described_for_a_planner() -> None:
    recall = RecallVisualQATool(toolbox=Toolbox(DualFocus(ScriptedBackend())))
    for tool in [*scripted_toolkit().get_tools(), recall]:
        schema = tool.tool_call_schema.model_json_schema()
        for name, field in schema["properties"].items():
            assert len(field.get("description", "")) > 30, (tool.name, name)
        assert len(tool.description) > 100
    box = FocusedAnswerTool.spec.input.model_json_schema()["properties"]
    assert "pixels" in box["box_units"]["description"] and "fraction" in box["box_units"]["description"]
    assert "[x1, y1, x2, y2]" in box["box"]["description"]


# -- the whole pipeline: nested child runs ------------------------------------------------------------


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
def test_dualfocus_answer_child_runs_carry_the_box_and_both_scores(mode: str) -> None:
    toolkit = scripted_toolkit(macro="red", micro="blue", scores={"red": 2.5, "blue": 0.75})
    tool = tools_of(toolkit)["dualfocus_answer"]
    recorder = StepRecorder()
    call = tool_call(tool, {"image": "scene", "question": QUESTION})
    config = {"callbacks": [recorder]}
    message = tool.invoke(call, config) if mode == "invoke" else asyncio.run(tool.ainvoke(call, config))
    pipeline: PipelineAnswer = message.artifact
    result: FocusResult = pipeline.result
    assert isinstance(result, FocusResult) and result.answer == pipeline.answer == "blue"
    assert result.path == "micro" and pipeline.deeper is None  # no deeper zoom unless asked
    steps = recorder.of("dualfocus_answer")
    assert [s["step"] for s in recorder.steps] == ["macro", "locate", "zoom", "micro", "arbitrate"]
    assert steps["locate"]["outputs"]["box"] == result.box.model_dump()
    assert steps["zoom"]["inputs"]["box"] == result.box.model_dump()
    assert steps["zoom"]["outputs"]["crop_box"] == result.crop_box.model_dump()
    assert steps["macro"]["outputs"] == {"answer": "red"} and steps["micro"]["outputs"] == {"answer": "blue"}
    vote = steps["arbitrate"]
    assert vote["inputs"]["candidates"] == ["red", "blue"]
    assert vote["outputs"]["scores"] == [2.5, 0.75] == [result.scores["macro"], result.scores["micro"]]
    assert vote["inputs"]["candidates"][vote["outputs"]["winner"]] == "blue"
    crop_id = re.search(r"crop id '(crop-[0-9a-f]+)'", message.content).group(1)
    assert toolkit.registry.get(crop_id).box == result.crop_box


# -- an agent with a scripted planner ------------------------------------------------------------------

Turn = Callable[[list[BaseMessage]], AIMessage]


class ScriptedPlanner(BaseChatModel):
    """A chat model that replies turn by turn from a script; each turn reads the messages so far."""

    script: list[Turn]

    @property
    def _llm_type(self) -> str:
        return "scripted-planner"

    def bind_tools(self, tools: Any, **kwargs: Any) -> ScriptedPlanner:
        return self

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any
    ):
        turn = sum(isinstance(m, AIMessage) for m in messages)
        return ChatResult(generations=[ChatGeneration(message=self.script[turn](messages))])


def tool_result(messages: list[BaseMessage], call_id: str) -> str:
    return text_of(next(m for m in messages if isinstance(m, ToolMessage) and m.tool_call_id == call_id))


def zoom_focus_arbitrate_script(question: str) -> list[Turn]:
    """Look globally and zoom; answer from the crop id; vote between the two; reply with the winner."""
    image = {"image": "scene", "question": question}

    def first(messages: list[BaseMessage]) -> AIMessage:
        return AIMessage("", tool_calls=[
            {"name": "global_answer", "args": image, "id": "global"},
            {"name": "zoom_region", "args": image, "id": "zoom"},
        ])  # fmt: skip

    def second(messages: list[BaseMessage]) -> AIMessage:
        zoomed = re.search(r"crop id '(crop-[0-9a-f]+)'", tool_result(messages, "zoom"))
        assert zoomed, f"zoom_region made no crop: {tool_result(messages, 'zoom')}"
        crop_id = zoomed.group(1)
        return AIMessage(
            "", tool_calls=[{"name": "focused_answer", "args": {**image, "crop_id": crop_id}, "id": "focus"}]
        )

    def third(messages: list[BaseMessage]) -> AIMessage:
        global_answer = tool_result(messages, "global").split(": ", 1)[1]
        focused = tool_result(messages, "focus").split("): ", 1)[1]
        crop_id = re.search(r"crop id '(crop-[0-9a-f]+)'", tool_result(messages, "focus")).group(1)
        args = {**image, "candidates": [global_answer, focused], "crop_id": crop_id}
        return AIMessage("", tool_calls=[{"name": "arbitrate_answers", "args": args, "id": "vote"}])

    def last(messages: list[BaseMessage]) -> AIMessage:
        return AIMessage(re.match(r"Winner: '(.*)'\.", tool_result(messages, "vote")).group(1))

    return [first, second, third, last]


def run_agent(toolkit: DualFocusToolkit, question: str) -> tuple[list[BaseMessage], StepRecorder]:
    from langchain.agents import create_agent

    agent = create_agent(ScriptedPlanner(script=zoom_focus_arbitrate_script(question)), toolkit.get_tools())
    recorder = StepRecorder()
    state = agent.invoke(
        {"messages": [HumanMessage(f"Image 'scene': {question}")]}, {"callbacks": [recorder]}
    )
    return state["messages"], recorder


def test_agent_zooms_focuses_and_arbitrates_on_a_focusshapes_scene() -> None:
    box_text = format_box(Box(x1=TARGET.box[0], y1=TARGET.box[1], x2=TARGET.box[2], y2=TARGET.box[3]),
                          BoxConvention.FRACTION, SCENE.size)  # fmt: skip
    toolkit = scripted_toolkit(macro="red", micro="blue", box=box_text, scores={"red": 1.5, "blue": 0.5})
    messages, recorder = run_agent(toolkit, QUESTION)

    calls = [c["name"] for m in messages if isinstance(m, AIMessage) for c in m.tool_calls]
    assert calls == ["global_answer", "zoom_region", "focused_answer", "arbitrate_answers"]
    assert all(m.status == "success" for m in messages if isinstance(m, ToolMessage))
    region: RegionAnswer = next(
        m.artifact for m in messages if isinstance(m, ToolMessage) and m.name == "zoom_region"
    )
    vote = next(m.artifact for m in messages if isinstance(m, ToolMessage) and m.name == "arbitrate_answers")
    assert vote.crop_id == region.crop_id and vote.arbitration.candidates == ["red", "blue"]
    assert messages[-1].content == vote.answer == "blue"

    # The callback handler saw the zoom: the box read from the model's text, squared with the margin.
    zoom = recorder.of("zoom_region")["zoom"]
    located = parse_box(box_text, BoxConvention.FRACTION, SCENE.size)
    assert zoom["inputs"]["box"] == located.model_dump()
    assert zoom["outputs"]["crop_box"] == zoom_box(located, SCENE.size, margin=25, min_side=32).model_dump()
    assert located.iou(Box(x1=TARGET.box[0], y1=TARGET.box[1], x2=TARGET.box[2], y2=TARGET.box[3])) > 0.9
    # focused_answer reused the crop: no second zoom, and the micro step continued the model's box text.
    assert "zoom" not in recorder.of("focused_answer")
    assert recorder.of("focused_answer")["micro"]["inputs"]["box_text"] == box_text


@pytest.mark.skipif(not SHIPPED, reason="the digit can only be read by the shipped model (df_agent/model/)")
def test_agent_on_the_shipped_model_answers_the_digit() -> None:
    toolkit = DualFocusToolkit(engine=DualFocus.from_pretrained(device="cpu"))
    scene = render_scene("agent-test")
    target = scene.objects[0]
    toolkit.register_image(scene.image, "scene")
    messages, recorder = run_agent(toolkit, f"What number is on the {target.name}?")
    zoom = recorder.of("zoom_region")["zoom"]
    assert Box(**zoom["outputs"]["crop_box"]).area > 0
    assert messages[-1].content.strip().rstrip(".") == str(target.digit)


# -- regions: crop ids and planner boxes ---------------------------------------------------------------


def test_zoom_region_returns_the_crop_as_an_image_block() -> None:
    toolkit = scripted_toolkit(box="[0.25,0.25,0.50,0.50]")
    message = tools_of(toolkit)["zoom_region"].invoke(
        tool_call(ZoomRegionTool, {"image": "scene", "question": "Q?"})
    )
    region: RegionAnswer = message.artifact
    assert region.box == Box(x1=80, y1=80, x2=160, y2=160)
    assert region.box_normalized == (0.25, 0.25, 0.5, 0.5)
    assert region.box_text == "[0.25,0.25,0.50,0.50]"
    text, image = message.content
    assert region.crop_id in text["text"] and "[80, 80, 160, 160]" in text["text"]
    assert image["type"] == "image" and image["mime_type"] == "image/png"
    crop = Image.open(io.BytesIO(base64.b64decode(image["base64"])))
    assert crop.size == (round(region.crop_box.width), round(region.crop_box.height))
    assert toolkit.registry.get(region.crop_id).image.tobytes() == crop.convert("RGB").tobytes()


def test_zoom_region_without_a_readable_box_tells_the_planner_what_to_do() -> None:
    toolkit = scripted_toolkit(box="somewhere on the left")
    message = tools_of(toolkit)["zoom_region"].invoke(
        tool_call(ZoomRegionTool, {"image": "scene", "question": "Q?"})
    )
    assert message.status == "success" and message.artifact.box is None and message.artifact.crop_id is None
    assert "no readable region" in message.content and "focused_answer" in message.content


def test_focused_answer_on_a_crop_id_continues_the_models_box_conversation() -> None:
    toolkit = scripted_toolkit(box="[0.25,0.25,0.50,0.50]", micro="7")
    tools = tools_of(toolkit)
    region = (
        tools["zoom_region"].invoke(tool_call(ZoomRegionTool, {"image": "scene", "question": "Q?"})).artifact
    )
    message = tools["focused_answer"].invoke(
        tool_call(FocusedAnswerTool, {"image": "scene", "question": "Q?", "crop_id": region.crop_id})
    )
    assert message.artifact.answer == "7" and message.artifact.crop_id == region.crop_id
    step, conversation = toolkit.engine.backend.generated[-1]
    assert step == "micro"
    assert conversation.turns[1].text == "[0.25,0.25,0.50,0.50]"
    full, crop = conversation.images
    assert full.size == SCENE.size and crop.size == (130, 130)


def test_a_planner_box_in_pixels_or_fractions_gives_the_same_crop() -> None:
    toolkit = scripted_toolkit()
    tool = tools_of(toolkit)["focused_answer"]
    w, h = SCENE.size
    pixel_box = {"image": "scene", "question": "Q?", "box": [64, 32, 128, 96]}
    fraction_box = {**pixel_box, "box": [64 / w, 32 / h, 128 / w, 96 / h], "box_units": "fraction"}
    pixels = tool.invoke(tool_call(tool, pixel_box)).artifact
    fraction = tool.invoke(tool_call(tool, fraction_box)).artifact
    expected = zoom_box(Box(x1=64, y1=32, x2=128, y2=96), SCENE.size, margin=25, min_side=32)
    assert pixels.crop_box == fraction.crop_box == expected
    assert pixels.box_text == "[0.20,0.10,0.40,0.30]"  # the planner's box, written as the model writes boxes


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({}, "either as crop_id"),
        ({"crop_id": "CROP", "box": [1, 2, 30, 40]}, "not both"),
        ({"crop_id": "scene"}, "is a whole image, not a crop"),
        ({"crop_id": "crop-000000000000"}, "unknown image id"),
        ({"box": [1, 2, 3]}, r"Invalid arguments \(box: List should have at least 4 items"),
        ({"box": [30, 40, 10, 50]}, "empty or inverted"),
        ({"box": [0.1, 0.1, 0.5, 0.5]}, "smaller than one pixel.*box_units='fraction'"),
        ({"box": [10, 10, 200, 200], "box_units": "fraction"}, "outside 0..1"),
        ({"box": [500, 500, 600, 600]}, "lies outside the 320x320 image"),
        ({"box": [1, 2, 30, 40], "box_units": "inches"}, r"Invalid arguments \(box_units"),
    ],
)
def test_bad_regions_are_tool_errors_that_say_how_to_fix_them(args: dict[str, Any], message: str) -> None:
    toolkit = scripted_toolkit()
    tools = tools_of(toolkit)
    region = (
        tools["zoom_region"].invoke(tool_call(ZoomRegionTool, {"image": "scene", "question": "Q?"})).artifact
    )
    args = {k: (region.crop_id if v == "CROP" else v) for k, v in args.items()}
    result = tools["focused_answer"].invoke(
        tool_call(FocusedAnswerTool, {"image": "scene", "question": "Q?", **args})
    )
    assert result.status == "error"
    assert re.search(message, result.content), result.content


def test_a_crop_of_another_image_is_refused() -> None:
    toolkit = scripted_toolkit()
    toolkit.register_image(render_scene("other").image, "other")
    tools = tools_of(toolkit)
    region = (
        tools["zoom_region"].invoke(tool_call(ZoomRegionTool, {"image": "other", "question": "Q?"})).artifact
    )
    result = tools["focused_answer"].invoke(
        tool_call(FocusedAnswerTool, {"image": "scene", "question": "Q?", "crop_id": region.crop_id})
    )
    assert result.status == "error" and "was cut from another image" in result.content


def test_arbitrate_scores_every_candidate_and_picks_the_lowest() -> None:
    toolkit = scripted_toolkit(scores={"one": 3.0, "two": 1.0, "three": 2.0})
    tool = tools_of(toolkit)["arbitrate_answers"]
    args = {
        "image": "scene",
        "question": "Q?",
        "candidates": ["one", "two", "three"],
        "box": [10, 10, 90, 90],
    }
    message = tool.invoke(tool_call(tool, args))
    assert message.artifact.arbitration.scores == [3.0, 1.0, 2.0] and message.artifact.answer == "two"
    assert message.content.startswith("Winner: 'two'.")
    scored_context, scored = toolkit.engine.backend.scored[-1]
    assert scored == ["one", "two", "three"] and len(scored_context.images) == 2  # the micro context
    too_few = tool.invoke(tool_call(tool, {**args, "candidates": ["one"]}))
    assert too_few.status == "error" and "candidates" in too_few.content


def test_planner_box_conversions() -> None:
    assert planner_box([0.5, 0.25, 1.0, 0.75], "fraction", (200, 100)) == Box(x1=100, y1=25, x2=200, y2=75)
    assert planner_box([-10, 5, 50, 500], "pixels", (200, 100)) == Box(x1=0, y1=5, x2=50, y2=100)
    with pytest.raises(ToolInputError, match="four finite numbers"):
        planner_box([1, 2, float("nan"), 4], "pixels", (200, 100))


# -- image references through the tools: never a crash, never a read outside the roots ------------


@pytest.fixture
def guarded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A toolkit whose only allowed root holds an image and a text file; a readable secret lies outside."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    SCENE.image.save(root / "scene.png")
    (root / "notes.txt").write_text("hello")
    SCENE.image.save(outside / "secret.png")
    (root / "link.png").symlink_to(outside / "secret.png")
    (root / "linked_dir").symlink_to(outside, target_is_directory=True)
    toolkit = DualFocusToolkit(engine=DualFocus(ScriptedBackend()), registry=ImageRegistry([root]))
    opened: list[str] = []
    real_os_open, real_open = os.open, builtins.open

    def spy_os_open(path, *args, **kwargs):
        opened.append(os.path.realpath(path))
        return real_os_open(path, *args, **kwargs)

    def spy_open(file, *args, **kwargs):
        if isinstance(file, str | os.PathLike):
            opened.append(os.path.realpath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy_os_open)
    monkeypatch.setattr(builtins, "open", spy_open)
    return {"toolkit": toolkit, "root": os.path.realpath(root), "opened": opened}


@pytest.mark.parametrize(
    ("image", "message"),
    [
        ("../../etc/passwd", "outside the folders the host allowed"),
        ("/etc/passwd", "outside the folders the host allowed"),
        ("../outside/secret.png", "outside the folders the host allowed"),
        ("link.png", "outside the folders the host allowed"),
        ("linked_dir/secret.png", "outside the folders the host allowed"),
        ("crop-0123456789ab", "neither a known image id nor a file"),
        ("notes.txt", "is not a readable image"),
        ("https://example.com/scene.png", "URLs are disabled by the host"),
        ("file:///etc/passwd", "references are not supported"),
        ("data:image/png;base64,bm90IGFuIGltYWdl", "data URI is not a readable image"),
    ],
)
def test_bad_image_references_are_tool_errors(guarded: dict[str, Any], image: str, message: str) -> None:
    tool = tools_of(guarded["toolkit"])["zoom_region"]
    result = tool.invoke(tool_call(tool, {"image": image, "question": "What is this?"}))
    assert isinstance(result, ToolMessage) and result.status == "error"
    assert message in result.content
    args = {"image": image, "question": "What is this?"}
    assert tool.invoke(args) == result.content  # a plain call (no tool call id) does not raise either
    with pytest.raises(ToolException, match=re.escape(message)):
        tool.model_copy(update={"handle_tool_error": False}).invoke(args)
    assert all(Path(path).is_relative_to(guarded["root"]) for path in guarded["opened"]), guarded["opened"]
    assert guarded["toolkit"].engine.backend.generated == []  # the model never ran


@pytest.mark.parametrize("tool_class", list(EXAMPLES))
def test_every_tool_refuses_a_traversal(guarded: dict[str, Any], tool_class: type[BaseTool]) -> None:
    toolbox = guarded["toolkit"].toolbox
    engine = DualFocus(toolbox.engine.backend, memory=_NeverRecalls())
    tool = tool_class(toolbox=Toolbox(engine, toolbox.registry))
    result = tool.invoke(tool_call(tool, {**EXAMPLES[tool_class], "image": "../../etc/passwd"}))
    assert result.status == "error" and "outside the folders the host allowed" in result.content
    assert guarded["opened"] == []


class _NeverRecalls:
    def recall(self, query: str, image: Any = None, k: int = 5) -> list[Any]:
        raise AssertionError("recall must not run for an image it cannot read")


def test_a_path_inside_the_root_works(guarded: dict[str, Any]) -> None:
    tool = tools_of(guarded["toolkit"])["global_answer"]
    result = tool.invoke(tool_call(tool, {"image": "scene.png", "question": "What is this?"}))
    assert result.status == "success" and result.artifact.answer == "red"


# -- async and concurrency on one engine ----------------------------------------------------------------


def test_concurrent_ainvoke_on_one_hf_engine_matches_sequential(tiny_llava_backend) -> None:
    toolkit = DualFocusToolkit(engine=DualFocus(tiny_llava_backend, max_new_tokens=6))
    toolkit.register_image(SCENE.image, "scene")
    tools = tools_of(toolkit)
    questions = ["What color is the star?", "How many objects are there?", QUESTION, "Is there a red circle?"]
    calls = [
        (tools[name], tool_call(tools[name], {"image": "scene", "question": q}, f"call-{i}"))
        for i, q in enumerate(questions) for name in ("global_answer", "dualfocus_answer")
    ]  # fmt: skip
    sequential = [tool.invoke(call) for tool, call in calls]

    async def together() -> list[ToolMessage]:
        return await asyncio.gather(*(tool.ainvoke(call) for tool, call in calls))

    concurrent = asyncio.run(together())
    assert [m.content for m in concurrent] == [m.content for m in sequential]
    assert all(m.status == "success" for m in concurrent)


# -- memory: recall, exact repeats ---------------------------------------------------------------------


def test_answers_are_logged_recalled_and_repeats_come_from_memory(tmp_path: Path) -> None:
    with VisualQAMemory(tmp_path, embedder=HashingEmbedder()) as memory:
        toolkit = DualFocusToolkit(engine=DualFocus(ScriptedBackend(macro="red", micro="red"), memory=memory))
        toolkit.register_image(SCENE.image, "scene")
        toolkit.register_image(render_scene("other").image, "other")
        tools = tools_of(toolkit)
        answer = tools["dualfocus_answer"]
        first = answer.invoke(tool_call(answer, {"image": "scene", "question": "What color is the star?"}))
        answer.invoke(tool_call(answer, {"image": "other", "question": "How many objects are there?"}))
        repeat = answer.invoke(tool_call(answer, {"image": "scene", "question": "What color is the star?"}))
        assert not first.artifact.result.cached and repeat.artifact.result.cached
        assert "Answered from memory" in repeat.content
        assert len(toolkit.engine.backend.generated) == 6  # two askings ran the model (3 generations each)

        recall = tools["recall_visual_qa"]
        found = recall.invoke(tool_call(recall, {"question": "star color?"})).artifact
        assert found.records[0].result.question == "What color is the star?"
        assert found.records[0].image_id == "scene" and found.records[0].distance < found.records[-1].distance
        only_other = recall.invoke(tool_call(recall, {"question": "star color?", "image": "other"}))
        assert [r.result.question for r in only_other.artifact.records] == ["How many objects are there?"]
        assert "about image 'other'" in only_other.content


def test_recall_errors_are_tool_errors() -> None:
    class Unreachable:
        def recall(self, query: str, image: Any = None, k: int = 5) -> list[Any]:
            raise MemoryUnavailableError("server at http://127.0.0.1:9 refused the connection")

    unreachable = RecallVisualQATool(toolbox=Toolbox(DualFocus(ScriptedBackend(), memory=Unreachable())))
    result = unreachable.invoke(tool_call(unreachable, {"question": "anything?"}))
    assert result.status == "error" and "cannot be reached now" in result.content
    missing = RecallVisualQATool(toolbox=Toolbox(DualFocus(ScriptedBackend())))
    assert "no visual Q&A memory" in missing.invoke({"question": "anything?"})
