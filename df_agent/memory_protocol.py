"""What the engine needs from a memory: find an exact repeat, and log an answer.

`df_agent.memory.VisualQAMemory` is the implementation; the engine only knows this protocol, so it
never imports Chroma.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from df_agent.results import ArbitrationMethod, FocusResult, Mode


class AnswerMemory(Protocol):
    """A store of past answers that the engine consults before running and logs after."""

    def lookup(
        self,
        image: str,
        question: str,
        model_id: str,
        mode: Mode,
        options: Sequence[str] | None = None,
        *,
        arbitration: ArbitrationMethod | None = None,
    ) -> FocusResult | None:
        """The remembered answer to exactly this asking (`image` is the image's content hash), or None."""
        ...

    def log(self, result: FocusResult) -> str:
        """Store `result`; return its record id once it is durable."""
        ...


__all__ = ["AnswerMemory"]
