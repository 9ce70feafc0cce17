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

Chroma is imported only here (no other module of the package does), when a memory first
connects. Vectors are computed by our own embedder (`df_agent.memory.embeddings`) and passed
to Chroma, which never runs an embedding function of its own; the embedder's config is kept in
the collection's metadata, so a reopened memory embeds queries the same way.

Chroma's HNSW index can leave a record that `get` returns unreachable by any search
(chroma-core/chroma#7758), so every batch written is searched for, record by record, with its
own vector, and what does not come back is written again (`VisualQAMemory.check`).
"""

from __future__ import annotations

import atexit
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

from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential, wait_random

from df_agent.images import image_hash, load_image
from df_agent.memory.embeddings import Embedder, EmbedderError, HFEmbedder, embedder_from_config
from df_agent.memory.journal import Journal, replay
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
from df_agent.results import ArbitrationMethod, FocusResult, Mode

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)

DEFAULT_COLLECTION = "df-agent-memory"
EMBEDDER_KEY = "df_agent_embedder"
BATCH_SIZE = 256
CHECK_DEPTH = 10  # a record counts as reachable if a search with its own vector returns it in the top 10
CHECK_PAGE = 1000  # records per page when `check` goes through a whole store
TIE = 1e-6  # cosine distance under which two vectors count as the same
_COLLECTION_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{1,510}[a-zA-Z0-9]$")
_IMAGE_HASH = re.compile(r"^[0-9a-f]{64}$")
T = TypeVar("T")


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
        read_timeout: Seconds a read (`count`, `recall`, `records`, `stats`, ...) waits for the
            records this process logged to reach the store. Past it, a read raises
            `MemoryBusyError` if the store is answering but still writing, or
            `MemoryUnavailableError` if it cannot be reached.

    Every batch written is checked: each new record must come back from a search with its own
    vector (Chroma's HNSW index can leave records that `get` returns but no search finds,
    chroma-core/chroma#7758); a record that does not is written again. The newest records are
    checked the same way when a store is opened, and `check` checks a whole store.
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
        read_timeout: float = 30.0,
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
        if read_timeout < 0:
            raise ValueError(f"read_timeout must be >= 0, not {read_timeout}")
        self.read_timeout = read_timeout
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
        self._last_error: BaseException | None = None  # the last background write's failure
        self._trouble: BaseException | None = None  # a transient error seen by a call still retrying
        self._stored = 0  # records this process has written to the store
        self._tail_due = True  # check the newest records once per connection
        self._writer: threading.Thread | None = None
        self._urgent = 0  # flush() calls waiting: write now, without gathering a batch
        self._since = 0.0  # when the oldest pending record was queued (time.monotonic)
        self._retry_at = 0.0  # after a failed write, the next try waits until then
        self._closed = False
        atexit.register(self.close)

    # -- writing -------------------------------------------------------------------------------

    def log(self, result: FocusResult, *, image_name: str | None = None) -> str:
        """Record one answer; returns its id once the record is durable.

        The record is fsync'd to the local journal before this returns, and reaches the store
        moments later (see `flush`). A result answered from memory (``cached``) is already
        there: its id is returned and nothing is written.

        Args:
            result: The answer, as `DualFocus.ask` returned it.
            image_name: The image's file name (or any short label) to show with the record in
                searches; it is not part of the record's id.

        Raises:
            TypeError: If `result` is not a `FocusResult`.
            OSError: If the journal cannot be written (the record is then not logged).
        """
        if not isinstance(result, FocusResult):
            raise TypeError(f"log takes a FocusResult, not {type(result).__name__}")
        if image_name is not None and not isinstance(image_name, str):
            raise TypeError(f"image_name must be a string, not {type(image_name).__name__}")
        if self._closed:
            raise RuntimeError("this memory is closed")
        record = MemoryRecord.from_result(result.model_copy(update={"cached": False}), image_name)
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
            MemoryBusyError: If they are not all there after `timeout` seconds while the store
                answers (the writer is still busy with them).
            MemoryUnavailableError: If they are not there after `timeout` seconds because the
                store cannot be reached. Either way they stay in the journal and are written later.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._urgent += 1
            self._cond.notify_all()
            stored_before = self._stored
            try:
                while self._pending:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise self._not_yet(timeout, self._stored - stored_before)
                    self._cond.wait(remaining)
            finally:
                self._urgent -= 1

    def _not_yet(self, waited: float | None, progress: int) -> MemoryUnavailableError:
        """The error for records still pending after a wait (holding _cond): busy or unreachable."""
        where = f"they are safe in the journal {self._journal.path}"
        error = self._last_error or self._trouble
        if error is not None:
            return MemoryUnavailableError(
                f"the memory store at {self.location} is unreachable: {len(self._pending)} logged records "
                f"are not in it yet; {where} and will be written when the store is reachable "
                f"(last error: {error!r})"
            )
        return MemoryBusyError(
            f"the memory store at {self.location} is busy: {len(self._pending)} logged records are still "
            f"being written ({progress} written during the {waited:g} s waited, no error); {where}. "
            "Wait longer (read_timeout, flush(timeout=...)) or try again later"
        )

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
                self._stored += len(batch)
                self._retry_at = 0.0
                self._since = -math.inf  # records left over are a backlog: write them at once
                if not self._pending:
                    self._journal.truncate_if(self._acknowledged)
                self._cond.notify_all()
            try:
                self._replay_orphans()
                self._check_tail()
            except Exception as exc:  # the orphans stay on disk for the next try
                logger.warning("could not replay orphaned memory journals or check the store yet: %r", exc)

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
        """Embed and upsert records in batches (idempotent: ids are stable), each batch checked.

        The caller still holds the records elsewhere (the journal, an import's source) until
        this returns, so a repair may remove and add a record again.
        """
        for start in range(0, len(records), BATCH_SIZE):
            chunk = records[start : start + BATCH_SIZE]
            payload = {
                "ids": [record.id for record in chunk],
                "embeddings": self._get_embedder().embed([record.document for record in chunk]),
                "documents": [record.document for record in chunk],
                "metadatas": [_metadata(record) for record in chunk],
            }
            self._call(partial(self._upsert, payload=payload))
            missing = self._call(partial(_unreachable, ids=payload["ids"], vectors=payload["embeddings"]))
            if missing:
                self._repair(_select(payload, missing))

    def _upsert(self, collection: Any, payload: dict[str, list[Any]]) -> None:
        """One upsert; across processes on one folder, under the folder's write lock."""
        with self._write_lock, self._file_lock or nullcontext():
            collection.upsert(**payload)

    def _repair(self, payload: dict[str, list[Any]]) -> list[str]:
        """Make records no search finds findable again; returns the ids that are, now.

        An upsert of the same vector first (harmless); for what that leaves unreachable, remove
        and add the records again, which links them into the index as new entries. The caller
        keeps the records elsewhere until this returns.
        """
        ids = payload["ids"]
        logger.warning(
            "%d records in the memory store %s were unreachable by search; repairing", 
            len(ids), self,
        )  # fmt: skip
        self._call(partial(self._upsert, payload=payload))
        missing = self._call(partial(_unreachable, ids=ids, vectors=payload["embeddings"]))
        if missing:
            again = _select(payload, missing)
            self._call(partial(self._reinsert, payload=again))
            missing = self._call(partial(_unreachable, ids=again["ids"], vectors=again["embeddings"]))
        if missing:
            logger.error(
                "%d records in the memory store %s stay unreachable by search after repair: %s",
                len(missing), self, [ids[i] for i in missing],
            )  # fmt: skip
        lost = {ids[i] for i in missing}
        return [found for found in ids if found not in lost]

    def _reinsert(self, collection: Any, payload: dict[str, list[Any]]) -> None:
        with self._write_lock, self._file_lock or nullcontext():
            collection.delete(ids=payload["ids"])
            collection.add(**payload)

    def _check_stored(self, collection: Any, offset: int, limit: int, repair: bool) -> tuple[int, list, list]:
        """Check one page of stored records: (how many, unreachable ids, repaired ids)."""
        page = collection.get(limit=limit, offset=offset, include=["embeddings", "documents", "metadatas"])
        if not page["ids"]:
            return 0, [], []
        payload = {
            "ids": list(page["ids"]),
            "embeddings": [list(map(float, vector)) for vector in page["embeddings"]],
            "documents": list(page["documents"]),
            "metadatas": list(page["metadatas"]),
        }
        missing = _unreachable(collection, payload["ids"], payload["embeddings"])
        unreachable = [payload["ids"][i] for i in missing]
        if not missing or not repair:
            return len(payload["ids"]), unreachable, []
        broken = _select(payload, missing)
        # A repair may remove and add a record: journal it first, so a crash in between loses nothing.
        journal = Journal(self._journal.folder)
        try:
            for record in _unpack(broken):
                journal.append(record.model_dump_json())
            repaired = self._repair(broken)
            journal.truncate_if(journal.written)
        finally:
            journal.close()
        return len(payload["ids"]), unreachable, repaired

    def _check_tail(self) -> None:
        """Once per connection: check the newest records in the store and repair what is hidden."""
        if not self._tail_due:
            return
        self._tail_due = False
        total = self._call(lambda collection: collection.count())
        start = max(total - BATCH_SIZE, 0)
        _, unreachable, repaired = self._call(
            partial(self._check_stored, offset=start, limit=BATCH_SIZE, repair=True)
        )
        if unreachable:
            logger.warning(
                "opening %s: %d of the newest %d records were unreachable by search, %d repaired",
                self, len(unreachable), total - start, len(repaired),
            )  # fmt: skip

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
        """How many records the store holds, after writing this process's pending ones.

        Raises:
            MemoryBusyError: If this process's records are still being written after `read_timeout`.
            MemoryUnavailableError: If the store cannot be reached.
        """
        self._sync()
        return self._call(lambda collection: collection.count())

    def check(self, repair: bool = False, page_size: int = CHECK_PAGE) -> CheckReport:
        """Search for every record with its own vector; report (and with `repair`, fix) what is hidden.

        A record is reachable when a search with its stored vector returns it among the
        nearest few (or ties it at distance 0 with records that fill them). Repair writes a
        hidden record again, journaled first so a crash in the middle loses nothing.

        Args:
            repair: Write unreachable records again, then search for them once more.
            page_size: Records read and searched for at a time.
        """
        started = time.monotonic()
        self._sync()
        checked, unreachable, repaired = 0, [], []
        for offset in itertools.count(0, page_size):
            count, missing, fixed = self._call(
                partial(self._check_stored, offset=offset, limit=page_size, repair=repair)
            )
            checked, unreachable, repaired = checked + count, unreachable + missing, repaired + fixed
            if count < page_size:
                break
        return CheckReport(
            location=self.location,
            collection=self.collection_name,
            checked=checked,
            unreachable=unreachable,
            repaired=repaired,
            seconds=time.monotonic() - started,
        )

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
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
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

    # -- the store -----------------------------------------------------------------------------

    def _sync(self) -> None:
        """Before a read: replay orphaned journals once, wait for this process's records (up to
        `read_timeout`), and check the newest records once per connection."""
        if self._last_error is not None:
            self._call(lambda collection: collection.count())  # fail fast while the store is down
        self._replay_orphans()
        self.flush(self.read_timeout)
        self._check_tail()

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
            before_sleep=self._before_retry,
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    answer = operation(self._connect())
                    self._trouble = None
                    return answer
        except Exception as exc:
            if _locked(exc):
                raise MemoryBusyError(
                    f"the memory store at {self.location} is busy: its database stayed locked by "
                    f"another writer through {attempts or self.retry.attempts} tries ({exc}); try again later"
                ) from exc
            if _transient(exc):
                raise MemoryUnavailableError(
                    f"the memory store at {self.location} is unreachable: {exc!r}"
                ) from exc
            raise
        raise AssertionError("unreachable")  # pragma: no cover - tenacity reraises

    def _before_retry(self, state: Any) -> None:
        self._trouble = state.outcome.exception() if state.outcome is not None else None
        self._disconnect()

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
                self._tail_due = True
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


def _locked(exc: BaseException) -> bool:
    """True for SQLite's "database is locked": another writer holds the store, it is not down."""
    return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc).lower()


def _unreachable(collection: Any, ids: Sequence[str], vectors: Sequence[Sequence[float]]) -> list[int]:
    """Positions of the records that a search with their own vector does not return.

    A record counts as reachable if it is among the `CHECK_DEPTH` nearest, or if those are all
    at distance 0 from its vector (identical vectors: which of them comes back is arbitrary).
    """
    if not ids:
        return []
    depth = min(CHECK_DEPTH, collection.count())
    if depth == 0:
        return list(range(len(ids)))
    found = collection.query(query_embeddings=list(vectors), n_results=depth, include=["distances"])
    rows = zip(ids, found["ids"], found["distances"], strict=True)
    return [
        index
        for index, (wanted, hits, distances) in enumerate(rows)
        if wanted not in hits and not (len(hits) == depth and distances[-1] <= TIE)
    ]


def _select(payload: dict[str, list[Any]], positions: Sequence[int]) -> dict[str, list[Any]]:
    return {name: [column[i] for i in positions] for name, column in payload.items()}


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


def _metadata(record: MemoryRecord) -> dict[str, str | float]:
    result = record.result
    return {
        "key": record.key,
        "image_hash": result.image_hash,
        "model_id": result.model_id,
        "mode": result.mode,
        "created_at": result.created_at.timestamp(),
        "result": result.model_dump_json(),
        **({"image_name": record.image_name} if record.image_name is not None else {}),
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
            image_name=meta.get("image_name"),
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


__all__ = ["DEFAULT_COLLECTION", "VisualQAMemory", "default_path"]
