"""Latency of DualFocus per question: macro-only, plain DualFocus and fast DualFocus, interleaved.

    OMP_NUM_THREADS=1 python bench/latency.py [--n 200] [--seed 2024] [--model PATH] [--device cpu|cuda]

For each of N FocusShapes questions (fresh scenes of `--seed`, three questions per scene) it runs, in
a rotating order so that machine load hits all three alike: the plain path with ``mode="macro"``
(one answer from the whole image), the plain path (``DualFocus(backend, session=False)``: the official
order, one generation per request, nothing reused) and the fast path (``DualFocus(backend)``: one
backend session per question), both with ``mode="dualfocus"``. It prints the median seconds of
each, the ratios fast/plain and fast/macro, and whether plain and fast gave identical results
(answers, boxes, paths, and scores within 1e-4). On a shared machine the process CPU time of each
run (``cpu_s``) helps too: it counts this process's work, not the time it waited for a core.
The model is the shipped one (df_agent/model/) unless `--model` names another checkpoint.
The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from df_agent.backends.hf import HFBackend, shipped_model_path
from df_agent.data.focusshapes import generate
from df_agent.engine import DualFocus
from df_agent.results import result_differences

WARMUP = 3


def questions(seed: int, n: int) -> list[tuple]:
    """The first `n` FocusShapes questions of `seed`: (image, question, qtype)."""
    scenes, records = generate(seed, math.ceil(n / 3))
    images = {f"images/{scene.id}.png": scene.image for scene in scenes}
    return [(images[r.image], r.question, r.qtype) for r in records[:n]]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0 when plain and fast agreed on every question, else 1."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=200, help="questions timed (default 200)")
    parser.add_argument("--seed", type=int, default=2024, help="FocusShapes seed (default 2024)")
    parser.add_argument("--model", default=None, help="checkpoint folder or hub id (default: shipped model)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when present)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 (default: bf16 cuda, fp32 cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model or shipped_model_path()
    backend = HFBackend.from_pretrained(model, device=args.device, dtype=args.dtype)
    plain, fast = DualFocus(backend, session=False), DualFocus(backend)
    runs = {
        "macro": lambda image, q: plain.ask(image, q, mode="macro"),
        "plain": lambda image, q: plain.ask(image, q),
        "fast": lambda image, q: fast.ask(image, q),
    }
    items = questions(args.seed, args.n + WARMUP)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in runs}
    mismatches, votes, boxes = [], 0, 0
    start = time.perf_counter()
    for index, (image, question, _) in enumerate(items):
        order = list(runs)[index % 3 :] + list(runs)[: index % 3]
        results = {}
        for name in order:
            began, began_cpu = time.perf_counter(), time.process_time()
            results[name] = runs[name](image, question)
            if index >= WARMUP:
                seconds[name].append(time.perf_counter() - began)
                cpu_seconds[name].append(time.process_time() - began_cpu)
        if index < WARMUP:
            continue
        differences = result_differences(results["plain"], results["fast"])
        if differences:
            mismatches.append({"question": question, "index": index - WARMUP, "differences": differences})
        votes += results["plain"].scores is not None
        boxes += results["plain"].box is not None
        if (index - WARMUP + 1) % 25 == 0:
            elapsed = time.perf_counter() - start
            print(f"{index - WARMUP + 1}/{args.n} questions, {elapsed:.0f} s", file=sys.stderr)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    cpu = {name: statistics.median(values) for name, values in cpu_seconds.items()}
    figures = {
        "n": args.n,
        "macro_s": round(medians["macro"], 5),
        "plain_s": round(medians["plain"], 5),
        "fast_s": round(medians["fast"], 5),
        "fast_over_plain": round(medians["fast"] / medians["plain"], 4),
        "fast_over_macro": round(medians["fast"] / medians["macro"], 4),
        "identical": not mismatches,
        "cpu_s": {name: round(value, 5) for name, value in cpu.items()},
        "cpu_fast_over_plain": round(cpu["fast"] / cpu["plain"], 4),
        "cpu_fast_over_macro": round(cpu["fast"] / cpu["macro"], 4),
        "mismatches": len(mismatches),
        "with_box": boxes,
        "with_vote": votes,
        "fast_path": backend.abilities.session,
        "model": str(model),
        "device": str(backend.device),
        "dtype": str(backend.model.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "seed": args.seed,
    }
    for mismatch in mismatches[:5]:
        print("MISMATCH", json.dumps(mismatch), file=sys.stderr)
    print(f"median seconds per question over {args.n} FocusShapes questions on {figures['device']}:")
    for name in runs:
        print(f"  {name:<6} {medians[name] * 1000:8.1f} ms")
    print(f"  fast/plain {figures['fast_over_plain']:.3f}   fast/macro {figures['fast_over_macro']:.3f}")
    print(f"  plain and fast identical on all {args.n} questions: {figures['identical']}")
    print(json.dumps(figures))
    return 0 if figures["identical"] else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
