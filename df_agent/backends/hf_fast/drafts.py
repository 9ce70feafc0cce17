"""Drafts: cheap guesses at a reply's next tokens that the model then only has to confirm."""

from __future__ import annotations

import re
from collections import Counter, deque
from collections.abc import Sequence
from typing import Protocol


class Draft(Protocol):
    """Guesses at what a reply will say; the model keeps only the guesses it would have made itself."""

    def propose(self, generated: Sequence[int]) -> Sequence[int]:
        """Tokens worth checking next, given the tokens generated so far (possibly none)."""
        ...

    def ending(self, generated: Sequence[int]) -> Sequence[int]:
        """The tokens that end the reply here if the model keeps to its format (end of turn last), or []."""
        ...

    def learn(self, reply: Sequence[int]) -> None:
        """See a finished reply (all its tokens; the end of a guessed ending may be unconfirmed yet)."""
        ...


class BoxDraft:
    """Drafts boxes ``[x1,y1,x2,y2]`` for tokenizers that write each number as one token.

    It proposes the grammar's fixed tokens (``[``, the commas, ``]`` and the end of turn) and, where
    the box so far begins like a box the model wrote before, the rest of the most frequent such box:
    a model that reuses boxes (whole-image boxes, a favourite position) then writes one in a pass or
    two. `ending` is the grammar's part only: ``]`` and the end of turn after the fourth number.

    Args:
        open_id, comma_id, close_id: The ``[``, ``,`` and ``]`` tokens.
        end_id: The end-of-turn token.
        number_ids: Every token that is a number.
        memory: How many different boxes to remember.
    """

    def __init__(
        self,
        open_id: int,
        comma_id: int,
        close_id: int,
        end_id: int,
        number_ids: frozenset[int],
        memory: int = 256,
    ) -> None:
        self.open_id, self.comma_id, self.close_id, self.end_id = open_id, comma_id, close_id, end_id
        self.number_ids = number_ids
        self.memory = memory
        self.boxes: Counter[tuple[int, ...]] = Counter()

    @classmethod
    def for_tokenizer(cls, tokenizer, end_id: int) -> BoxDraft | None:
        """The draft for `tokenizer`; None unless brackets, commas and 2-decimal numbers are single tokens."""
        ids = [tokenizer.encode(s, add_special_tokens=False) for s in ("[", ",", "]", "0.25")]
        if any(len(i) != 1 for i in ids):
            return None
        numbers = frozenset(
            i for token, i in tokenizer.get_vocab().items() if re.fullmatch(r"\d+(\.\d+)?", token)
        )
        box = tokenizer.encode("[0.12,0.34,0.56,0.78]", add_special_tokens=False)
        if ids[3][0] not in numbers or len(box) != 9:
            return None
        return cls(ids[0][0], ids[1][0], ids[2][0], end_id, numbers)

    def _open_box(self, generated: Sequence[int]) -> tuple[int, ...] | None:
        """The tokens since the last ``[`` (with it); () before anything; None outside a box."""
        if not generated:
            return ()
        if self.open_id not in generated:
            return None
        opened = len(generated) - 1 - list(reversed(generated)).index(self.open_id)
        return tuple(generated[opened:])

    def propose(self, generated: Sequence[int]) -> Sequence[int]:
        box = self._open_box(generated)
        if box is None:
            return []
        seen = [b for b, _ in self.boxes.most_common() if len(b) > len(box) and b[: len(box)] == box]
        if seen:
            return [*seen[0][len(box) :], self.end_id]
        if not box:
            return [self.open_id]
        if box[-1] in self.number_ids:
            return self.ending(generated) or [self.comma_id]
        return []

    def ending(self, generated: Sequence[int]) -> Sequence[int]:
        box = self._open_box(generated)
        if not box or box[-1] not in self.number_ids:
            return []
        return [self.close_id, self.end_id] if sum(t in self.number_ids for t in box) == 4 else []

    def learn(self, reply: Sequence[int]) -> None:
        box = tuple(reply[:-1]) if reply and reply[-1] == self.end_id else tuple(reply)
        if len(box) == 9 and box[0] == self.open_id and box[-1] == self.close_id:
            self.boxes[box] += 1
            if len(self.boxes) > self.memory:
                del self.boxes[min(self.boxes, key=self.boxes.__getitem__)]


class AnswerDraft:
    """Guesses at short answers: the last answer again, and where answers usually end.

    It proposes the rest of the last answer it saw while the reply begins like it (the micro answer
    often repeats the macro answer). Its `ending` (the end of turn) is offered once `warmup` answers
    were seen and at least `agreement` of the last `window` had the current length.
    """

    def __init__(self, end_id: int, window: int = 50, agreement: float = 0.95, warmup: int = 5) -> None:
        self.end_id, self.agreement, self.warmup = end_id, agreement, warmup
        self.lengths: deque[int] = deque(maxlen=window)
        self.last: list[int] = []

    def propose(self, generated: Sequence[int]) -> Sequence[int]:
        n = len(generated)
        return self.last[n:] if len(self.last) > n and self.last[:n] == list(generated) else []

    def ending(self, generated: Sequence[int]) -> Sequence[int]:
        if len(self.lengths) < self.warmup:
            return []
        usual = self.lengths.count(len(generated)) >= self.agreement * len(self.lengths)
        return [self.end_id] if usual else []

    def learn(self, reply: Sequence[int]) -> None:
        if reply and reply[-1] == self.end_id:
            self.lengths.append(len(reply) - 1)
            self.last = list(reply)


__all__ = ["AnswerDraft", "BoxDraft", "Draft"]
