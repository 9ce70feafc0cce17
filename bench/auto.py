"""mode="auto": calibrate its threshold on FocusShapes, then measure what skipping the zoom saves and costs.

    OMP_NUM_THREADS=1 python bench/auto.py [--n 300] [--calibration-n 300] [--model PATH]

1. Calibration, on `--calibration-n` questions of `--calibration-seed`: one ``ask(mode="auto")``
   with the threshold at -inf (never skip) gives the macro answer, its own mean NLL and the DualFocus
   answer; `calibrate_auto_threshold` picks the threshold that skips the most zooms while losing at
   most `--max-loss` accuracy on these questions.
2. Evaluation, on `--n` other questions (`--seed`): macro-only, DualFocus and auto with
   that threshold, interleaved; accuracy (exact match after normalisation) overall and per question
   type, how often auto skipped the zoom, median seconds per question, and (``curve``) the skip
   rate and accuracy auto would have had at other thresholds on the same questions.

The model is the shipped one (df_agent/model/) unless `--model` names another checkpoint. The last
line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from df_agent.backends.hf import HFBackend, shipped_model_path
from df_agent.calibration import calibrate_auto_threshold
from df_agent.data.focusshapes import generate
from df_agent.engine import DualFocus
from df_agent.eval.items import normalize_answer

QUESTION_TYPES = ("detail", "global", "exist")


def questions(seed: int, n: int) -> list[tuple]:
    """The first `n` FocusShapes questions of `seed`: (image, question, answer, qtype)."""
    scenes, records = generate(seed, math.ceil(n / 3))
    images = {f"images/{scene.id}.png": scene.image for scene in scenes}
    return [(images[r.image], r.question, r.answer, r.qtype) for r in records[:n]]


def right(answer: str, expected: str) -> bool:
    """Exact match after normalisation (case, punctuation, spaces)."""
    return normalize_answer(answer) == normalize_answer(expected)


def accuracy(rows: list[dict], key: str) -> dict[str, float]:
    """Accuracy of `key` overall and per question type."""
    table = {"all": sum(r[key] for r in rows) / len(rows)}
    for qtype in QUESTION_TYPES:
        typed = [r[key] for r in rows if r["qtype"] == qtype]
        if typed:
            table[qtype] = round(sum(typed) / len(typed), 4)
    table["all"] = round(table["all"], 4)
    return table


def curve(rows: list[dict]) -> list[dict[str, float]]:
    """Skip rate and accuracy of auto at other thresholds (never, NLL quartiles, always), same questions."""
    nlls = sorted(r["nll"] for r in rows)
    points = [-math.inf, *(nlls[int(q * (len(nlls) - 1))] for q in (0.25, 0.5, 0.75)), math.inf]
    table = []
    for threshold in points:
        skipped = [r["nll"] <= threshold for r in rows]
        right = [r["macro"] if s else r["dualfocus"] for r, s in zip(rows, skipped, strict=True)]
        table.append(
            {
                "threshold": round(threshold, 4) if math.isfinite(threshold) else str(threshold),
                "skip_rate": round(sum(skipped) / len(rows), 4),
                "accuracy": round(sum(right) / len(rows), 4),
            }
        )
    return table


def main(argv: list[str] | None = None) -> int:
    """Calibrate, evaluate, print the figures."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=300, help="evaluation questions (default 300)")
    parser.add_argument("--seed", type=int, default=2025, help="evaluation seed (default 2025)")
    parser.add_argument("--calibration-n", type=int, default=300, help="calibration questions (default 300)")
    parser.add_argument("--calibration-seed", type=int, default=1999, help="calibration seed (default 1999)")
    parser.add_argument("--max-loss", type=float, default=0.0, help="accuracy auto may lose (default 0)")
    parser.add_argument("--model", default=None, help="checkpoint folder or hub id (default: shipped model)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when present)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.n < 1 or args.calibration_n < 1:
        parser.error("--n and --calibration-n must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model or shipped_model_path()
    backend = HFBackend.from_pretrained(model, device=args.device)
    plain = DualFocus(backend, session=False)

    never = DualFocus(backend, auto_threshold=-math.inf)
    nll, macro_right, full_right = [], [], []
    for image, question, answer, _ in questions(args.calibration_seed, args.calibration_n):
        result = never.ask(image, question, mode="auto")
        nll.append(result.macro_nll)
        macro_right.append(right(result.macro_answer, answer))
        full_right.append(right(result.answer, answer))
    calibration = calibrate_auto_threshold(nll, macro_right, full_right, max_accuracy_loss=args.max_loss)
    print(f"calibrated on {args.calibration_n} questions: {calibration}", file=sys.stderr)

    auto = DualFocus(backend, auto_threshold=calibration.threshold)
    runs = {
        "macro": lambda image, q: plain.ask(image, q, mode="macro"),
        "dualfocus": lambda image, q: auto.ask(image, q),
        "auto": lambda image, q: auto.ask(image, q, mode="auto"),
    }
    rows, seconds = [], {name: [] for name in runs}
    for index, (image, question, answer, qtype) in enumerate(questions(args.seed, args.n)):
        row = {"qtype": qtype}
        for name in list(runs)[index % 3 :] + list(runs)[: index % 3]:
            began = time.perf_counter()
            result = runs[name](image, question)
            seconds[name].append(time.perf_counter() - began)
            row[name] = right(result.answer, answer)
            if name == "auto":
                row["nll"] = result.macro_nll
                row["skipped"] = result.macro_nll is not None and result.macro_nll <= auto.auto_threshold
        rows.append(row)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    table = {name: accuracy(rows, name) for name in runs}
    figures = {
        "n": args.n,
        "threshold": calibration.threshold
        if math.isfinite(calibration.threshold)
        else str(calibration.threshold),
        "calibration": {
            "n": calibration.n,
            "skip_rate": round(calibration.skip_rate, 4),
            "accuracy_auto": round(calibration.accuracy, 4),
            "accuracy_dualfocus": round(calibration.dualfocus_accuracy, 4),
            "accuracy_macro": round(calibration.macro_accuracy, 4),
        },
        "skip_rate": round(sum(r["skipped"] for r in rows) / len(rows), 4),
        "skip_rate_by_type": {
            qtype: round(sum(r["skipped"] for r in typed) / len(typed), 4)
            for qtype in QUESTION_TYPES
            if (typed := [r for r in rows if r["qtype"] == qtype])
        },
        "accuracy": table,
        "auto_cost": round(table["dualfocus"]["all"] - table["auto"]["all"], 4),
        "curve": curve(rows),
        "macro_s": round(medians["macro"], 5),
        "dualfocus_s": round(medians["dualfocus"], 5),
        "auto_s": round(medians["auto"], 5),
        "mean_s": {name: round(statistics.fmean(values), 5) for name, values in seconds.items()},
        "auto_over_dualfocus": round(
            statistics.fmean(seconds["auto"]) / statistics.fmean(seconds["dualfocus"]), 4
        ),
        "model": str(model),
        "device": str(backend.device),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "seed": args.seed,
        "calibration_seed": args.calibration_seed,
    }
    print(f"auto (threshold {calibration.threshold:.4g}) on {args.n} FocusShapes questions:")
    print(f"  skipped the zoom on {figures['skip_rate']:.1%} of questions")
    for name in runs:
        print(f"  {name:<9} accuracy {table[name]['all']:.3f}   median {medians[name] * 1000:7.1f} ms")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
