"""`DualFocusToolkit.from_chat_model`: one LangChain chat model plans the agent and is its vision model."""

from __future__ import annotations

import re
import threading
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from pydantic import Field

from df_agent.data.focusshapes import render_scene
from df_agent.tools import DualFocusToolkit

chat_model = pytest.importorskip(
    "df_agent.backends.chat_model", reason="df_agent.backends.chat_model (ChatModelBackend) is not there yet"
)

SCENE = render_scene("chat-model-test")
QUESTION = "What number is on the star?"


class PlansAndSees(BaseChatModel):
    """Plans when asked by the agent (a tool call, then the tool's answer); sees when shown images."""

    seen: list[int] = Field(default_factory=list)  # images shown to each vision call
    lock: Any = Field(default_factory=threading.Lock)

    @property
    def _llm_type(self) -> str:
        return "plans-and-sees"

    def bind_tools(self, tools: Any, **kwargs: Any) -> PlansAndSees:
        return self

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any
    ) -> ChatResult:
        last = messages[-1]
        images = [
            b for m in messages if isinstance(m.content, list)
            for b in m.content if isinstance(b, dict) and b.get("type") == "image"
        ]  # fmt: skip
        if isinstance(last, HumanMessage) and images:  # the vision model's turn
            with self.lock:
                self.seen.append(len(images))
            text = next(b["text"] for b in last.content if b.get("type") == "text")
            reply = AIMessage("[0.25,0.25,0.50,0.50]" if "bounding box" in text else "7")
        elif not any(isinstance(m, ToolMessage) for m in messages):  # the planner's first turn
            args = {"image": "scene", "question": QUESTION}
            reply = AIMessage("", tool_calls=[{"name": "dualfocus_answer", "args": args, "id": "df"}])
        else:
            answer = re.match(r"Answer: (\S+)", messages[-1].content).group(1)
            reply = AIMessage(answer)
        return ChatResult(generations=[ChatGeneration(message=reply)])


def test_one_chat_model_plans_and_sees() -> None:
    llm = PlansAndSees()
    toolkit = DualFocusToolkit.from_chat_model(
        llm, box_convention="fraction", model_id="plans-and-sees", engine_kwargs={"margin": 10}
    )
    backend = toolkit.engine.backend
    assert isinstance(backend, chat_model.ChatModelBackend) and backend.llm is llm
    assert backend.model_id == "plans-and-sees" and toolkit.engine.margin == 10
    toolkit.register_image(SCENE.image, "scene")
    state = create_agent(llm, toolkit.get_tools()).invoke({"messages": [HumanMessage(QUESTION)]})
    messages = state["messages"]
    tool_message = next(m for m in messages if isinstance(m, ToolMessage))
    assert tool_message.status == "success" and tool_message.artifact.answer == "7"
    assert tool_message.artifact.result.crop_box is not None  # the zoom ran on the model's box
    assert tool_message.artifact.crop_box_root == tool_message.artifact.result.crop_box  # a whole image
    assert messages[-1].content == "7"
    assert sorted(llm.seen) == [1, 1, 2]  # macro and locate see the image, micro the image and the crop


def test_from_chat_model_refuses_what_is_not_a_chat_model() -> None:
    with pytest.raises(TypeError, match="needs a LangChain BaseChatModel"):
        DualFocusToolkit.from_chat_model(object())
