"""The memory against a real `chroma run` server on a free loopback port, started by the test.

Each test starts its own server (about 2 s) and child processes, so all are marked slow.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from memory_worker import FAST_RETRY, WORKER, run_workers, worker_result

from df_agent.cli import main as cli_main
from df_agent.memory import MemoryBusyError, MemoryUnavailableError, VisualQAMemory
from df_agent.memory.embeddings import HashingEmbedder


def chroma_cli() -> str:
    """The `chroma` command installed with chromadb, next to this Python if it is there."""
    beside = Path(sys.executable).with_name("chroma")
    found = str(beside) if beside.is_file() else shutil.which("chroma")
    if found is None:
        pytest.skip("the chroma command (installed with chromadb) is not on this machine")
    return found


class ChromaServer:
    """`chroma run` on 127.0.0.1 with its data in `folder`; can be stopped and started again."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.log = folder.parent / "chroma.log"

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [
                    chroma_cli(),
                    "run",
                    "--path",
                    str(self.folder),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"chroma run exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/api/v2/heartbeat", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("chroma run did not answer within 60 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ChromaServer]:
    running = ChromaServer(tmp_path / "server-data")
    running.start()
    yield running
    running.stop()


@pytest.mark.slow
def test_server_logs_recalls_and_survives_a_restart(server: ChromaServer, tmp_path: Path, capsys) -> None:
    memory = VisualQAMemory(
        server.url, embedder=HashingEmbedder(), journal_dir=tmp_path / "journal", retry=FAST_RETRY
    )
    before = [memory.log(worker_result("up", i)) for i in range(5)]
    assert memory.count() == 5
    target = worker_result("up", 3)
    assert memory.recall(target.question, k=1)[0].record.id == before[3]

    server.stop()
    during = [memory.log(worker_result("down", i)) for i in range(5)]  # acknowledged: in the journal
    with pytest.raises(MemoryUnavailableError, match="safe in the journal"):
        memory.flush(timeout=1)
    with pytest.raises(MemoryUnavailableError, match="unreachable") as down:
        memory.count()
    assert not isinstance(down.value, MemoryBusyError)  # down, not busy
    assert memory.lookup(target.image_hash, target.question, "worker", "macro") is None  # a miss, no error

    server.start()
    assert memory.count() == 10
    stored = {record.id for record in memory.records()}
    assert set(before + during) == stored
    assert memory.lookup(target.image_hash, target.question, "worker", "macro").answer == target.answer
    memory.close()
    assert cli_main(["memory", "check", "--store", server.url]) == 0
    out = capsys.readouterr().out
    assert "10 records checked" in out and "10 reachable by search, 0 unreachable" in out


@pytest.mark.slow
def test_records_of_a_process_killed_while_the_server_was_down_are_replayed(
    server: ChromaServer, tmp_path: Path
) -> None:
    journal = tmp_path / "journal"
    server.stop()
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), server.url, str(journal), "lost", "20", "--then", "hang"],
        stdout=subprocess.PIPE,
        text=True,
    )
    acknowledged = []
    for line in proc.stdout:  # type: ignore[union-attr]
        if line.strip() == "hanging":
            break
        acknowledged.append(line.strip())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(acknowledged) == 20

    server.start()
    with VisualQAMemory(server.url, embedder=HashingEmbedder(64), journal_dir=journal) as memory:
        assert {record.id for record in memory.records()} == set(acknowledged)
        assert memory.check().unreachable == []
    assert not list(journal.glob("*.jsonl"))


@pytest.mark.slow
def test_two_processes_writing_through_one_server_lose_nothing(server: ChromaServer, tmp_path: Path) -> None:
    ids = run_workers(server.url, tmp_path / "journal", ["left", "right"], 100)
    assert len(ids) == 200
    with VisualQAMemory(server.url, embedder=HashingEmbedder(64), journal_dir=tmp_path / "reader") as memory:
        assert memory.count() == 200
        assert {record.id for record in memory.records()} == ids
