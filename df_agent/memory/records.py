"""What the memory stores and how it names it: records, their keys and ids, reports and errors.

Nothing here talks to a store: `df_agent.memory.store` writes these records to Chroma.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, Field

from df_agent.results import FocusResult


class MemoryUnavailableError(RuntimeError):
    """The store could not be reached (after retries); records already logged are safe in the journal."""


class MemoryBusyError(MemoryUnavailableError):
    """The store answers but is still busy writing (a backlog, another writer): try again later.

    A subclass of `MemoryUnavailableError`, so code that treats an unavailable memory as a miss
    treats a busy one alike; the message says which of the two it is.
    """


class RetryPolicy(BaseModel):
    """How hard the memory tries to reach the store.

    Attributes:
        attempts: Tries per operation before it gives up (transient errors only).
        initial: First backoff in seconds; it doubles up to `maximum`, plus a random jitter of
            up to `initial`.
        maximum: Longest single backoff in seconds.
        pause: After a background write gives up, seconds before the next round of tries.
    """

    attempts: int = Field(default=5, ge=1)
    initial: float = Field(default=0.1, gt=0)
    maximum: float = Field(default=2.0, gt=0)
    pause: float = Field(default=5.0, gt=0)


class MemoryRecord(BaseModel):
    """One logged answer: the full trace, the text that was embedded, and its ids."""

    id: str = Field(description="One id per distinct asking (see `record_id`): writing it twice is harmless.")
    key: str = Field(description="Exact-repeat key: image hash, question, options, model id, mode.")
    document: str = Field(description="The text embedded for recall: the question and the answer.")
    result: FocusResult
    image_name: str | None = Field(
        default=None, description="The image's file name as the user gave it, if known (for display only)."
    )

    @classmethod
    def from_result(cls, result: FocusResult, image_name: str | None = None) -> MemoryRecord:
        """The record of `result` (its crop image is not kept); `image_name` is only shown, never keyed."""
        key = repeat_key(result.image_hash, result.question, result.model_id, result.mode, result.options)
        return cls(
            id=record_id(key, result.arbitration),
            key=key,
            document=document(result),
            result=result,
            image_name=image_name,
        )


class Recollection(BaseModel):
    """A record found by `recall` and its cosine distance to the query (0 = same direction)."""

    record: MemoryRecord
    distance: float


class MemoryStats(BaseModel):
    """What `VisualQAMemory.stats` reports."""

    location: str = Field(description="The store: a folder, a server URL, or 'client'.")
    collection: str
    records: int = Field(description="Records in the store.")
    pending: int = Field(description="Records this process logged that are not in the store yet.")
    orphaned_journals: int = Field(description="Journal files left by processes that died, to replay.")
    embedder: dict[str, Any]
    journal: str = Field(description="The folder of the local journals.")
    last_error: str | None = None


class CheckReport(BaseModel):
    """What `VisualQAMemory.check` found: is every record found by a search with its own vector?"""

    location: str
    collection: str
    checked: int = Field(description="Records searched for.")
    unreachable: list[str] = Field(description="Ids a search with their own vector did not return.")
    repaired: list[str] = Field(default_factory=list, description="Of those, ids found again after repair.")
    seconds: float

    @property
    def still_unreachable(self) -> list[str]:
        """Ids that no search returns after the check (and its repair, if one ran)."""
        fixed = set(self.repaired)
        return [found for found in self.unreachable if found not in fixed]

    def summary(self) -> str:
        """One line for a person."""
        line = (
            f"{self.checked} records checked in {self.seconds:.1f} s at {self.location} "
            f"({self.collection}): {self.checked - len(self.unreachable)} reachable by search, "
            f"{len(self.unreachable)} unreachable"
        )
        if self.repaired:
            line += f", {len(self.repaired)} repaired"
        if self.still_unreachable:
            line += f", {len(self.still_unreachable)} still unreachable"
        return line


def repeat_key(
    image_hash: str, question: str, model_id: str, mode: str, options: Sequence[str] | None = None
) -> str:
    """The key two askings share when one is an exact repeat of the other.

    The question's whitespace is normalised; case and wording are not.
    """
    parts = [image_hash, " ".join(question.split()), model_id, mode, list(options) if options else None]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def record_id(key: str, arbitration: str | None) -> str:
    """The id of the record of an asking: its `repeat_key` and the vote method that decided it.

    One record per distinct asking: logging the same asking again (a retry, a replay, or the
    model run again with ``use_memory=False``) replaces it, so an exact repeat is idempotent.
    Answers decided by different vote methods are different askings; an answer that needed no
    vote (``arbitration`` None) is valid for every method.
    """
    return hashlib.sha256(f"{key}|{arbitration or 'no vote'}".encode()).hexdigest()[:32]


def document(result: FocusResult) -> str:
    """The text embedded for recall: the question, then the answer (an option letter's text too)."""
    answer = result.answer
    if result.options and len(answer) == 1 and "A" <= answer <= "Z":
        index = ord(answer) - ord("A")
        if index < len(result.options):
            answer = f"{answer}. {result.options[index]}"
    return f"{result.question}\n{answer}"


__all__ = [
    "CheckReport",
    "MemoryBusyError",
    "MemoryRecord",
    "MemoryStats",
    "MemoryUnavailableError",
    "Recollection",
    "RetryPolicy",
    "document",
    "record_id",
    "repeat_key",
]
