"""The fast path of the transformers backend: one image encoding and one prefix cache per question.

`drafts` guesses tokens for the model to confirm, `tree` holds what a question computed, and
`backend.FastPath` is the part of `df_agent.backends.hf.HFBackend` that uses them.
"""

from df_agent.backends.hf_fast.backend import (
    FAST_MODEL_TYPES,
    SPECULATION_FAILURES_ALLOWED,
    TIE_TOLERANCE,
    FastPath,
    SpeculationError,
)
from df_agent.backends.hf_fast.drafts import AnswerDraft, BoxDraft, Draft

__all__ = [
    "FAST_MODEL_TYPES",
    "SPECULATION_FAILURES_ALLOWED",
    "TIE_TOLERANCE",
    "AnswerDraft",
    "BoxDraft",
    "Draft",
    "FastPath",
    "SpeculationError",
]
