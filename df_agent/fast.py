"""Fast DualFocus: the same protocol and the same results, for about twice the cost of one answer.

`FastDualFocus` runs `DualFocus` step for step, inside one backend session per question: the backend
(`df_agent.backends.hf_fast.FastHFBackend`) encodes each image once and keeps one growing key/value
cache, so every step continues what the previous ones computed. Before the macro step the box request
is asked for ahead (`prefetch`), so the two are decoded side by side, the box under its grammar (and
guessed whole when it begins like a box the model wrote before). A reply whose ending is guessed (a
box's ``]`` after its fourth number, an answer of the usual length) is used at once and confirmed in
the next forward pass; if the model had ended it otherwise, the question is redone without guessing.
Backends without sessions run the plain protocol unchanged. `result_differences` compares two results;
`calibrate_auto_threshold` sets ``auto_threshold`` for ``mode="auto"``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from df_agent.backends.base import Backend
from df_agent.engine import LOCATE_MAX_NEW_TOKENS, DualFocus
from df_agent.results import ArbitrationMethod, FocusResult, Mode

# Fields that differ between any two runs, whatever the engine.
_RUN_FIELDS = {"timings", "created_at"}


class FastDualFocus(DualFocus):
    """`DualFocus` with reuse; answers, boxes and scores are those of the plain engine.

    Args:
        backend: Any backend. A plain `HFBackend` is wrapped in a `FastHFBackend` over the same model;
            backends without `session`/`prefetch` run the plain path.
        **engine_kwargs: As for `DualFocus` (margin, min_side, arbitration, ...).
    """

    def __init__(self, backend: Backend, **engine_kwargs: object) -> None:
        from df_agent.backends.hf import HFBackend
        from df_agent.backends.hf_fast import FastHFBackend

        if isinstance(backend, HFBackend) and not isinstance(backend, FastHFBackend):
            backend = FastHFBackend.from_backend(backend)
        super().__init__(backend, **engine_kwargs)  # type: ignore[arg-type]

    def _run(
        self,
        picture: Image.Image,
        question: str,
        options: list[str] | None,
        mode: Mode,
        method: ArbitrationMethod,
        timings: dict[str, float],
        trace: dict[str, object],
    ) -> tuple[str, str]:
        session = getattr(self.backend, "session", None)
        if session is None or not getattr(self.backend, "fast", False):
            return super()._run(picture, question, options, mode, method, timings, trace)
        from df_agent.backends.hf_fast import SpeculationError

        before = dict(timings), dict(trace)
        try:
            with session(speculate=True):
                return self._run_in_session(picture, question, options, mode, method, timings, trace)
        except SpeculationError:  # a guessed ending was wrong: redo the question without guessing
            for kept, now in zip(before, (timings, trace), strict=True):
                now.clear()
                now.update(kept)
            with session():
                return self._run_in_session(picture, question, options, mode, method, timings, trace)

    def _run_in_session(
        self,
        picture: Image.Image,
        question: str,
        options: list[str] | None,
        mode: Mode,
        method: ArbitrationMethod,
        timings: dict[str, float],
        trace: dict[str, object],
    ) -> tuple[str, str]:
        if mode != "macro":
            self.backend.prefetch(  # type: ignore[attr-defined]
                self.locate_conversation(picture, question),
                max_new_tokens=LOCATE_MAX_NEW_TOKENS,
                draft=self.backend.box_draft,  # type: ignore[attr-defined]
            )
        return super()._run(picture, question, options, mode, method, timings, trace)


def result_differences(first: FocusResult, second: FocusResult, *, atol: float = 1e-4) -> list[str]:
    """What differs between two results of the same question, beyond timings: [] when they agree.

    Scores (mean NLLs) agree when within `atol`; every other field must be equal.

    Args:
        first: One result, e.g. from `DualFocus.ask`.
        second: The other, e.g. from `FastDualFocus.ask`.
        atol: The largest score difference that still counts as the same.
    """
    differences = []
    a, b = first.model_dump(exclude=_RUN_FIELDS), second.model_dump(exclude=_RUN_FIELDS)
    for name in a:
        x, y = a[name], b[name]
        if name == "scores" and x and y and x.keys() == y.keys():
            same = all(abs(x[k] - y[k]) <= atol for k in x)
        elif isinstance(x, float) and isinstance(y, float):
            same = abs(x - y) <= atol
        else:
            same = x == y
        if not same:
            differences.append(f"{name}: {x!r} != {y!r}")
    return differences


@dataclass(frozen=True)
class AutoCalibration:
    """A threshold for ``mode="auto"`` and what it did on the calibration questions."""

    threshold: float
    n: int
    skip_rate: float
    accuracy: float
    dualfocus_accuracy: float
    macro_accuracy: float


def calibrate_auto_threshold(
    macro_nll: Sequence[float],
    macro_correct: Sequence[bool],
    dualfocus_correct: Sequence[bool],
    *,
    max_accuracy_loss: float = 0.0,
) -> AutoCalibration:
    """The ``auto_threshold`` that skips the most zooms while staying within `max_accuracy_loss` of DualFocus.

    Args:
        macro_nll: Per question, the macro answer's own mean NLL (`DualFocus.confidence`).
        macro_correct: Per question, whether the macro answer was right.
        dualfocus_correct: Per question, whether the DualFocus answer was right.
        max_accuracy_loss: The accuracy (0..1) that skipping may cost on these questions.

    Returns:
        The threshold (``-inf``: never skip) with its skip rate and accuracy on these questions.
    """
    n = len(macro_nll)
    if n == 0 or len(macro_correct) != n or len(dualfocus_correct) != n:
        raise ValueError("give the same non-zero number of NLLs, macro results and DualFocus results")
    if any(math.isnan(v) for v in macro_nll):
        raise ValueError("macro_nll holds NaN")
    full = sum(dualfocus_correct) / n

    def outcome(threshold: float) -> tuple[float, float]:
        skipped = [nll <= threshold for nll in macro_nll]
        right = [m if s else d for s, m, d in zip(skipped, macro_correct, dualfocus_correct, strict=True)]
        return sum(skipped) / n, sum(right) / n

    candidates = [(t, *outcome(t)) for t in sorted({-math.inf, *macro_nll})]
    allowed = [c for c in candidates if c[2] >= full - max_accuracy_loss - 1e-12]
    threshold, skip_rate, accuracy = max(allowed, key=lambda c: (c[1], c[2]))
    return AutoCalibration(threshold, n, skip_rate, accuracy, full, sum(macro_correct) / n)


__all__ = ["AutoCalibration", "FastDualFocus", "calibrate_auto_threshold", "result_differences"]
