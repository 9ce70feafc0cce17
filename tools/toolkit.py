"""`DualFocusToolkit`: one engine (with its memory, if any) and one image registry, shared by every tool."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.tools import BaseTool, BaseToolkit
from PIL import Image
from pydantic import ConfigDict, Field, PrivateAttr, model_validator

from df_agent.agents.operations import Toolbox
from df_agent.agents.registry import ImageRegistry
from df_agent.agents.specs import offered_specs
from df_agent.engine import DualFocus
from df_agent.tools.dualfocus_tools import TOOL_CLASSES


class DualFocusToolkit(BaseToolkit):
    """The DualFocus tools for a LangChain agent, all on one engine and one image registry.

    The memory is the engine's (``DualFocus(backend, memory=memory)``): `dualfocus_answer` answers
    exact repeats from it and logs to it, and `recall_visual_qa` is offered only when there is one.

    Attributes:
        engine: The DualFocus engine every tool runs on.
        registry: Image ids and reference rules; default: no file paths, no URLs.

    Example::

        toolkit = DualFocusToolkit(engine=DualFocus.from_pretrained())
        image_id = toolkit.register_image("scene.png")  # the planner names the image by this id
        agent = create_agent(chat_model, toolkit.get_tools())
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    engine: DualFocus
    registry: ImageRegistry = Field(default_factory=ImageRegistry)
    _toolbox: Toolbox = PrivateAttr()

    @model_validator(mode="before")
    @classmethod
    def _memory_belongs_to_the_engine(cls, data: Any) -> Any:
        if isinstance(data, dict) and "memory" in data:
            raise ValueError(
                "DualFocusToolkit takes no memory: give it to the engine, DualFocus(backend, memory=memory) "
                "or DualFocusToolkit.from_pretrained(memory=memory)"
            )
        return data

    def model_post_init(self, context: Any, /) -> None:
        """Build the toolbox the tools share."""
        self._toolbox = Toolbox(self.engine, self.registry)

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike | None = None,
        *,
        allowed_roots: Iterable[str | os.PathLike] = (),
        allow_urls: bool = False,
        memory: Any = None,
        device: str | None = None,
        **engine_kwargs: Any,
    ) -> DualFocusToolkit:
        """A toolkit over a transformers checkpoint (default: the shipped model).

        Args:
            path_or_id: A local folder or hub id; None for the shipped model.
            allowed_roots: Folders planners may name files in (none by default).
            allow_urls: Let planners pass http(s) URLs.
            memory: A visual Q&A memory (`df_agent.memory.VisualQAMemory`) for the engine to log to
                and the tools to recall from.
            device: "cpu", "cuda", ...; default cuda when present.
            **engine_kwargs: Passed to `DualFocus.from_pretrained` (dtype, margin, arbitration, ...).
        """
        engine = DualFocus.from_pretrained(path_or_id, device=device, memory=memory, **engine_kwargs)
        return cls(engine=engine, registry=ImageRegistry(allowed_roots, allow_urls=allow_urls))

    @classmethod
    def from_chat_model(
        cls,
        llm: BaseChatModel,
        *,
        allowed_roots: Iterable[str | os.PathLike] = (),
        allow_urls: bool = False,
        memory: Any = None,
        engine_kwargs: Mapping[str, Any] | None = None,
        **backend_kwargs: Any,
    ) -> DualFocusToolkit:
        """A toolkit whose vision model is a LangChain chat model that accepts images.

        The planner and the vision model can be the same chat model: pass it here and to
        ``create_agent``. Which vote the engine runs depends on what the model returns (see
        `df_agent.backends.chat_model.ChatModelBackend`).

        Args:
            llm: The chat model (greedy, ``temperature=0``, so that a repeat gets the same answer).
            allowed_roots: Folders planners may name files in (none by default).
            allow_urls: Let planners pass http(s) URLs.
            memory: A visual Q&A memory for the engine to log to and the tools to recall from.
            engine_kwargs: Passed to `DualFocus` (margin, arbitration, ...).
            **backend_kwargs: Passed to `ChatModelBackend` (model_id, box_convention, prompt_family,
                logprobs, input_size, max_concurrency, ...).
        """
        from df_agent.backends.chat_model import ChatModelBackend

        backend = ChatModelBackend(llm, **backend_kwargs)
        engine = DualFocus(backend, memory=memory, **dict(engine_kwargs or {}))
        return cls(engine=engine, registry=ImageRegistry(allowed_roots, allow_urls=allow_urls))

    @property
    def toolbox(self) -> Toolbox:
        """The framework-neutral operations the tools call."""
        return self._toolbox

    def register_image(
        self, image: Image.Image | bytes | str | os.PathLike, image_id: str | None = None
    ) -> str:
        """Register an image the planner can then name by the returned id (see `ImageRegistry.register`)."""
        return self.registry.register(image, image_id)

    def get_tools(self) -> list[BaseTool]:
        """The tools, sharing this toolkit's engine and registry.

        Returns:
            dualfocus_answer, global_answer, zoom_region, focused_answer, arbitrate_answers, and
            recall_visual_qa when the engine has a searchable memory.
        """
        return [TOOL_CLASSES[spec.name](toolbox=self._toolbox) for spec in offered_specs(self._toolbox)]


__all__ = ["DualFocusToolkit"]
