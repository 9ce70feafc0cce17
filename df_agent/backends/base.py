"""The conversation type and the two-verb backend protocol every model implements."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from PIL import Image

from df_agent.boxes import BoxConvention

Role = Literal["user", "assistant"]


class ScoringUnavailableError(RuntimeError):
    """The backend cannot score candidates (e.g. a server that returns no prompt log-probabilities)."""


@dataclass(frozen=True)
class Turn:
    """One message: a role, its text and the images shown before the text (user turns only)."""

    role: Role
    text: str
    images: tuple[Image.Image, ...] = ()

    def __post_init__(self) -> None:
        if self.role == "assistant" and self.images:
            raise ValueError("assistant turns carry no images")


@dataclass(frozen=True)
class Conversation:
    """An immutable list of turns; `user` and `assistant` return a longer copy."""

    turns: tuple[Turn, ...] = field(default_factory=tuple)

    def user(self, text: str, images: Sequence[Image.Image] = ()) -> Conversation:
        """This conversation followed by a user turn with `images` then `text`."""
        return Conversation((*self.turns, Turn("user", text, tuple(images))))

    def assistant(self, text: str) -> Conversation:
        """This conversation followed by an assistant reply."""
        return Conversation((*self.turns, Turn("assistant", text)))

    @property
    def images(self) -> list[Image.Image]:
        """Every image in the conversation, in the order the model sees them."""
        return [image for turn in self.turns for image in turn.images]

    def to_messages(self) -> list[dict]:
        """The turns in the chat-template message format of `transformers` processors."""
        messages = []
        for turn in self.turns:
            content: list[dict] = [{"type": "image"} for _ in turn.images]
            content.append({"type": "text", "text": turn.text})
            messages.append({"role": turn.role, "content": content})
        return messages


@runtime_checkable
class Backend(Protocol):
    """A vision-language model as DualFocus needs it: two verbs and two declarations.

    Attributes:
        model_id: A name for the model, recorded in every result.
        box_convention: How the model writes boxes (see `df_agent.boxes`).
        prompt_family: Which prompt set in `prompts/` the model was trained with.
    """

    model_id: str
    box_convention: BoxConvention
    prompt_family: str

    def generate(self, conversation: Conversation, max_new_tokens: int = 128) -> str:
        """Greedy reply to the conversation, which must end with a user turn."""
        ...

    def score(self, conversation: Conversation, candidates: Sequence[str]) -> list[float]:
        """Mean negative log-likelihood of each candidate as the assistant's reply.

        Lower is better. All candidates go through one batched forward pass. A backend that
        cannot score raises `ScoringUnavailableError`, and the engine then keeps the macro answer.
        """
        ...

    def input_size(self, image: Image.Image) -> tuple[int, int]:
        """The (width, height) the model's image processor resizes `image` to."""
        ...


__all__ = ["Backend", "Conversation", "Role", "ScoringUnavailableError", "Turn"]
