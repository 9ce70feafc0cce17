"""The visual Q&A memory: every answered question logged in a Chroma store, recallable by meaning.

`VisualQAMemory` is the store (`df_agent.memory.store`); answers wait in a journal
(`df_agent.memory.journal`) until Chroma has them; questions are embedded locally
(`df_agent.memory.embeddings`); `df_agent.memory.retriever` adapts the memory to LangChain and
`df_agent.memory.cli` is `df-agent memory`. Needs the ``memory`` extra.
"""

from df_agent.memory.store import (
    DEFAULT_COLLECTION,
    MemoryRecord,
    MemoryStats,
    MemoryUnavailableError,
    Recollection,
    RetryPolicy,
    VisualQAMemory,
    default_path,
    record_id,
    repeat_key,
)

__all__ = [
    "DEFAULT_COLLECTION",
    "MemoryRecord",
    "MemoryStats",
    "MemoryUnavailableError",
    "Recollection",
    "RetryPolicy",
    "VisualQAMemory",
    "default_path",
    "record_id",
    "repeat_key",
]
