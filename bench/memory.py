"""Memory benchmark: recall latency and quality at 1k, 10k and 100k records, and what logging adds to `ask`.

    OMP_NUM_THREADS=1 python bench/memory.py [--sizes 1000 10000 100000] [--queries 200]
        [--quality-queries 1000] [--asks 40]

Part 1 bulk-loads synthetic records into an embedded memory with the deterministic
`HashingEmbedder` (384 dimensions, like all-MiniLM-L6-v2, so the index does the same work; the
real model would spend ~5 ms per record embedding 100k records). At each size it times
`recall` (store query plus the hashing embedder's negligible query embedding), `recall` kept to
one image, and `lookup` (the exact-repeat check every `ask` makes). The default embedder's query
embedding is timed on its own: a recall with it costs the two added. It then measures recall
quality: recall@5 of `recall` (Chroma's HNSW index) against exact search (brute-force cosine over
every stored vector, with numpy) for `--quality-queries` new questions; a result tied with the
fifth exact neighbour (same distance within 1e-6) counts as a hit. It also reports how long the
store took to load and `check` (every record searched for with its own vector).

Part 2 times `ask` on the shipped model (df_agent/model/) with and without a memory that uses the
default embedder, alternating the two so that machine load hits both alike. Without the shipped
model it uses a tiny random LLaVA from tests/tiny_models.py and says so.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

from PIL import Image, ImageDraw

from df_agent.memory import MemoryRecord, VisualQAMemory
from df_agent.memory.embeddings import HashingEmbedder, HFEmbedder
from df_agent.results import FocusResult

ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "red", "green", "blue", "yellow", "black", "white", "small", "large", "round", "square",
    "wooden", "metal", "old", "new", "bright", "dark", "cat", "dog", "bird", "horse",
    "car", "bus", "bike", "boat", "tree", "flower", "house", "door", "window", "table",
    "chair", "lamp", "clock", "book", "cup", "plate", "apple", "bread", "sign", "letter",
    "number", "kite", "ball", "hat", "shoe", "bag", "phone", "screen", "road", "river",
    "hill", "sky", "left", "right", "top", "bottom",
)  # fmt: skip
IMAGES = 1000
KEY = ("bench", "dualfocus")  # model id and mode of the synthetic records


def synthetic(index: int) -> FocusResult:
    """The `index`-th synthetic answer: varied question words, one of `IMAGES` images."""
    digest = hashlib.sha256(str(index).encode()).digest()
    words = [WORDS[b % len(WORDS)] for b in digest[:7]]
    return FocusResult(
        question=f"what is the {words[0]} {words[1]} near the {words[2]} {words[3]} doing?",
        image_hash=hashlib.sha256(str(index % IMAGES).encode()).hexdigest(),
        image_size=(640, 480),
        model_id="bench",
        mode="dualfocus",
        answer=f"{words[4]} {words[5]} {words[6]}",
        path="macro",
        macro_answer=f"{words[4]} {words[5]}",
        micro_answer=f"{words[4]} {words[5]} {words[6]}",
        scores={"macro": 1.2, "micro": 0.8},
        arbitration="official",
        created_at=datetime(2025, 1, 1, tzinfo=UTC) + timedelta(seconds=index),
    )


def percentiles(samples: list[float] | list[tuple[float, float]]) -> str:
    """p50 and p95 of wall-clock seconds; with (wall, cpu) pairs, the CPU-time p50 too."""
    walls = sorted(s[0] if isinstance(s, tuple) else s for s in samples)
    p50 = statistics.median(walls) * 1000
    p95 = walls[min(len(walls) - 1, round(0.95 * (len(walls) - 1)))] * 1000
    text = f"p50 {p50:7.2f} ms   p95 {p95:7.2f} ms"
    if isinstance(samples[0], tuple):
        text += f"   (CPU time p50 {statistics.median(s[1] for s in samples) * 1000:6.2f} ms)"  # type: ignore[index]
    return text


def timed(call, repeats: int) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of each call; CPU time counts every thread of this process."""
    out = []
    for index in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        call(index)
        out.append((time.perf_counter() - start, time.process_time() - cpu))
    return out


def bench_recall(sizes: list[int], queries: int, quality: int, folder: Path) -> None:
    print("== recall latency (embedded Chroma, HashingEmbedder(384) for bulk load and queries) ==")
    memory = VisualQAMemory(folder / "recall", embedder=HashingEmbedder(384))
    loaded = 0
    for size in sorted(sizes):
        start = time.perf_counter()
        memory.import_records(MemoryRecord.from_result(synthetic(i)) for i in range(loaded, size))
        took = time.perf_counter() - start
        rate = (size - loaded) / took
        print(f"-- {size:>7,} records (loaded {size - loaded:,} in {took:.1f} s, {rate:.0f} records/s)")
        loaded = size
        # Measured in a new process that opens the store, as an agent would.
        command = [
            sys.executable, __file__, "--measure", str(folder / "recall"), str(size), str(queries),
            str(quality),
        ]  # fmt: skip
        subprocess.run(command, check=True)
    memory.close()
    embedder = HFEmbedder()
    embedder.embed(["warm up"])
    texts = [synthetic(i).question for i in range(queries)]
    print("-- query embedding, default embedder (all-MiniLM-L6-v2, CPU, one text):")
    print("   embed                 ", percentiles(timed(lambda i: embedder.embed([texts[i]]), queries)))


def query_text(index: int) -> str:
    """A question in the records' words that no record asks (a new seed)."""
    digest = hashlib.sha256(f"query {index}".encode()).digest()
    words = [WORDS[b % len(WORDS)] for b in digest[:5]]
    return f"is the {words[0]} {words[1]} by the {words[2]} {words[3]} {words[4]}?"


def recall_quality(memory: VisualQAMemory, queries: int, k: int = 5) -> None:
    """recall@k of `memory.recall` against brute-force cosine search over the stored vectors."""
    import numpy as np

    collection = memory._call(lambda c: c)  # the bench reads the raw vectors; users never need to
    start = time.perf_counter()
    ids, rows = [], []
    for offset in range(0, collection.count(), 5000):
        page = collection.get(limit=5000, offset=offset, include=["embeddings"])
        ids += page["ids"]
        rows.append(np.asarray(page["embeddings"], dtype=np.float32))
    matrix = np.concatenate(rows)
    matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
    read = time.perf_counter() - start
    embedder = memory._get_embedder()
    texts = [query_text(i) for i in range(queries)]
    vectors = np.asarray(embedder.embed(texts), dtype=np.float32)
    exact = 1.0 - vectors @ matrix.T  # cosine distances, queries x records
    position = {found: i for i, found in enumerate(ids)}
    hits, walls = 0, []
    for row, text in enumerate(texts):
        began = time.perf_counter()
        found = memory.recall(text, k=k)
        walls.append(time.perf_counter() - began)
        kth = np.partition(exact[row], k - 1)[k - 1]
        hits += sum(exact[row, position[f.record.id]] <= kth + 1e-6 for f in found)
    print(
        f"   recall@{k} vs exact     {hits / (k * queries):.4f} over {queries} new queries "
        f"(exact search over {len(ids):,} vectors read in {read:.1f} s)"
    )
    print(f"   recall k={k} (same run) ", percentiles(walls))


def measure(store: str, size: int, queries: int, quality: int = 0) -> None:
    """Time recall and lookup on an existing store of `size` synthetic records; then recall@5."""
    memory = VisualQAMemory(store)
    probes = [synthetic((i * 7919) % size) for i in range(queries)]
    memory.recall(probes[0].question)  # warm
    for name, call in [
        ("recall k=5", lambda i: memory.recall(probes[i].question)),
        ("recall, one image", lambda i: memory.recall(probes[i].question, image=probes[i].image_hash)),
        ("lookup (repeat)", lambda i: memory.lookup(probes[i].image_hash, probes[i].question, *KEY)),
    ]:
        print(f"   {name:<22}", percentiles(timed(call, queries)), flush=True)
    if quality:
        recall_quality(memory, quality)
        report = memory.check()
        print(f"   check                  {report.summary()}", flush=True)
    memory.close()


def tiny_engine(folder: Path):
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import tiny_llava

    from df_agent.backends.hf import HFBackend
    from df_agent.engine import DualFocus

    backend = HFBackend.from_pretrained(tiny_llava(folder / "tiny-llava"), device="cpu")
    return DualFocus(backend, max_new_tokens=16)


class Timed:
    """Wraps a memory and records how long `lookup` and `log` take inside `ask`."""

    def __init__(self, memory: VisualQAMemory) -> None:
        self.memory = memory
        self.lookups: list[float] = []
        self.logs: list[float] = []

    def lookup(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.memory.lookup(*args, **kwargs)
        finally:
            self.lookups.append(time.perf_counter() - start)

    def log(self, result):
        start = time.perf_counter()
        try:
            return self.memory.log(result)
        finally:
            self.logs.append(time.perf_counter() - start)


def bench_ask(asks: int, folder: Path, batch_delay: float | None) -> None:
    """Plain asks, asks with a memory, plain asks again: wall-clock and the process's CPU time."""
    from df_agent.backends.hf import shipped_model_path
    from df_agent.engine import DualFocus

    try:
        engine = DualFocus.from_pretrained(shipped_model_path(), device="cpu")
        print(f"== logging cost per ask: the shipped model ({shipped_model_path()}) ==")
    except FileNotFoundError:
        engine = tiny_engine(folder)
        print("== logging cost per ask: NO shipped model yet; a tiny random LLaVA, max_new_tokens=16 ==")
    options = {} if batch_delay is None else {"batch_delay": batch_delay}
    memory = VisualQAMemory(folder / "ask", embedder=HFEmbedder(), **options)
    print(f"   (memory: default embedder, batch_delay={memory.batch_delay} s, {asks} asks per phase)")
    timed_memory = Timed(memory)
    engine.memory = timed_memory
    image = Image.new("RGB", (320, 240), (235, 235, 230))
    ImageDraw.Draw(image).rectangle((80, 60, 160, 120), fill=(220, 30, 30))
    engine.ask(image, "What colour is the square? warm-up")
    memory.flush()
    timed_memory.lookups.clear()
    timed_memory.logs.clear()
    questions = [f"What colour is the square number {i}?" for i in range(asks)]

    def phase(use_memory: bool) -> tuple[list[float], float]:
        cpu = time.process_time()
        ask = partial(engine.ask, image, use_memory=use_memory)
        walls = [wall for wall, _ in timed(lambda i: ask(questions[i]), asks)]
        if use_memory:
            memory.flush()  # the background writer's work belongs to these asks
        return walls, time.process_time() - cpu

    plain, plain_cpu = phase(False)
    remembered, remembered_cpu = phase(True)  # all misses: the plain asks logged nothing
    plain_again, plain_again_cpu = phase(False)
    lookups, logs = list(timed_memory.lookups), list(timed_memory.logs)
    repeat = [wall for wall, _ in timed(lambda i: engine.ask(image, questions[i]), asks)]  # all hits
    memory.close()
    base_cpu = (plain_cpu + plain_again_cpu) / 2 / asks
    base = statistics.median(plain + plain_again)
    in_call = statistics.median(lookups) + statistics.median(logs)
    print("   ask, no memory        ", percentiles(plain + plain_again))
    print("   ask, with memory      ", percentiles(remembered))
    print("     of which lookup     ", percentiles(lookups))
    print("     of which log        ", percentiles(logs))
    print("   exact repeat (cached) ", percentiles(repeat))
    print(f"   in the ask's own path (lookup + log, p50): {in_call * 1000:.2f} ms = {in_call / base:.1%}")
    with_cpu = remembered_cpu / asks
    print(
        f"   CPU time per ask: {base_cpu * 1000:.1f} ms without memory, {with_cpu * 1000:.1f} ms with it "
        f"(its background embedding and writes included): {with_cpu / base_cpu - 1:+.1%}"
    )
    wall = statistics.median(remembered) / base - 1
    print(f"   wall-clock p50 difference: {wall:+.1%} (noisy on a shared machine)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--queries", type=int, default=200, help="queries per latency figure")
    parser.add_argument(
        "--quality-queries", type=int, default=1000, help="new queries for recall@5 against exact search"
    )
    parser.add_argument("--asks", type=int, default=40)
    parser.add_argument("--batch-delay", type=float, help="the memory's batch_delay (default: its default)")
    parser.add_argument("--skip-recall", action="store_true")
    parser.add_argument("--skip-ask", action="store_true")
    parser.add_argument(
        "--measure", nargs=4, metavar=("STORE", "SIZE", "QUERIES", "QUALITY"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.measure:
        measure(args.measure[0], int(args.measure[1]), int(args.measure[2]), int(args.measure[3]))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"machine: {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    with tempfile.TemporaryDirectory(prefix="df-agent-bench-") as tmp:
        if not args.skip_recall:
            bench_recall(args.sizes, args.queries, args.quality_queries, Path(tmp))
        if not args.skip_ask:
            bench_ask(args.asks, Path(tmp), args.batch_delay)


if __name__ == "__main__":
    main()
