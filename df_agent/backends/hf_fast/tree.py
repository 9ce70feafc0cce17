"""What one question computes on the fast path: images, token sequences, the prefix tree, passes.

A `Session` holds one key/value cache; every computed sequence is a `Branch` of it (its cache slots
and the log-probabilities recorded for its generated or scored tokens). A `Pass` collects the tokens
of one forward pass, each with the cache slots it may see (a tree attention mask); a `Row` is one
greedy generation in progress.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers import DynamicCache

from df_agent.backends.hf_fast.drafts import Draft


@dataclass(eq=False)
class EncodedImage:
    """An image as the model sees it: its features (one row per placeholder token) and input size."""

    tag: int
    features: torch.Tensor
    grid: torch.Tensor | None
    input_size: tuple[int, int]


@dataclass(eq=False)
class TokenSequence:
    """Token ids with, per position, the tag of the image it shows (0 for text) and its rotary position."""

    ids: torch.Tensor
    tags: torch.Tensor
    positions: torch.Tensor  # (P, L): P = 1, or 3 for multimodal rotary positions
    images: list[EncodedImage]

    def __len__(self) -> int:
        return self.ids.shape[0]

    def common(self, ids: torch.Tensor, tags: torch.Tensor, limit: int) -> int:
        """Length of the common prefix with (ids, tags), at most `limit`."""
        n = min(limit, len(self), ids.shape[0])
        differ = ((self.ids[:n] != ids[:n]) | (self.tags[:n] != tags[:n])).nonzero()
        return int(differ[0, 0]) if differ.numel() else n


@dataclass(eq=False)
class Branch:
    """A computed sequence in the tree: its ids, the cache slots of its first len(slots) tokens and
    the log-probability of each generated token (by position)."""

    ids: torch.Tensor
    tags: torch.Tensor
    slots: torch.Tensor
    logprobs: dict[int, float] = field(default_factory=dict)


@dataclass(eq=False)
class Row:
    """One greedy generation in progress: its prompt, the cache slots of every token fed so far."""

    prompt: TokenSequence
    max_new_tokens: int
    draft: Draft | None
    slots: list[int] = field(default_factory=list)
    known: list[int] = field(default_factory=list)  # the chosen token not yet in the cache
    generated: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    done: bool = False
    tied: bool = False  # two tokens were too close to call: the plain path decides
    closing: list[int] = field(default_factory=list)  # tokens taken on the draft's word, to confirm
    branch: Branch | None = None

    @property
    def next_position(self) -> int:
        """Rotary position of the next token to feed (text positions advance by one)."""
        return int(self.prompt.positions.max()) + 1 + len(self.slots) - len(self.prompt)


class Session:
    """What one question computes: its images, the key/value tree, and generations asked for ahead."""

    def __init__(self, device: torch.device, speculate: bool = False) -> None:
        self.owner: object = None  # the backend that opened it
        self.device = device
        self.speculate = speculate
        self.sequences: dict[tuple[str, tuple[int, ...]], TokenSequence] = {}
        self.unconfirmed: list[Row] = []
        self.images: list[tuple[Image.Image, EncodedImage]] = []  # each image object seen, encoded
        self.cache = DynamicCache()
        self.size = 0
        self.branches: list[Branch] = []
        self.rows: list[Row] = []


class Pass:
    """The tokens of one forward pass: items appended to the tree, each with the slots it may see."""

    def __init__(self, session: Session) -> None:
        self.base = session.size
        self.visible: list[torch.Tensor] = []
        self.embeds: list[torch.Tensor] = []
        self.positions: list[torch.Tensor] = []
        self.confirming: list[tuple[Row, torch.Tensor]] = []
        self.size = 0

    def add(self, visible: torch.Tensor, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Queue tokens that see `visible` and themselves (causally); returns their new slots."""
        n = embeds.shape[0]
        slots = torch.arange(self.base + self.size, self.base + self.size + n)
        self.visible.append(visible)
        self.embeds.append(embeds)
        self.positions.append(positions)
        self.size += n
        return slots


__all__ = ["Branch", "EncodedImage", "Pass", "Row", "Session", "TokenSequence"]
