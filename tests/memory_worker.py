"""A child process for the memory tests: logs answers, printing each id as soon as `log` returns.

    python tests/memory_worker.py STORE JOURNAL_DIR PREFIX COUNT [--then close|hang]

STORE is a folder or a Chroma server URL. With ``--then hang`` the process keeps running after
its last log (without closing the memory), so the test can kill it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

from df_agent.memory import RetryPolicy, VisualQAMemory
from df_agent.memory.embeddings import HashingEmbedder
from df_agent.results import FocusResult

WORKER = Path(__file__)
FAST_RETRY = RetryPolicy(attempts=2, initial=0.01, maximum=0.05, pause=0.1)


WORDS = (
    "red", "green", "blue", "yellow", "black", "white", "small", "large", "round", "square",
    "wooden", "metal", "old", "new", "bright", "dark", "cat", "dog", "bird", "horse",
    "car", "bus", "bike", "boat", "tree", "flower", "house", "door", "window", "table",
    "chair", "lamp", "clock", "book", "cup", "plate", "apple", "bread", "sign", "letter",
    "number", "kite", "ball", "hat", "shoe", "bag", "phone", "screen", "road", "river",
    "hill", "sky",
)  # fmt: skip


def worker_result(prefix: str, index: int) -> FocusResult:
    """The `index`-th answer of worker `prefix`: a question no other worker asks, in varied words."""
    digest = hashlib.sha256(f"{prefix}-{index}".encode()).digest()
    words = [WORDS[byte % len(WORDS)] for byte in digest[:6]]
    reply = f"{words[4]} {words[5]}"
    return FocusResult(
        question=f"what is on the {words[0]} {words[1]} near the {words[2]} {words[3]} ({prefix} {index})?",
        image_hash=hashlib.sha256(prefix.encode()).hexdigest(),
        image_size=(32, 32),
        model_id="worker",
        mode="macro",
        answer=reply,
        path="macro",
        macro_answer=reply,
    )


def run_workers(store: str | Path, journal: Path, prefixes: list[str], count: int) -> set[str]:
    """Run one worker process per prefix, all at once; the ids they acknowledged."""
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(store), str(journal), prefix, str(count)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for prefix in prefixes
    ]
    ids: set[str] = set()
    for proc in procs:
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, out
        lines = out.split()
        assert lines[-1] == "closed"
        ids.update(lines[:-1])
    return ids


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("journal")
    parser.add_argument("prefix")
    parser.add_argument("count", type=int)
    parser.add_argument("--then", choices=["close", "hang"], default="close")
    args = parser.parse_args()
    memory = VisualQAMemory(
        args.store, embedder=HashingEmbedder(64), journal_dir=args.journal, retry=FAST_RETRY
    )
    for index in range(args.count):
        print(memory.log(worker_result(args.prefix, index)), flush=True)
    if args.then == "hang":
        print("hanging", flush=True)
        time.sleep(600)
    memory.close(timeout=120)
    print("closed", flush=True)


if __name__ == "__main__":
    main()
