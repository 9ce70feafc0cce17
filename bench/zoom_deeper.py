"""dualfocus_answer(zoom_deeper=True): calibrate the deeper-zoom threshold, then measure what it changes.

    OMP_NUM_THREADS=1 python bench/zoom_deeper.py [--n 150] [--calibration-n 150] [--size 1280]

Scenes are FocusShapes rendered large (`--size` px canvas, 4-8 objects of the usual sizes), so one zoom
from the model's low-resolution view of the whole image gives a crop that may still be too coarse.
Every question runs once through the toolbox with the threshold at -inf (always go deeper), which
records the first micro answer's mean NLL, the deeper answer and whether it would be chosen (its mean
NLL lower); the accuracy at any threshold follows from that one run. The threshold is the one that
maximises accuracy on the calibration questions (`--calibration-seed`); the evaluation questions
(`--seed`) report accuracy without and with the deeper zoom at that threshold, per question type, and
how often it fires and replaces the answer. The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

from df_agent.agents.inputs import PipelineInput
from df_agent.agents.operations import Toolbox
from df_agent.data.focusshapes import generate
from df_agent.engine import DualFocus
from df_agent.eval.items import normalize_answer

QUESTION_TYPES = ("detail", "global", "exist")


def run(toolbox: Toolbox, seed: int, n: int, size: int) -> list[dict]:
    """Each question's answers, always going deeper: the rows the thresholds are judged on."""
    scenes, records = generate(seed, math.ceil(n / 3), size=size, n_objects=(4, 8))
    ids = {}
    for scene in scenes:
        ids[f"images/{scene.id}.png"] = toolbox.registry.register(scene.image, scene.id)
    rows = []
    for record in records[:n]:
        answer = toolbox.dualfocus_answer(
            PipelineInput(image=ids[record.image], question=record.question, zoom_deeper=True)
        )
        deeper = answer.deeper
        rows.append(
            {
                "qtype": record.qtype,
                "base": _right(answer.result.answer, record.answer),
                "deeper": _right(deeper.answer, record.answer) if deeper.answer is not None else None,
                "micro_nll": deeper.micro_nll,
                "chosen": deeper.chosen,
            }
        )
    return rows


def _right(answer: str | None, expected: str) -> bool:
    return answer is not None and normalize_answer(answer) == normalize_answer(expected)


def at(rows: list[dict], threshold: float) -> dict:
    """Accuracy (overall, per type), fire rate and replacement rate with the deeper zoom at `threshold`."""

    def fires(r: dict) -> bool:
        return r["micro_nll"] is not None and r["micro_nll"] > threshold

    def final(r: dict) -> bool:
        return r["deeper"] if fires(r) and r["chosen"] else r["base"]

    table = {"all": round(sum(map(final, rows)) / len(rows), 4)}
    for qtype in QUESTION_TYPES:
        typed = [r for r in rows if r["qtype"] == qtype]
        if typed:
            table[qtype] = round(sum(map(final, typed)) / len(typed), 4)
    return {
        "accuracy": table,
        "fires": round(sum(map(fires, rows)) / len(rows), 4),
        "replaced": round(sum(fires(r) and r["chosen"] for r in rows) / len(rows), 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=150)
    parser.add_argument("--seed", type=int, default=19)
    parser.add_argument("--calibration-n", type=int, default=150)
    parser.add_argument("--calibration-seed", type=int, default=1019)
    parser.add_argument("--size", type=int, default=1280)
    parser.add_argument("--model", help="checkpoint folder (default: the shipped model)")
    args = parser.parse_args(argv)

    toolbox = Toolbox(DualFocus.from_pretrained(args.model, device="cpu"), deeper_threshold=-math.inf)
    start = time.perf_counter()
    calibration = run(toolbox, args.calibration_seed, args.calibration_n, args.size)
    candidates = sorted({r["micro_nll"] for r in calibration if r["micro_nll"] is not None} | {math.inf})
    candidates = [-math.inf, *candidates]
    best = max(candidates, key=lambda t: (at(calibration, t)["accuracy"]["all"], t))
    evaluation = run(toolbox, args.seed, args.n, args.size)
    seconds = time.perf_counter() - start
    figures = {
        "size": args.size,
        "n": len(evaluation),
        "threshold": best,
        "without": at(evaluation, math.inf),
        "with": at(evaluation, best),
        "always": at(evaluation, -math.inf),
        "calibration": {
            "n": len(calibration),
            "without": at(calibration, math.inf),
            "with": at(calibration, best),
        },
        "curve": {f"{t:.3f}": at(evaluation, t)["accuracy"]["all"] for t in (0.05, 0.1, 0.2, 0.3, 0.5, 1.0)},
        "seconds": round(seconds, 1),
    }
    for name in ("without", "with", "always"):
        print(f"{name:8s} {figures[name]}", file=sys.stderr)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
