"""The threshold of ``mode="auto"``: how confident the macro answer must be to skip the zoom."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


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
        macro_nll: Per question, the macro answer's own mean NLL (`FocusResult.macro_nll` of ``mode="auto"``).
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


__all__ = ["AutoCalibration", "calibrate_auto_threshold"]
