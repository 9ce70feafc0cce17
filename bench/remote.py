"""Latency of DualFocus over the network: a remote model with a simulated round trip.

    OMP_NUM_THREADS=1 python bench/remote.py [--n 30] [--delay 0.2] [--seed 2024] [--one-at-a-time]

The project's OpenAI-compatible test server (tests/openai_server.py, backed by the shipped model)
runs on 127.0.0.1 with `--delay` seconds slept before every answer: a network round trip. For each
profile (hosted-like: generation log-probabilities only; vLLM-like: prompt log-probabilities too)
and each client (`OpenAIBackend`; `ChatModelBackend` over langchain-openai's ChatOpenAI for the
hosted-like profile), every question is asked with ``mode="macro"`` (one request) and with
``mode="dualfocus"``, interleaved, and the medians are compared. The floor is the number of
sequential round trips: hosted-like 2 (macro answer and box request together, then the micro
answer; the vote reads the generations' log-probabilities), vLLM-like 3 (plus one round of scoring
requests sent together). Goals: hosted-like at most 2.2x macro-only, vLLM-like at most 3.2x.
The server batches as vLLM and hosted APIs do (``batching=True``: requests that arrive together
are decoded in the same forward passes, computed prefixes are kept between requests); its model
time still adds to the round trips. ``floor_ratio`` is (round trips x delay + the server's model
seconds per question: 2 round trips, 3 where the backend scored a vote) over (delay + the macro
request's model seconds), the best any client could do against this server; the gap between
``ratio`` and ``floor_ratio`` is the client's and the transport's overhead. ``--one-at-a-time``
serves one request after another instead (no batching, no prefix cache): the floor rises by the
model's extra seconds.
The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from openai_server import OpenAITestServer

from df_agent.backends.hf import HFBackend, shipped_model_path
from df_agent.backends.openai import OpenAIBackend
from df_agent.data.focusshapes import generate
from df_agent.engine import DualFocus

GOALS = {"hosted": 2.2, "vllm": 3.2}
WARMUP = 2


def questions(seed: int, n: int) -> list[tuple]:
    """The first `n` FocusShapes questions of `seed`: (image, question)."""
    scenes, records = generate(seed, math.ceil(n / 3))
    images = {f"images/{scene.id}.png": scene.image for scene in scenes}
    return [(images[r.image], r.question) for r in records[:n]]


def client(kind: str, server: OpenAITestServer, profile: str):
    """The backend of one configuration: OpenAIBackend, or ChatModelBackend over ChatOpenAI."""
    if kind == "openai":
        return OpenAIBackend(server.url, "df-test", api_key="", capabilities=profile)
    from langchain_openai import ChatOpenAI

    from df_agent.backends.chat_model import ChatModelBackend

    llm = ChatOpenAI(model="df-test", base_url=server.url, api_key="sk-local", temperature=0, logprobs=True)
    return ChatModelBackend(llm)


def measure(
    backend: HFBackend, profile: str, kind: str, jobs: list[tuple], delay: float, batching: bool
) -> dict:
    """Median seconds of macro-only and DualFocus, and requests per question, for one configuration."""
    with OpenAITestServer(backend, profile=profile, delay=delay, batching=batching) as server:
        engine = DualFocus(client(kind, server, profile))
        for image, question in jobs[:WARMUP]:
            engine.ask(image, question)
        macro, dualfocus, requests, votes = [], [], [], {}
        busy: dict[str, list[float]] = {"macro": [], "dualfocus": []}
        round_trips: list[int] = []
        batched = 0
        for k, (image, question) in enumerate(jobs):
            order = ("macro", "dualfocus") if k % 2 == 0 else ("dualfocus", "macro")
            for mode in order:
                server.reset()
                start = time.perf_counter()
                result = engine.ask(image, question, mode=mode)
                seconds = time.perf_counter() - start
                busy[mode].append(server.busy_s)
                if mode == "macro":
                    macro.append(seconds)
                else:
                    dualfocus.append(seconds)
                    requests.append(len(server.records))
                    batched += server.largest_batch > 1
                    round_trips.append(2 + (result.scores is not None))  # scoring: one more
                    vote = result.vote or "none (" + (result.fallback or "?").split(";")[0] + ")"
                    votes[vote] = votes.get(vote, 0) + 1
    m, d = statistics.median(macro), statistics.median(dualfocus)
    # the floor: the sequential round trips plus the model's own work on the server, nothing else
    best = [trips * delay + seconds for trips, seconds in zip(round_trips, busy["dualfocus"], strict=True)]
    floor = statistics.median(best) / (delay + statistics.median(busy["macro"]))
    return {
        "profile": profile,
        "client": kind,
        "macro_s": round(m, 4),
        "dualfocus_s": round(d, 4),
        "ratio": round(d / m, 3),
        "goal": GOALS[profile],
        "met": d / m <= GOALS[profile],
        "floor_ratio": round(floor, 3),
        "server_model_s": {k: round(statistics.median(v), 4) for k, v in busy.items()},
        "requests_per_question": round(statistics.mean(requests), 2),
        "questions_with_generations_batched": batched,
        "votes": votes,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0 when every goal was met, else 1."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=30, help="questions timed per configuration (default 30)")
    parser.add_argument(
        "--delay", type=float, default=0.2, help="simulated round trip in seconds (default 0.2)"
    )
    parser.add_argument("--seed", type=int, default=2024, help="FocusShapes seed (default 2024)")
    parser.add_argument(
        "--one-at-a-time", action="store_true", help="a server that neither batches nor keeps prefixes"
    )
    args = parser.parse_args(argv)
    if args.n < 1 or args.delay < 0:
        parser.error("--n must be at least 1 and --delay at least 0")
    backend = HFBackend.from_pretrained(shipped_model_path(), device="cpu")
    jobs = questions(args.seed, args.n + WARMUP)
    jobs = jobs[WARMUP:] + jobs[:WARMUP]  # warm-up questions are not timed
    runs = []
    for profile, kind in (("hosted", "openai"), ("vllm", "openai"), ("hosted", "chat_model")):
        run = measure(backend, profile, kind, jobs[: args.n + WARMUP], args.delay, not args.one_at_a_time)
        runs.append(run)
        print(
            f"{profile:<7} {kind:<11} macro {run['macro_s']:.3f} s  dualfocus {run['dualfocus_s']:.3f} s  "
            f"ratio {run['ratio']:.3f} (goal <= {run['goal']}; floor {run['floor_ratio']:.3f})  "
            f"server model s {run['server_model_s']}  requests/question "
            f"{run['requests_per_question']}  votes {run['votes']}"
        )
    server = "one at a time" if args.one_at_a_time else "batching"
    print(json.dumps({"n": args.n, "delay_s": args.delay, "seed": args.seed, "server": server, "runs": runs}))
    return 0 if all(run["met"] for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
