"""The transformers backend with reuse: one image encoding and one prefix cache per question."""

from df_agent.backends.hf_fast.backend import (
    FAST_MODEL_TYPES,
    SPECULATION_FAILURES_ALLOWED,
    TIE_TOLERANCE,
    AnswerDraft,
    BoxDraft,
    Draft,
    FastHFBackend,
    SpeculationError,
)

__all__ = [
    "FAST_MODEL_TYPES",
    "SPECULATION_FAILURES_ALLOWED",
    "TIE_TOLERANCE",
    "AnswerDraft",
    "BoxDraft",
    "Draft",
    "FastHFBackend",
    "SpeculationError",
]
