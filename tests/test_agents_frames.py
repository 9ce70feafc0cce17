"""Zoom within a zoom: crop ids as images, boxes in both frames, several regions, the deeper zoom."""

from __future__ import annotations

import asyncio
import base64
import io
import re
from typing import Any

import pytest
from conftest import ScriptedBackend
from fastmcp import Client
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from PIL import Image

from df_agent.agents.inputs import FocusedInput, PipelineInput, ZoomInput
from df_agent.agents.mcp import build_server
from df_agent.agents.operations import Toolbox
from df_agent.backends.base import Conversation
from df_agent.boxes import Box, BoxConvention, parse_box, zoom_box
from df_agent.data.focusshapes import render_scene
from df_agent.engine import DualFocus
from df_agent.images import load_image
from df_agent.results import Location
from df_agent.tools import DualFocusToolkit

SCENE = render_scene("frames-test")
BOX = "[0.25,0.25,0.50,0.50]"  # the scripted model's box, whatever image it is shown


def zoom_of(image_size: tuple[int, int]) -> Box:
    """The crop the engine cuts for BOX in an image of `image_size`, in that image's pixels."""
    located = parse_box(BOX, BoxConvention.FRACTION, image_size)
    return zoom_box(located, image_size, margin=25, min_side=32)


def shifted(box: Box, by: Box) -> Box:
    return Box(x1=box.x1 + by.x1, y1=box.y1 + by.y1, x2=box.x2 + by.x1, y2=box.y2 + by.y1)


FIRST = zoom_of(SCENE.size)  # root pixels
SECOND_LOCAL = zoom_of((int(FIRST.width), int(FIRST.height)))  # pixels of the first crop
SECOND = shifted(SECOND_LOCAL, FIRST)  # root pixels


def toolbox(
    backend: ScriptedBackend | None = None, engine: type[DualFocus] = DualFocus, **kw: Any
) -> Toolbox:
    box = Toolbox(engine(backend or ScriptedBackend(box=BOX)), **kw)
    box.registry.register(SCENE.image, "scene")
    return box


# -- the toolbox ---------------------------------------------------------------------------------------


def test_zoom_region_on_a_crop_zooms_within_it_and_cuts_from_the_roots_pixels() -> None:
    tb = toolbox()
    first = tb.zoom_region(ZoomInput(image="scene", question="Q?"))
    assert first.crop_box == first.crop_box_root == FIRST and (first.frame, first.root_id) == (
        "scene",
        "scene",
    )
    second = tb.zoom_region(ZoomInput(image=first.crop_id, question="Q?"))
    assert (second.image_id, second.frame, second.root_id) == (first.crop_id, first.crop_id, "scene")
    assert second.image_size == (FIRST.width, FIRST.height) and second.root_size == SCENE.size
    assert second.crop_box == SECOND_LOCAL and second.crop_box_root == SECOND
    assert second.box_root == shifted(second.box, FIRST)
    crop = tb.registry.get(second.crop_id)
    assert crop.image.tobytes() == SCENE.image.crop(SECOND.as_int_tuple()).tobytes()
    assert "in pixels of the root image 'scene'" in second.summary()
    # the engine located inside the crop: the box request showed the first crop, not the whole image
    step, conversation = tb.engine.backend.generated[-1]
    assert step == "locate" and conversation.images[0].size == (FIRST.width, FIRST.height)


def test_focused_answer_on_a_crop_shows_the_crop_and_the_deeper_crop() -> None:
    tb = toolbox(ScriptedBackend(box=BOX, micro="7"))
    first = tb.zoom_region(ZoomInput(image="scene", question="Q?"))
    second = tb.zoom_region(ZoomInput(image=first.crop_id, question="Q?"))
    answer = tb.focused_answer(FocusedInput(image=first.crop_id, question="Q?", crop_id=second.crop_id))
    assert answer.answer == "7" and answer.crop_box_root == SECOND and answer.crop_box == SECOND_LOCAL
    step, conversation = tb.engine.backend.generated[-1]
    assert step == "micro" and conversation.turns[1].text == BOX  # the model's reply inside the crop
    shown_first, shown_crop = conversation.images
    assert shown_first.tobytes() == tb.registry.get(first.crop_id).image.tobytes()
    assert shown_crop.tobytes() == SCENE.image.crop(SECOND.as_int_tuple()).tobytes()
    # the same deeper crop asked about from the root: its region is written in the root's frame
    from_root = tb.focused_answer(FocusedInput(image="scene", question="Q?", crop_id=second.crop_id))
    assert from_root.crop_box == from_root.crop_box_root == SECOND
    assert tb.engine.backend.generated[-1][1].images[0].size == SCENE.size


def test_a_box_in_the_root_frame_or_the_crop_frame_gives_the_same_crop() -> None:
    tb = toolbox()
    first = tb.zoom_region(ZoomInput(image="scene", question="Q?"))
    local = [20, 30, 60, 70]
    in_root = [local[0] + FIRST.x1, local[1] + FIRST.y1, local[2] + FIRST.x1, local[3] + FIRST.y1]
    a = tb.focused_answer(FocusedInput(image=first.crop_id, question="Q?", box=local))
    b = tb.focused_answer(FocusedInput(image=first.crop_id, question="Q?", box=in_root, box_frame="root"))
    w, h = SCENE.size
    fractions = [in_root[0] / w, in_root[1] / h, in_root[2] / w, in_root[3] / h]
    c = tb.focused_answer(
        FocusedInput(
            image=first.crop_id, question="Q?", box=fractions, box_frame="root", box_units="fraction"
        )
    )
    assert a.crop_id == b.crop_id == c.crop_id and a.crop_box_root == shifted(a.crop_box, FIRST)
    outside = [0, 0, 20, 20]  # root pixels, outside the crop
    with pytest.raises(Exception, match=r"lies outside .*shows only part of the root image 'scene'"):
        tb.focused_answer(FocusedInput(image=first.crop_id, question="Q?", box=outside, box_frame="root"))


# -- several regions -----------------------------------------------------------------------------------


class Located(Location):
    """A Location with every box the model wrote, as the toolkit expects the engine's to carry them."""

    boxes: list[Box]


class EveryBox(DualFocus):
    """An engine whose locate step reads every ``[...]`` group of the reply (the parsing is the test's)."""

    def locate(self, image: Any, question: str) -> Location:
        location = super().locate(image, question)
        size = load_image(image).size
        boxes = [
            parse_box(group, BoxConvention.FRACTION, size)
            for group in re.findall(r"\[[^\]]*\]", location.box_text)
        ]
        return Located(**{**location.model_dump(), "boxes": [b for b in boxes if isinstance(b, Box)]})


TWO_BOXES = "[0.1,0.1,0.3,0.3] [0.6,0.6,0.9,0.9]"


def test_zoom_region_returns_each_region_with_its_own_crop_id() -> None:
    tb = toolbox(ScriptedBackend(box=TWO_BOXES), engine=EveryBox)
    region = tb.zoom_region(ZoomInput(image="scene", question="Q?"))
    assert len(region.regions) == 2 and region.regions[0].crop_id != region.regions[1].crop_id
    w, h = SCENE.size
    assert [r.box for r in region.regions] == [
        Box(x1=0.1 * w, y1=0.1 * h, x2=0.3 * w, y2=0.3 * h),
        Box(x1=0.6 * w, y1=0.6 * h, x2=0.9 * w, y2=0.9 * h),
    ]
    assert [r.box_text for r in region.regions] == ["[0.10,0.10,0.30,0.30]", "[0.60,0.60,0.90,0.90]"]
    assert region.crop_id == region.regions[0].crop_id and region.box == region.regions[0].box
    for r in region.regions:
        assert (
            tb.registry.get(r.crop_id).image.tobytes()
            == SCENE.image.crop(r.crop_box_root.as_int_tuple()).tobytes()
        )
    assert len(region.pictures()) == 2 and "Region 2 of 2" in region.summary()
    # each region's crop continues its own box in the micro step
    tb.focused_answer(FocusedInput(image="scene", question="Q?", crop_id=region.regions[1].crop_id))
    assert tb.engine.backend.generated[-1][1].turns[1].text == "[0.60,0.60,0.90,0.90]"


def test_one_box_is_one_region_as_before() -> None:
    tb = toolbox(ScriptedBackend(box=BOX))
    region = tb.zoom_region(ZoomInput(image="scene", question="Q?"))
    assert len(region.regions) == 1 and region.regions[0].box_text == BOX  # the model's reply, verbatim
    assert region.crop_box == FIRST and "Region for the question" in region.summary()


# -- the deeper zoom -----------------------------------------------------------------------------------


class Unsure(ScriptedBackend):
    """Reads '7' only when shown a crop as the first image; unsure (NLL 1.5) of the first zoom's answer."""

    def __init__(self, deeper_nll: float = 0.2, first_nll: float = 1.5) -> None:
        super().__init__(macro="red", box=BOX, micro="blue")
        self.nlls = (first_nll, deeper_nll)

    def generate(self, conversation: Conversation, max_new_tokens: int = 128) -> str:
        reply = super().generate(conversation, max_new_tokens)
        deeper = conversation.images[0].size != SCENE.size
        return "7" if self.step_of(conversation) == "micro" and deeper else reply

    def score(self, conversation: Conversation, candidates: list[str]) -> list[float]:
        self.scored.append((conversation, list(candidates)))
        deeper = conversation.images[0].size != SCENE.size
        return [self.nlls[deeper] for _ in candidates]


def test_zoom_deeper_fires_when_the_micro_answer_is_unsure_and_keeps_the_more_confident_answer() -> None:
    tb = toolbox(Unsure())
    plain = tb.dualfocus_answer(PipelineInput(image="scene", question="Q?"))
    assert plain.deeper is None and plain.answer == plain.result.answer
    answer = tb.dualfocus_answer(PipelineInput(image="scene", question="Q?", zoom_deeper=True))
    deeper = answer.deeper
    assert deeper.fired and deeper.micro_nll == 1.5 and deeper.answer_nll == 0.2 and deeper.chosen
    assert answer.answer == deeper.answer == "7" != answer.result.answer
    assert answer.crop_box_root == FIRST and deeper.crop_box_root == SECOND
    assert tb.registry.get(deeper.crop_id).root_id == "scene"
    assert "Deeper zoom: the zoomed answer's mean NLL 1.500 is above 0.3" in answer.summary()


@pytest.mark.parametrize(
    ("first_nll", "deeper_nll", "fired", "chosen"), [(0.1, 0.05, False, False), (1.5, 2.0, True, False)]
)
def test_zoom_deeper_stays_when_sure_or_when_the_deeper_answer_is_no_better(
    first_nll: float, deeper_nll: float, fired: bool, chosen: bool
) -> None:
    tb = toolbox(Unsure(deeper_nll=deeper_nll, first_nll=first_nll))
    answer = tb.dualfocus_answer(PipelineInput(image="scene", question="Q?", zoom_deeper=True))
    assert (answer.deeper.fired, answer.deeper.chosen) == (fired, chosen)
    assert answer.answer == answer.result.answer


# -- a planner zooms twice and reports a box in the original's pixels ---------------------------------

ROOT_BOX = re.compile(
    r"Cropped the square region \[[^\]]*\], that is \[([^\]]*)\] in pixels of the root image"
)


class TwoZooms(BaseChatModel):
    """Zooms into the scene, then into the crop; replies with the deeper crop's box in root pixels."""

    @property
    def _llm_type(self) -> str:
        return "two-zooms"

    def bind_tools(self, tools: Any, **kwargs: Any) -> TwoZooms:
        return self

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any):
        results = [m for m in messages if isinstance(m, ToolMessage)]
        if not results:
            reply = AIMessage("", tool_calls=[self._zoom("scene", "first")])
        elif len(results) == 1:
            crop_id = re.search(r"crop id '(crop-[0-9a-f]+)'", _text(results[0])).group(1)
            reply = AIMessage("", tool_calls=[self._zoom(crop_id, "second")])
        else:
            reply = AIMessage(f"The object is at [{ROOT_BOX.search(_text(results[1])).group(1)}].")
        return ChatResult(generations=[ChatGeneration(message=reply)])

    @staticmethod
    def _zoom(image: str, call_id: str) -> dict[str, Any]:
        return {"name": "zoom_region", "args": {"image": image, "question": "Where is the 7?"}, "id": call_id}


def _text(message: BaseMessage) -> str:
    content = message.content
    return (
        content
        if isinstance(content, str)
        else "\n".join(b["text"] for b in content if b.get("type") == "text")
    )


def test_a_langchain_agent_zooms_twice_and_reports_a_box_in_the_originals_pixels() -> None:
    from langchain.agents import create_agent

    toolkit = DualFocusToolkit(engine=DualFocus(ScriptedBackend(box=BOX)))
    toolkit.register_image(SCENE.image, "scene")
    state = create_agent(TwoZooms(), toolkit.get_tools()).invoke({"messages": [HumanMessage("Find the 7.")]})
    numbers = [float(v) for v in re.findall(r"\d+(?:\.\d+)?", state["messages"][-1].content.split("[", 1)[1])]
    assert Box(x1=numbers[0], y1=numbers[1], x2=numbers[2], y2=numbers[3]) == SECOND
    zooms = [m for m in state["messages"] if isinstance(m, ToolMessage)]
    assert zooms[1].artifact.image_id == zooms[0].artifact.crop_id  # the second zoom was inside the first
    shown = Image.open(io.BytesIO(base64.b64decode(zooms[1].content[1]["base64"])))
    assert shown.convert("RGB").tobytes() == SCENE.image.crop(SECOND.as_int_tuple()).tobytes()


def test_the_same_two_zooms_over_mcp() -> None:
    server = build_server(toolbox())

    async def go():
        async with Client(server) as client:
            first = await client.call_tool("zoom_region", {"image": "scene", "question": "Where is the 7?"})
            crop_id = first.structured_content["crop_id"]
            second = await client.call_tool("zoom_region", {"image": crop_id, "question": "Where is the 7?"})
            deeper = await client.call_tool(
                "dualfocus_answer", {"image": "scene", "question": "Q?", "zoom_deeper": True}
            )
            return first, second, deeper

    first, second, deeper = asyncio.run(go())
    assert Box(**first.structured_content["crop_box_root"]) == FIRST
    region = second.structured_content
    assert (region["frame"], region["root_id"]) == (first.structured_content["crop_id"], "scene")
    assert Box(**region["crop_box_root"]) == SECOND and Box(**region["crop_box"]) == SECOND_LOCAL
    shown = Image.open(io.BytesIO(base64.b64decode(second.content[1].data)))
    assert shown.convert("RGB").tobytes() == SCENE.image.crop(SECOND.as_int_tuple()).tobytes()
    assert deeper.structured_content["deeper"]["threshold"] == 0.3  # scripted NLL 1.0: it fired
    assert Box(**deeper.structured_content["deeper"]["crop_box_root"]) == SECOND
