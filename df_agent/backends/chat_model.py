"""Any LangChain chat model with image input as the DualFocus vision model.

`ChatModelBackend(llm)` sends each conversation through the model with LangChain's standard content
blocks (an image block per picture, base64 PNG, then the text), so ChatOpenAI, ChatOllama,
ChatAnthropic, ChatGoogleGenerativeAI... all work unchanged. Independent requests (the macro answer
and the box request) go out together through `batch`. Where the model returns token
log-probabilities in ``response_metadata`` (ChatOpenAI or ChatOllama built with ``logprobs=True``),
each `Generation` carries them and the engine runs the own-context vote at no extra request;
otherwise the engine's declared policy decides. Prompt log-probabilities are not offered by
LangChain models, so `score` is unavailable.

This is the only core module that imports LangChain (install ``df-agent[tools]``).
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from df_agent.backends._images import png_base64
from df_agent.backends.base import Abilities, Backend, Conversation, Generation, Request, read_token_logprobs
from df_agent.backends.presets import InputSize, preset_for, resolve_input_size
from df_agent.backends.text_safety import REMOTE_GUARD
from df_agent.boxes import BoxConvention

try:
    from langchain_core.language_models import BaseChatModel
    from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
except ImportError as err:  # pragma: no cover - depends on the installed extras
    raise ImportError("ChatModelBackend needs langchain-core: pip install 'df-agent[tools]'") from err

# The keyword each chat model class takes for the reply's token budget (default "max_tokens").
MAX_TOKENS_KWARGS = {"ChatGoogleGenerativeAI": "max_output_tokens"}
# Classes whose calls take no budget keyword (ChatOllama passes unknown keywords on to its client,
# which refuses them): the budget is this field, set on a copy of the model.
MAX_TOKENS_FIELDS = {"ChatOllama": "num_predict"}


def token_logprobs(message: BaseMessage) -> tuple[float, ...] | None:
    """The reply's token log-probabilities from ``response_metadata["logprobs"]``, or None.

    Reads OpenAI's shape (``{"content": [{"token", "logprob", ...}, ...]}``, as ChatOpenAI and
    vLLM/Ollama through it return) and a bare list of ``{"token", "logprob"}`` (ChatOllama).
    """
    entries = (getattr(message, "response_metadata", None) or {}).get("logprobs")
    if isinstance(entries, dict):
        entries = entries.get("content")
    return read_token_logprobs(entries)


class ChatModelBackend(Backend):
    """A LangChain `BaseChatModel` that accepts images, as a DualFocus backend.

    Build the model greedy (``temperature=0``) so that a repeated question gets the same answer.

    >>> from langchain_openai import ChatOpenAI  # doctest: +SKIP
    >>> llm = ChatOpenAI(model="gpt-4o-mini", temperature=0, logprobs=True)  # doctest: +SKIP
    >>> backend = ChatModelBackend(llm)  # doctest: +SKIP
    >>> DualFocus(backend).ask("photo.jpg", "What is written on the sign?").answer  # doctest: +SKIP

    Args:
        llm: The chat model.
        model_id: The name recorded in results; default the model's ``model_name``/``model``.
        logprobs: Whether replies carry token log-probabilities; default the model's own
            ``logprobs`` setting, else learned from the first reply that carries them.
        box_convention: How the model writes boxes; default from its preset
            (`df_agent.backends.presets`, by `model_id`).
        prompt_family: The prompt set in ``prompts/``; default from its preset.
        input_size: The model's resized input size, for pixel box conventions; default from the
            preset, else the image's own size.
        max_tokens_kwarg: The invoke keyword for the token budget; default by model class:
            ``max_output_tokens`` for ChatGoogleGenerativeAI, ``max_tokens`` for most, and for
            ChatOllama, whose calls take none, its ``num_predict`` set on a copy of the model (one
            copy per budget, kept). None sends no budget.
        max_concurrency: Requests of one `generate_many` in flight at once (None: all).
    """

    def __init__(
        self,
        llm: BaseChatModel,
        *,
        model_id: str | None = None,
        logprobs: bool | None = None,
        box_convention: BoxConvention | str | None = None,
        prompt_family: str | None = None,
        input_size: InputSize | None = None,
        max_tokens_kwarg: str | None = "auto",
        max_concurrency: int | None = None,
    ) -> None:
        if not isinstance(llm, BaseChatModel):
            raise TypeError(f"ChatModelBackend needs a LangChain BaseChatModel, not {type(llm).__name__}")
        self.llm = llm
        name = model_id or getattr(llm, "model_name", None) or getattr(llm, "model", None)
        self.model_id = str(name or type(llm).__name__)
        self.preset = preset_for(
            self.model_id, box_convention=box_convention, prompt_family=prompt_family, input_size=input_size
        )
        self.box_convention = self.preset.box_convention
        self.prompt_family = self.preset.prompt_family
        self._input_size = self.preset.input_size
        own = getattr(llm, "logprobs", None)
        self._logprobs = logprobs if logprobs is not None else (own if isinstance(own, bool) else None)
        kind = type(llm).__name__
        self._budget_field = MAX_TOKENS_FIELDS.get(kind) if max_tokens_kwarg == "auto" else None
        if max_tokens_kwarg == "auto":
            max_tokens_kwarg = None if self._budget_field else MAX_TOKENS_KWARGS.get(kind, "max_tokens")
        self.max_tokens_kwarg = max_tokens_kwarg
        self._budgeted: dict[int, BaseChatModel] = {}
        self.max_concurrency = max_concurrency

    @property
    def abilities(self) -> Abilities:
        """Generation log-probabilities when the model returns them; never prompt log-probabilities."""
        return Abilities(generation_logprobs=bool(self._logprobs))

    @staticmethod
    def messages(conversation: Conversation) -> list[BaseMessage]:
        """The conversation as LangChain messages with standard image and text content blocks."""
        messages: list[BaseMessage] = []
        for turn in conversation.turns:
            if turn.role == "assistant":  # texts guarded: see df_agent.backends.text_safety
                messages.append(AIMessage(content=REMOTE_GUARD.literal(turn.text)))
                continue
            content: list[dict] = [
                {
                    "type": "image",
                    "base64": png_base64(i),
                    "mime_type": "image/png",
                }
                for i in turn.images
            ]
            content.append({"type": "text", "text": REMOTE_GUARD.plain(turn.text)})
            messages.append(HumanMessage(content=content))  # type: ignore[arg-type]
        return messages

    def generate(self, conversation: Conversation, max_new_tokens: int = 128) -> str:
        """The model's reply to a conversation that ends with a user turn."""
        return self.generate_many([Request(conversation, max_new_tokens)])[0].text

    def generate_many(self, requests: Sequence[Request]) -> list[Generation]:
        """Replies to independent requests through one `batch` call (sent concurrently), in order.

        The batch shares one token budget, the largest requested: a box reply ends on its own.
        """
        for request in requests:
            turns = request.conversation.turns
            if not turns or turns[-1].role != "user":
                raise ValueError("generate needs a conversation that ends with a user turn")
        if not requests:
            return []
        llm, kwargs = self._budget(max(r.max_new_tokens for r in requests))
        inputs = [self.messages(r.conversation) for r in requests]
        config = {"max_concurrency": self.max_concurrency} if self.max_concurrency else None
        replies = llm.batch(inputs, config=config, **kwargs)  # type: ignore[arg-type]
        generations = []
        for reply in replies:
            values = token_logprobs(reply)
            if values is not None and self._logprobs is None:
                self._logprobs = True  # seen: the model returns them
            generations.append(Generation(_text(reply), values if self._logprobs else None))
        return generations

    def _budget(self, tokens: int) -> tuple[BaseChatModel, dict[str, int]]:
        """The model to call and the keywords that give it a budget of `tokens` reply tokens."""
        if self._budget_field is None:
            return self.llm, {self.max_tokens_kwarg: tokens} if self.max_tokens_kwarg else {}
        if tokens not in self._budgeted:
            self._budgeted[tokens] = self.llm.model_copy(update={self._budget_field: tokens})
        return self._budgeted[tokens], {}

    def input_size(self, image: Image.Image) -> tuple[int, int]:
        """The (width, height) the model's processor resizes `image` to (see `input_size=`)."""
        return resolve_input_size(self._input_size, image)


def _text(message: BaseMessage) -> str:
    """The reply's text: a string content, or the text blocks of a list content."""
    content = message.content
    if isinstance(content, str):
        return content.strip()
    parts = [b if isinstance(b, str) else b.get("text", "") for b in content if isinstance(b, str | dict)]
    return "".join(parts).strip()


__all__ = ["MAX_TOKENS_FIELDS", "MAX_TOKENS_KWARGS", "ChatModelBackend", "token_logprobs"]
