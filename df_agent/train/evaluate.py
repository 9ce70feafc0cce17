"""Held-out figures of a FocusShapes model through the engine and `HFBackend` (a training-time check).

``python -m df_agent.train.evaluate MODEL_DIR [--scenes 300] [--seed 987654]`` prints JSON:
macro accuracy per question type, region IoU and unparseable rate, micro accuracy through
the true crop and through the model's own crop, and DualFocus accuracy with the official
perplexity vote (both candidates scored in the micro context, worded with the
single-word hint). Every question is one `DualFocus.ask` on the fast path (plus one micro
answer through the true crop in the same backend session), so these are the engine's own
figures; `df_agent.eval` adds the benchmarks and the report.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch

from df_agent.backends.hf import HFBackend
from df_agent.boxes import Box
from df_agent.data.focusshapes import generate
from df_agent.engine import DualFocus

# The training check's budgets: answers are one word, and the crop has no minimum side (as trained).
ANSWER_TOKENS = 4


def evaluate(model: torch.nn.Module, processor: object, n_scenes: int = 300, seed: int = 987654) -> dict:
    """Figures on `n_scenes` fresh scenes (three questions each), through `DualFocus` over `HFBackend`."""
    scenes, records = generate(seed, n_scenes)
    images = {f"images/{s.id}.png": s.image for s in scenes}
    backend = HFBackend(model, processor, model_id="training-check")
    engine = DualFocus(backend, max_new_tokens=ANSWER_TOKENS, min_side=0)
    stats: dict = defaultdict(list)
    examples = []
    for r in records:
        image = images[r.image]
        with backend.session():
            result = engine.ask(image, r.question)
            true_box = Box(x1=r.box[0], y1=r.box[1], x2=r.box[2], y2=r.box[3])
            true_crop = engine.zoom(image, true_box).crop
            micro_true = engine.micro(image, true_crop, r.question, box_text=r.box_text())
        macro, micro_own, final = result.macro_answer, result.micro_answer, result.answer
        t = r.qtype
        stats[f"macro_{t}"].append(macro == r.answer)
        stats[f"micro_true_{t}"].append(micro_true == r.answer)
        stats[f"dualfocus_{t}"].append(final == r.answer)
        stats[f"oracle_{t}"].append(macro == r.answer or micro_own == r.answer)
        stats["dualfocus_all"].append(final == r.answer)
        stats["oracle_all"].append(macro == r.answer or micro_own == r.answer)
        stats["unparseable"].append(result.box is None)
        if t == "detail" or (t == "global" and "color" in r.question):
            stats[f"iou_{t}"].append(0.0 if result.box is None else result.box.iou(true_box))
        if len(examples) < 6:
            examples.append(
                {
                    "q": r.question,
                    "a": r.answer,
                    "macro": macro,
                    "box": result.box_text,
                    "true_box": r.box_text(),
                    "micro": micro_own,
                    "final": final,
                }
            )
    out = {k: round(sum(map(float, v)) / len(v), 3) for k, v in sorted(stats.items())}
    out["examples"] = examples
    return out


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    parser = argparse.ArgumentParser(prog="python -m df_agent.train.evaluate")
    parser.add_argument("model")
    parser.add_argument("--scenes", type=int, default=300)
    parser.add_argument("--seed", type=int, default=987654)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    processor = AutoProcessor.from_pretrained(args.model)
    model = AutoModelForImageTextToText.from_pretrained(args.model)
    print(json.dumps(evaluate(model, processor, args.scenes, args.seed), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["ANSWER_TOKENS", "evaluate"]
