"""A LangChain retriever over the visual Q&A memory, for retrieval chains and agents."""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field

from df_agent.memory.records import Recollection
from df_agent.memory.store import VisualQAMemory


class MemoryRetriever(BaseRetriever):
    """Past questions and answers closest in meaning to the query, as LangChain documents.

    Each document's text is the question and the answer; its metadata holds the record id, the
    cosine distance, the image hash (and file name, if logged), the model, the mode, the path,
    the box and the time.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    memory: VisualQAMemory = Field(description="The memory to search.")
    k: int = Field(default=4, ge=1, description="How many documents at most.")
    image: str | None = Field(default=None, description="Only records about the image with this hash.")

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        return [to_document(found) for found in self.memory.recall(query, image=self.image, k=self.k)]


def memory_retriever(memory: VisualQAMemory, k: int = 4, image: str | None = None) -> MemoryRetriever:
    """A LangChain retriever over `memory`: the `k` closest records, optionally about one image (hash)."""
    return MemoryRetriever(memory=memory, k=k, image=image)


def to_document(found: Recollection) -> Document:
    """A recalled record as a LangChain `Document`."""
    result = found.record.result
    metadata: dict[str, Any] = {
        "id": found.record.id,
        "distance": found.distance,
        "question": result.question,
        "answer": result.answer,
        "image_hash": result.image_hash,
        "model_id": result.model_id,
        "mode": result.mode,
        "path": result.path,
        "box": None if result.box is None else list(result.box.as_tuple()),
        "created_at": result.created_at.isoformat(),
        "image_name": found.record.image_name,
    }
    return Document(page_content=found.record.document, metadata=metadata, id=found.record.id)


__all__ = ["MemoryRetriever", "memory_retriever", "to_document"]
