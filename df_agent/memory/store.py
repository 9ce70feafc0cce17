"""Visual Q&A memory in Chroma: log every answer, recall similar ones, answer exact repeats.

`VisualQAMemory` keeps one record per distinct asking (a `FocusResult` and the text embedded
for it) in a Chroma collection, embedded (`PersistentClient` on a folder; several processes on
one folder take turns to write, under a file lock) or shared (`HttpClient` to a ``chroma run``
server, for many processes and machines).

How a record travels: `log` appends it to a local journal and fsyncs, then returns its id: from
then on the record survives a crash. A background thread embeds queued records in batches and
upserts them into Chroma (retrying transient errors with backoff), then empties the journal. If
the store stays unreachable the records wait in the journal; they are written on the next
successful connection, by this process or, if it died, by the next one to connect. A record's id
is derived from what was asked (`record_id`), so writing it twice stores it once.

Chroma is imported only here, when a memory first connects. Vectors are computed by our own
embedder (`df_agent.memory.embeddings`) and passed to Chroma, which never runs an embedding function of
its own; the embedder's config is kept in the collection's metadata, so a reopened memory
embeds queries the same way.
"""

from __future__ import annotations

import atexit
import hashlib
import itertools
import json
import logging
import math
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing, nullcontext
from functools import partial
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, get_args
from urllib.parse import urlsplit

from pydantic import BaseModel, Field
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential, wait_random

from df_agent.images import image_hash, load_image
from df_agent.memory.embeddings import Embedder, EmbedderError, HFEmbedder, embedder_from_config
from df_agent.memory.journal import Journal, replay
from df_agent.results import ArbitrationMethod, FocusResult, Mode

if TYPE_CHECKING:
    from langchain_core.retrievers import BaseRetriever
    from PIL import Image

logger = logging.getLogger(__name__)

DEFAULT_COLLECTION = "df-agent-memory"
EMBEDDER_KEY = "df_agent_embedder"
BATCH_SIZE = 256
_COLLECTION_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{1,510}[a-zA-Z0-9]$")
_IMAGE_HASH = re.compile(r"^[0-9a-f]{64}$")
T = TypeVar("T")


class MemoryUnavailableError(RuntimeError):
    """The store could not be reached (after retries); records already logged are safe in the journal."""


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

    @classmethod
    def from_result(cls, result: FocusResult) -> MemoryRecord:
        """The record of `result` (its crop image is not kept)."""
        key = repeat_key(result.image_hash, result.question, result.model_id, result.mode, result.options)
        return cls(id=record_id(key, result.arbitration), key=key, document=_document(result), result=result)


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


class VisualQAMemory:
    """A log of past visual Q&A in Chroma, with recall of similar questions and exact repeats.

    Args:
        path: A folder for an embedded store (default: ``memory`` under the user's cache
            directory), or the URL of a ``chroma run`` server (``http://host:port``), which
            several processes and machines can share.
        client: A chromadb client to use instead (`path` must then be None). Writes from one
            process are serialised; several processes on one embedded folder need `path`.
        embedder: Turns text into vectors; default: the one recorded in the collection, or
            all-MiniLM-L6-v2 (`df_agent.memory.embeddings.HFEmbedder`) for a new collection.
        collection: Collection name: 3-512 characters of ``[a-zA-Z0-9._-]``.
        journal_dir: Where the local journals live; default ``journal/<collection>`` in the
            memory's folder, or a folder named after the store and collection under the user's
            cache directory for a server or a client.
        retry: Backoff policy for transient store errors.
        batch_delay: Seconds the background writer waits to gather records into one write
            (each write has a fixed cost and, embedded, holds the GIL). Reads in this process
            never see the delay: they write what is pending first.
    """

    def __init__(
        self,
        path: str | PathLike | None = None,
        *,
        client: Any = None,
        embedder: Embedder | None = None,
        collection: str = DEFAULT_COLLECTION,
        journal_dir: str | PathLike | None = None,
        retry: RetryPolicy | None = None,
        batch_delay: float = 5.0,
    ) -> None:
        if path is not None and client is not None:
            raise ValueError("pass either path (a folder or a server URL) or client, not both")
        if not isinstance(collection, str) or not _COLLECTION_NAME.match(collection):
            raise ValueError(
                f"collection name {collection!r} is invalid: use 3-512 characters of [a-zA-Z0-9._-], "
                "starting and ending with a letter or digit"
            )
        if embedder is not None and not isinstance(embedder, Embedder):
            raise TypeError(
                "embedder must have dimension, embed(texts) and config() (see df_agent.memory.embeddings)"
            )
        self.collection_name = collection
        self.retry = retry or RetryPolicy()
        if batch_delay < 0:
            raise ValueError(f"batch_delay must be >= 0, not {batch_delay}")
        self.batch_delay = batch_delay
        self._client = client
        self._server: tuple[str, int, bool] | None = None
        self._folder: Path | None = None
        if client is not None:
            self.location = "client"
        elif isinstance(path, str) and path.lower().startswith(("http://", "https://")):
            self._server = _parse_url(path)
            self.location = path
        else:
            self._folder = Path(path).expanduser() if path is not None else default_path()
            if self._folder.exists() and not self._folder.is_dir():
                raise ValueError(f"memory path {str(self._folder)!r} exists and is not a folder")
            self.location = str(self._folder)
        if journal_dir is None:  # one folder per store and collection: replays go where they belong
            journal_dir = (
                self._folder / "journal" / collection
                if self._folder is not None
                else _cache_dir() / "memory-journal" / _slug(f"{_client_identity(client, path)}-{collection}")
            )
        self._journal = Journal(journal_dir)
        self._embedder = embedder
        self._embedder_given = embedder is not None
        self._collection: Any = None
        self._connect_lock = threading.Lock()
        self._replay_lock = threading.Lock()
        self._replay_due = True
        self._write_lock = threading.Lock()
        self._file_lock = None
        if self._folder is not None:
            from filelock import FileLock

            self._file_lock = FileLock(str(self._folder / "write.lock"))
        # Records acknowledged by `log` and not yet in the store, by id; guarded by _cond.
        self._cond = threading.Condition()
        self._pending: dict[str, MemoryRecord] = {}
        self._acknowledged = 0
        self._last_error: BaseException | None = None
        self._writer: threading.Thread | None = None
        self._urgent = 0  # flush() calls waiting: write now, without gathering a batch
        self._since = 0.0  # when the oldest pending record was queued (time.monotonic)
        self._retry_at = 0.0  # after a failed write, the next try waits until then
        self._closed = False
        atexit.register(self.close)

    # -- writing -------------------------------------------------------------------------------

    def log(self, result: FocusResult) -> str:
        """Record one answer; returns its id once the record is durable.

        The record is fsync'd to the local journal before this returns, and reaches the store
        moments later (see `flush`). A result answered from memory (``cached``) is already
        there: its id is returned and nothing is written.

        Raises:
            TypeError: If `result` is not a `FocusResult`.
            OSError: If the journal cannot be written (the record is then not logged).
        """
        if not isinstance(result, FocusResult):
            raise TypeError(f"log takes a FocusResult, not {type(result).__name__}")
        if self._closed:
            raise RuntimeError("this memory is closed")
        record = MemoryRecord.from_result(result.model_copy(update={"cached": False}))
        if result.cached:
            return record.id
        line = record.model_dump_json()
        self._journal.append(line)
        record = MemoryRecord.model_validate_json(line)  # a copy the caller cannot change
        with self._cond:
            if not self._pending:
                self._since = time.monotonic()
            self._pending[record.id] = record
            self._acknowledged += 1
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_loop, name="df-agent-memory", daemon=True)
                self._writer.start()
            self._cond.notify_all()
        return record.id

    def import_records(self, records: Iterable[MemoryRecord]) -> int:
        """Write records straight to the store, in batches (e.g. from `export`); returns how many.

        For bulk loads: no journal, so the caller keeps the source until this returns. Writing a
        record that is already there changes nothing (ids are stable).
        """
        total, batch = 0, []
        for record in records:
            if not isinstance(record, MemoryRecord):
                raise TypeError(f"import_records takes MemoryRecord objects, not {type(record).__name__}")
            batch.append(record)
            if len(batch) == BATCH_SIZE:
                self._store(batch)
                total, batch = total + len(batch), []
        if batch:
            self._store(batch)
        return total + len(batch)

    def flush(self, timeout: float | None = 30.0) -> None:
        """Wait until every record this process logged is in the store.

        Raises:
            MemoryUnavailableError: If they are not there after `timeout` seconds (they stay in
                the journal and are written later).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._urgent += 1
            self._cond.notify_all()
            try:
                while self._pending:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise MemoryUnavailableError(
                            f"{len(self._pending)} logged records are not in the store at {self.location} "
                            f"yet; they are safe in the journal {self._journal.path} and will be written "
                            f"when the store is reachable (last error: {self._last_error!r})"
                        )
                    self._cond.wait(remaining)
            finally:
                self._urgent -= 1

    def close(self, timeout: float = 10.0) -> None:
        """Flush (up to `timeout` seconds), stop the writer and close the journal.

        Records that could not be written stay in the journal and are replayed by the next
        memory that connects to the same store with the same journal folder.
        """
        if self._closed:
            return
        try:
            self.flush(timeout)
        except MemoryUnavailableError as exc:
            logger.warning("%s", exc)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._writer is not None:
            self._writer.join(timeout=timeout)
        self._journal.close()
        atexit.unregister(self.close)

    def __enter__(self) -> VisualQAMemory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _write_loop(self) -> None:
        """The background writer: stores pending records in batches until the memory closes."""
        while True:
            with self._cond:
                batch = self._next_batch()
            if batch is None:
                return
            try:
                self._store(batch)
            except Exception as exc:
                with self._cond:
                    first_failure = self._last_error is None
                    self._last_error = exc
                    self._retry_at = time.monotonic() + self.retry.pause
                    self._cond.notify_all()
                logger.log(
                    logging.WARNING if first_failure else logging.DEBUG,
                    "cannot write to the memory store %s (%r); %d records wait in the journal",
                    self.location, exc, len(batch),
                )  # fmt: skip
                continue
            with self._cond:
                for record in batch:
                    if self._pending.get(record.id) is record:
                        del self._pending[record.id]
                self._last_error = None
                self._retry_at = 0.0
                self._since = -math.inf  # records left over are a backlog: write them at once
                if not self._pending:
                    self._journal.truncate_if(self._acknowledged)
                self._cond.notify_all()
            try:
                self._replay_orphans()
            except Exception as exc:  # the orphans stay on disk for the next try
                logger.warning("could not replay orphaned memory journals yet: %r", exc)

    def _next_batch(self) -> list[MemoryRecord] | None:
        """Wait (holding _cond) until a batch is due; None once the memory is closed."""
        while True:
            if self._closed:
                return None
            now = time.monotonic()
            urgent = self._urgent > 0 or len(self._pending) >= BATCH_SIZE
            if not self._pending:
                self._cond.wait()
            elif now < self._retry_at and not self._urgent:
                self._cond.wait(self._retry_at - now)
            elif now < self._since + self.batch_delay and not urgent:
                self._cond.wait(self._since + self.batch_delay - now)
            else:
                return list(self._pending.values())[:BATCH_SIZE]

    def _store(self, records: Sequence[MemoryRecord]) -> None:
        """Embed and upsert records, in batches (idempotent: ids are stable)."""
        for start in range(0, len(records), BATCH_SIZE):
            chunk = records[start : start + BATCH_SIZE]
            payload = {
                "ids": [record.id for record in chunk],
                "embeddings": self._get_embedder().embed([record.document for record in chunk]),
                "documents": [record.document for record in chunk],
                "metadatas": [_metadata(record) for record in chunk],
            }
            self._call(partial(self._upsert, payload=payload))

    def _upsert(self, collection: Any, payload: dict[str, list[Any]]) -> None:
        """One upsert; across processes on one folder, under the folder's write lock."""
        with self._write_lock, self._file_lock or nullcontext():
            collection.upsert(**payload)

    def _replay_orphans(self) -> None:
        """Write the records of journals left by processes that died (once per connection)."""
        if not self._replay_due:
            return
        with self._replay_lock:
            if not self._replay_due:
                return
            for path in self._journal.orphans():
                count = replay(path, lambda rows: self._store(_records(rows)))
                if count:
                    logger.info("replayed %d records from the journal %s", count, path)
            self._replay_due = False

    # -- reading -------------------------------------------------------------------------------

    def count(self) -> int:
        """How many records the store holds, after writing this process's pending ones."""
        self._sync()
        return self._call(lambda collection: collection.count())

    def recall(
        self, query: str, image: str | Image.Image | bytes | PathLike | None = None, k: int = 5
    ) -> list[Recollection]:
        """The `k` records whose question and answer are closest in meaning to `query`.

        Args:
            query: A question or any text.
            image: Only records about this image: an image (path, bytes, data URI, PIL) or its
                content hash (`df_agent.images.image_hash`).
            k: How many records at most.

        Returns:
            Closest first, each with its cosine distance.
        """
        if not isinstance(query, str) or not query.strip():
            raise ValueError("query must be a non-empty string")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, not {k!r}")
        digest = _digest(image) if image is not None else None
        self._sync()
        vector = self._get_embedder().embed([query])[0]
        if digest is not None:
            return self._recall_one_image(vector, digest, k)
        found = self._call(
            lambda collection: collection.query(
                query_embeddings=[vector], n_results=k, include=["metadatas", "documents", "distances"]
            )
        )
        return [
            Recollection(record=record, distance=float(distance))
            for record, distance in zip(_unpack(found, 0), found["distances"][0], strict=True)
        ]

    def _recall_one_image(self, vector: list[float], digest: str, k: int) -> list[Recollection]:
        """Exact search among one image's records: Chroma's filtered index search is far slower."""
        import numpy as np

        candidates = self._call(
            lambda collection: collection.get(where={"image_hash": digest}, include=["embeddings"])
        )
        if not candidates["ids"]:
            return []
        matrix = np.asarray(candidates["embeddings"], dtype=np.float32)
        query = np.asarray(vector, dtype=np.float32)
        norms = np.linalg.norm(matrix, axis=1) * np.linalg.norm(query)
        distances = 1.0 - (matrix @ query) / np.maximum(norms, 1e-12)
        order = np.argsort(distances, kind="stable")[:k]
        best = [candidates["ids"][i] for i in order]
        found = self._call(lambda collection: collection.get(ids=best, include=["metadatas", "documents"]))
        by_id = {record.id: record for record in _unpack(found)}
        return [
            Recollection(record=by_id[found_id], distance=float(distances[index]))
            for index, found_id in zip(order, best, strict=True)
            if found_id in by_id
        ]

    def lookup(
        self,
        image: str | Image.Image | bytes | PathLike,
        question: str,
        model_id: str,
        mode: Mode,
        options: Sequence[str] | None = None,
        *,
        arbitration: ArbitrationMethod | None = None,
    ) -> FocusResult | None:
        """The latest answer to exactly this question about this image by this model, if any.

        Args:
            image: The image, or its content hash.
            question: The question (whitespace is normalised, nothing else).
            model_id: The backend's model id.
            mode: "dualfocus", "macro" or "micro".
            options: Multiple-choice options, if any; they are part of the question.
            arbitration: The vote method asked for; a remembered answer decided by another
                method does not count (one that needed no vote does). None: any.

        Returns:
            The remembered `FocusResult` with ``cached=True``, or None. An unreachable store
            counts as a miss (with a warning), so the caller runs the model instead.
        """
        key = repeat_key(_digest(image), question, model_id, mode, options)
        methods = [arbitration] if arbitration is not None else list(get_args(ArbitrationMethod))
        ids = [record_id(key, method) for method in [None, *methods]]
        matches = [record.result for record in self._pending_snapshot() if record.id in ids]
        try:  # by id: a primary-key read, fast at any size (a metadata filter is not)
            found = self._call(
                lambda collection: collection.get(ids=ids, include=["metadatas", "documents"]), attempts=1
            )
        except MemoryUnavailableError as exc:
            logger.warning("memory lookup skipped, store %s unreachable: %r", self.location, exc)
        else:
            matches += [record.result for record in _unpack(found)]
        if not matches:
            return None
        return max(matches, key=lambda r: r.created_at).model_copy(update={"cached": True})

    def records(self, page_size: int = 500) -> Iterator[MemoryRecord]:
        """Every record in the store, page by page (store order)."""
        self._sync()
        for offset in itertools.count(0, page_size):
            page = self._call(
                partial(_get_page, limit=page_size, offset=offset, include=["metadatas", "documents"])
            )
            yield from _unpack(page)
            if len(page["ids"]) < page_size:
                return

    def export(self, path: str | PathLike) -> int:
        """Write every record as one JSON line each to `path`; returns how many."""
        count = 0
        with open(path, "w", encoding="utf-8") as out:
            for record in self.records():
                out.write(record.model_dump_json() + "\n")
                count += 1
        return count

    def stats(self) -> MemoryStats:
        """Where the memory lives, how many records it holds and how many wait."""
        records = self.count()
        with self._cond:
            pending, last_error = len(self._pending), self._last_error
        return MemoryStats(
            location=self.location,
            collection=self.collection_name,
            records=records,
            pending=pending,
            orphaned_journals=len(self._journal.orphans()),
            embedder=self._get_embedder().config(),
            journal=str(self._journal.folder),
            last_error=None if last_error is None else repr(last_error),
        )

    def as_retriever(self, k: int = 4, image: str | None = None) -> BaseRetriever:
        """A LangChain retriever over this memory (see `df_agent.memory.retriever`)."""
        from df_agent.memory.retriever import MemoryRetriever

        return MemoryRetriever(memory=self, k=k, image=image)

    # -- the store -----------------------------------------------------------------------------

    def _sync(self) -> None:
        """Before a read: replay orphaned journals once, then wait for this process's records."""
        if self._last_error is not None:
            self._call(lambda collection: collection.count())  # fail fast while the store is down
        self._replay_orphans()
        self.flush()

    def _pending_snapshot(self) -> list[MemoryRecord]:
        with self._cond:
            return list(self._pending.values())

    def _call(self, operation: Callable[[Any], T], attempts: int | None = None) -> T:
        """Run `operation(collection)`, reconnecting and retrying transient errors with backoff."""
        retrying = Retrying(
            stop=stop_after_attempt(attempts or self.retry.attempts),
            wait=wait_exponential(multiplier=self.retry.initial, max=self.retry.maximum)
            + wait_random(0, self.retry.initial),
            retry=retry_if_exception(_transient),
            before_sleep=lambda _state: self._disconnect(),
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    return operation(self._connect())
        except Exception as exc:
            if _transient(exc):
                raise MemoryUnavailableError(
                    f"the memory store at {self.location} is unreachable: {exc!r}"
                ) from exc
            raise
        raise AssertionError("unreachable")  # pragma: no cover - tenacity reraises

    def _connect(self) -> Any:
        with self._connect_lock:
            if self._collection is None:
                client = self._client if self._client is not None else self._open_client()
                embedder = self._embedder or HFEmbedder()
                collection = client.get_or_create_collection(
                    self.collection_name,
                    embedding_function=None,
                    configuration={"hnsw": {"space": "cosine"}},
                    metadata={EMBEDDER_KEY: json.dumps(embedder.config(), sort_keys=True)},
                )
                self._embedder = self._check_embedder(collection, embedder)
                self._collection = collection
                self._replay_due = True
            return self._collection

    def _disconnect(self) -> None:
        with self._connect_lock:
            self._collection = None

    def _get_embedder(self) -> Embedder:
        """The embedder, once the collection has said which one it was built with."""
        if self._collection is None:
            self._call(lambda collection: collection)
        return self._embedder  # type: ignore[return-value]

    def _check_embedder(self, collection: Any, embedder: Embedder) -> Embedder:
        """The embedder to use with `collection`: the one it was built with."""
        stored = (collection.metadata or {}).get(EMBEDDER_KEY)
        if stored is None:
            return embedder
        config = json.loads(stored)
        if config == json.loads(json.dumps(embedder.config(), sort_keys=True)):
            return embedder
        if self._embedder_given:
            raise EmbedderError(
                f"collection {self.collection_name!r} at {self.location} was built with the embedder "
                f"{config}, not {embedder.config()}; pass a matching embedder or use another collection"
            )
        return embedder_from_config(config)

    def _open_client(self) -> Any:
        chromadb = _import_chromadb()
        from chromadb.config import Settings

        settings = Settings(anonymized_telemetry=False)
        if self._server is not None:
            host, port, ssl = self._server
            try:
                return chromadb.HttpClient(host=host, port=port, ssl=ssl, settings=settings)
            except ValueError as exc:  # chromadb's "Could not connect to a Chroma server"
                raise ConnectionError(f"cannot reach the Chroma server at {self.location}: {exc}") from None
        assert self._folder is not None
        self._folder.mkdir(parents=True, exist_ok=True)
        with self._write_lock, self._file_lock or nullcontext():
            _gather_statistics(self._folder / "chroma" / "chroma.sqlite3")
        return chromadb.PersistentClient(path=str(self._folder / "chroma"), settings=settings)

    def __repr__(self) -> str:
        return f"VisualQAMemory({self.location!r}, collection={self.collection_name!r})"


def _transient(exc: BaseException) -> bool:
    """True for errors worth retrying: connection trouble, timeouts, 429/5xx, a busy database."""
    import httpx

    if isinstance(exc, (ConnectionError, TimeoutError, httpx.TransportError, sqlite3.OperationalError)):
        return True
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code == 429 or exc.response.status_code >= 500
    try:
        from chromadb import errors
    except ImportError:
        return False
    return isinstance(exc, (errors.InternalError, errors.RateLimitError))


def _gather_statistics(database: Path, min_rows: int = 1000) -> None:
    """Run SQLite's ANALYZE once on an embedded store that has grown but has no statistics.

    Without them SQLite plans Chroma's metadata filters (``where``) as table scans: at 100k
    records a filtered read took ~0.4 s instead of ~1 ms on our machine. Chroma never analyzes.
    """
    if not database.is_file():
        return
    try:
        with closing(sqlite3.connect(database, timeout=30)) as connection:
            analyzed = connection.execute(
                "SELECT 1 FROM sqlite_master WHERE name = 'sqlite_stat1'"
            ).fetchone()
            rows = connection.execute("SELECT count(*) FROM embeddings").fetchone()[0]
            if analyzed is None and rows >= min_rows:
                connection.execute("ANALYZE")
                connection.commit()
    except sqlite3.Error as exc:  # a layout this code does not know: leave the store alone
        logger.debug("no statistics gathered for %s: %r", database, exc)


def _import_chromadb() -> Any:
    try:
        import chromadb
    except ImportError:
        raise ImportError("the memory needs chromadb: pip install 'df-agent[memory]'") from None
    return chromadb


def _client_identity(client: Any, url: Any) -> str:
    """Which store a server URL or a chromadb client points at, for naming its journal folder."""
    if client is None:
        return str(url)
    try:
        settings = client.get_settings()
    except Exception:  # not a chromadb client we can ask
        return f"client-{type(client).__name__}"
    if settings.is_persistent and settings.persist_directory:
        return str(Path(settings.persist_directory).resolve())
    return f"{settings.chroma_server_host}:{settings.chroma_server_http_port}"


def _slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9._-]+", "_", text).strip("_")[:200]


def _parse_url(url: str) -> tuple[str, int, bool]:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"invalid port in the Chroma server URL {url!r}") from None
    if not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(f"a Chroma server URL is http(s)://host[:port], not {url!r}")
    ssl = parts.scheme.lower() == "https"
    return parts.hostname, port or (443 if ssl else 8000), ssl


def default_path() -> Path:
    """The default memory folder: ``memory`` under the user's cache directory."""
    return _cache_dir() / "memory"


def _cache_dir() -> Path:
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("df-agent"))


def _digest(image: str | Image.Image | bytes | PathLike) -> str:
    """The content hash of an image, or the argument itself if it already is one."""
    if isinstance(image, str) and _IMAGE_HASH.match(image):
        return image
    return image_hash(load_image(image))


def _document(result: FocusResult) -> str:
    """The text embedded for recall: the question, then the answer (an option letter's text too)."""
    answer = result.answer
    if result.options and len(answer) == 1 and "A" <= answer <= "Z":
        index = ord(answer) - ord("A")
        if index < len(result.options):
            answer = f"{answer}. {result.options[index]}"
    return f"{result.question}\n{answer}"


def _metadata(record: MemoryRecord) -> dict[str, str | float]:
    result = record.result
    return {
        "key": record.key,
        "image_hash": result.image_hash,
        "model_id": result.model_id,
        "mode": result.mode,
        "created_at": result.created_at.timestamp(),
        "result": result.model_dump_json(),
    }


def _unpack(found: dict[str, Any], query: int | None = None) -> list[MemoryRecord]:
    """The records in a Chroma `get` answer, or in one query's part of a `query` answer."""
    columns = [
        found[name] if query is None else found[name][query] for name in ("ids", "metadatas", "documents")
    ]
    return [
        MemoryRecord(
            id=record_id,
            key=meta["key"],
            document=document,
            result=FocusResult.model_validate_json(meta["result"]),
        )
        for record_id, meta, document in zip(*columns, strict=True)
    ]


def _get_page(collection: Any, **kwargs: Any) -> dict[str, Any]:
    return collection.get(**kwargs)


def _records(rows: Sequence[dict[str, Any]]) -> list[MemoryRecord]:
    """Journal rows as records; a row that does not parse is skipped with a warning."""
    records = []
    for row in rows:
        try:
            records.append(MemoryRecord.model_validate(row))
        except ValueError as exc:
            logger.warning("skipping a journal row that is not a record: %s", exc)
    return records


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
