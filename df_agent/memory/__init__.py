"""The visual Q&A memory: every answered question logged in a Chroma store, recallable by meaning.

`VisualQAMemory` is the store (`df_agent.memory.store`, the only module that imports chromadb);
what it stores, and how records are keyed, is `df_agent.memory.records`; answers wait in a journal
(`df_agent.memory.journal`) until Chroma has them; questions are embedded locally
(`df_agent.memory.embeddings`); `df_agent.memory.retriever` adapts the memory to LangChain
(`memory_retriever`) and `df_agent.memory.cli` is `df-agent memory`. Needs the ``memory`` extra.
"""

from df_agent.memory.records import (
    CheckReport,
    MemoryBusyError,
    MemoryRecord,
    MemoryStats,
    MemoryUnavailableError,
    Recollection,
    RetryPolicy,
    record_id,
    repeat_key,
)
from df_agent.memory.store import DEFAULT_COLLECTION, VisualQAMemory, default_path

__all__ = [
    "DEFAULT_COLLECTION",
    "CheckReport",
    "MemoryBusyError",
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
