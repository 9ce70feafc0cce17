"""The conversation type and the two-verb backend protocol every model implements."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Literal

from PIL import Image

from df_agent.boxes import BoxConvention

Role = Literal["user", "assistant"]


class ScoringUnavailableError(RuntimeError):
    """The backend cannot score candidates (e.g. a server that returns no prompt log-probabilities)."""


class PromptMismatchError(RuntimeError):
    """The chat template did not render the prompt as a prefix of prompt + reply."""


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


ReplyKind = Literal["answer", "box"]


class GuessRejected(RuntimeError):
    """A reply a session returned early, on a guess, was not the model's: redo the question without guessing.

    Only raised inside ``session(speculate=True)``; the engine then runs the question again in a
    plain ``session()``.
    """


@dataclass(frozen=True)
class Request:
    """One generation a step asks for.

    Attributes:
        conversation: The conversation, ending with a user turn.
        max_new_tokens: The token budget of the reply.
        reply: What the reply is: "box" lets a backend use a box grammar or format (e.g. the
            fast backend's box draft); "answer" is anything else.
    """

    conversation: Conversation
    max_new_tokens: int = 128
    reply: ReplyKind = "answer"


@dataclass(frozen=True)
class Generation:
    """A generated reply and, where the backend reports them, its tokens' log-probabilities."""

    text: str
    token_logprobs: tuple[float, ...] | None = None

    @property
    def mean_nll(self) -> float | None:
        """Mean negative log-likelihood of the reply's tokens in its own context (lower: more confident)."""
        if not self.token_logprobs:
            return None
        return -sum(self.token_logprobs) / len(self.token_logprobs)


def read_token_logprobs(entries: object) -> tuple[float, ...] | None:
    """Token log-probabilities from OpenAI-style entries (``[{"token", "logprob"}, ...]``), or None.

    Remote backends get them in this shape (the OpenAI API, vLLM, Ollama, LangChain's
    ``response_metadata``); anything else, or an entry without a number, gives None.
    """
    if not isinstance(entries, list):
        return None
    try:
        return tuple(float(entry["logprob"]) for entry in entries)
    except (KeyError, TypeError, ValueError):
        return None


@dataclass(frozen=True)
class Abilities:
    """What a backend can report beyond text; the engine picks its votes from these.

    Attributes:
        prompt_logprobs: `score` works: the log-likelihood of any candidate in any context
            (teacher forcing). Every vote can run.
        generation_logprobs: `generate_many` returns each reply's token log-probabilities, so
            the own-context vote needs no extra request.
        session: `session` shares work between the calls of one question (image encodings, a
            prefix cache, requests decoded together).
        max_images: How many images one conversation may carry (None: no limit known).
    """

    prompt_logprobs: bool = False
    generation_logprobs: bool = False
    session: bool = False
    max_images: int | None = None


class Backend:
    """A vision-language model as DualFocus needs it: two verbs, declared abilities, plain defaults.

    Subclasses implement `generate` and, when they can, `score`; the optional abilities below
    have defaults that work for every model, and `abilities` says which are real.

    Attributes:
        model_id: A name for the model, recorded in every result.
        box_convention: How the model writes boxes (see `df_agent.boxes`).
        prompt_family: Which prompt set in `prompts/` the model was trained with.
    """

    model_id: str
    box_convention: BoxConvention
    prompt_family: str

    @property
    def abilities(self) -> Abilities:
        """What this backend can report beyond text (default: nothing)."""
        return Abilities()

    def generate(self, conversation: Conversation, max_new_tokens: int = 128) -> str:
        """Greedy reply to the conversation, which must end with a user turn."""
        raise NotImplementedError(f"{type(self).__name__} does not implement generate")

    def generate_many(self, requests: Sequence[Request]) -> list[Generation]:
        """Replies to independent requests, in order; a backend may run them together.

        Default: one `generate` after another, without log-probabilities. Backends override it to
        batch the requests, send them concurrently or report token log-probabilities.
        """
        return [Generation(self.generate(r.conversation, r.max_new_tokens)) for r in requests]

    def score(self, conversation: Conversation, candidates: Sequence[str]) -> list[float]:
        """Mean negative log-likelihood of each candidate as the assistant's reply; lower is better.

        All candidates go through one batched forward pass. Default: `ScoringUnavailableError`
        (see `abilities.prompt_logprobs`).
        """
        raise ScoringUnavailableError(f"{type(self).__name__} cannot score candidates")

    def score_many(self, items: Sequence[tuple[Conversation, Sequence[str]]]) -> list[list[float]]:
        """`score` for several independent (conversation, candidates) items: one list of scores per item.

        A backend may score every item in one batched request (rows of different images). Default:
        one `score` per item.
        """
        return [self.score(conversation, candidates) for conversation, candidates in items]

    def input_size(self, image: Image.Image) -> tuple[int, int]:
        """The (width, height) the model's image processor resizes `image` to (default: unchanged)."""
        return image.size

    @property
    def context_length(self) -> int | None:
        """The most tokens one conversation may hold, where known (default: None, not checked)."""
        return None

    def count_tokens(self, text: str) -> int | None:
        """How many tokens `text` is for this model, where known (default: None)."""
        return None

    def input_warnings(self, image: Image.Image, question: str) -> list[str]:
        """What to doubt about this model's answer to `question` on `image` (default: nothing known)."""
        return []

    def session(self, *, speculate: bool = False) -> AbstractContextManager[None]:
        """Share work between the calls of one question made inside (default: nothing shared).

        Args:
            speculate: The backend may return replies early on a guess; a wrong guess raises
                `GuessRejected` inside the session or when it closes.
        """
        return nullcontext()


__all__ = [
    "Abilities",
    "Backend",
    "Conversation",
    "Generation",
    "GuessRejected",
    "PromptMismatchError",
    "ReplyKind",
    "Request",
    "Role",
    "ScoringUnavailableError",
    "Turn",
    "read_token_logprobs",
]
