"""Held-out figures of a FocusShapes model, batched for speed (a training-time check).

``python -m df_agent.train.evaluate MODEL_DIR [--scenes 300] [--seed 987654]`` prints JSON:
macro accuracy per question type, region IoU and unparseable rate, micro accuracy through
the true crop and through the model's own crop, and DualFocus accuracy with the official
perplexity vote (both candidates scored in the micro context, worded with the
single-word hint). The engine's own evaluation (`df_agent.eval`) is the reference; this
one exists so training can be measured without it.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict

import torch

from df_agent.backends.base import Conversation
from df_agent.data.focusshapes import generate
from df_agent.train.lm import BOX_REQUEST, COMBINE_REQUEST, VOTE_REQUEST
from df_agent.train.vision import crop_region


def parse_box(text: str, size) -> tuple[float, float, float, float] | None:
    """First four numbers of a reply as fractions -> pixel box, or None."""
    nums = [float(v) for v in re.findall(r"\d+(?:\.\d+)?", text)[:4]]
    if len(nums) < 4:
        return None
    w, h = size
    x1, y1, x2, y2 = nums
    x1, x2 = sorted((x1 * w, x2 * w))
    y1, y2 = sorted((y1 * h, y2 * h))
    if x2 - x1 < 1 or y2 - y1 < 1:
        return None
    return (x1, y1, x2, y2)


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class Runner:
    """Batched greedy generation and scoring with a processor + model."""

    def __init__(self, model, processor, batch_size: int = 32):
        self.model, self.processor, self.batch_size = model.eval(), processor, batch_size
        self.tok = processor.tokenizer

    def _encode(self, texts, images, side):
        self.tok.padding_side = side
        return self.processor(text=texts, images=images, return_tensors="pt", padding=True)

    @torch.inference_mode()
    def generate(self, convs: list[Conversation], max_new_tokens: int = 12) -> list[str]:
        out = []
        for i in range(0, len(convs), self.batch_size):
            chunk = convs[i : i + self.batch_size]
            texts = [
                self.processor.apply_chat_template(
                    c.to_messages(), tokenize=False, add_generation_prompt=True
                )
                for c in chunk
            ]
            batch = self._encode(texts, [im for c in chunk for im in c.images], "left")
            gen = self.model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.tok.pad_token_id
            )
            for row in gen[:, batch["input_ids"].shape[1] :]:
                out.append(self.tok.decode(row, skip_special_tokens=True).strip())
        self.tok.padding_side = "right"
        return out

    @torch.inference_mode()
    def score(self, convs: list[Conversation], replies: list[str]) -> list[float]:
        """Mean NLL of each reply (its own tokens only) after its conversation."""
        scores = []
        for i in range(0, len(convs), self.batch_size):
            chunk, reps = convs[i : i + self.batch_size], replies[i : i + self.batch_size]
            prompts = [
                self.processor.apply_chat_template(
                    c.to_messages(), tokenize=False, add_generation_prompt=True
                )
                for c in chunk
            ]
            fulls = [
                self.processor.apply_chat_template(
                    c.assistant(r).to_messages(), tokenize=False, continue_final_message=True
                )
                for c, r in zip(chunk, reps, strict=True)
            ]
            images = [im for c in chunk for im in c.images]
            p = self._encode(prompts, images, "right")
            f = self._encode(fulls, images, "right")
            logits = self.model(**f).logits.float()
            logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, f["input_ids"][:, 1:, None])[..., 0]
            for row in range(len(chunk)):
                start = int(p["attention_mask"][row].sum())
                end = int(f["attention_mask"][row].sum())
                scores.append(-logp[row, start - 1 : end - 1].mean().item())
        return scores


def evaluate(model, processor, n_scenes: int = 300, seed: int = 987654, batch_size: int = 32) -> dict:
    """Figures on `n_scenes` fresh scenes (three questions each)."""
    scenes, records = generate(seed, n_scenes)
    images = {f"images/{s.id}.png": s.image for s in scenes}
    run = Runner(model, processor, batch_size)
    recs = records
    img = [images[r.image] for r in recs]
    macro_convs = [Conversation().user(r.question, [im]) for r, im in zip(recs, img, strict=True)]
    macro = run.generate(macro_convs, 4)
    region_convs = [
        Conversation().user(BOX_REQUEST.format(question=r.question), [im])
        for r, im in zip(recs, img, strict=True)
    ]
    boxes_text = run.generate(region_convs, 12)

    def micro_conv(r, im, box_text, box):
        region = crop_region(box, (r.width, r.height))
        return (
            Conversation()
            .user(BOX_REQUEST.format(question=r.question), [im])
            .assistant(box_text)
            .user(COMBINE_REQUEST.format(question=r.question), [im.crop(region)])
        )

    true_convs = [micro_conv(r, im, r.box_text(), r.box) for r, im in zip(recs, img, strict=True)]
    micro_true = run.generate(true_convs, 4)
    own_convs, parsed = [], []
    for r, im, text in zip(recs, img, boxes_text, strict=True):
        box = parse_box(text, (r.width, r.height))
        parsed.append(box)
        own_convs.append(micro_conv(r, im, text, box) if box is not None else None)
    idx = [i for i, c in enumerate(own_convs) if c is not None]
    micro_own = [None] * len(recs)
    for i, ans in zip(idx, run.generate([own_convs[i] for i in idx], 4), strict=True):
        micro_own[i] = ans
    # official vote: both candidates scored in the micro context with the single-word hint
    final = list(macro)
    vote_rows = [i for i in idx if micro_own[i] != macro[i]]
    score_convs, score_replies = [], []
    for i in vote_rows:
        r = recs[i]
        base = own_convs[i]
        ctx = Conversation(base.turns[:-1]).user(
            VOTE_REQUEST.format(question=r.question), base.turns[-1].images
        )
        score_convs += [ctx, ctx]
        score_replies += [macro[i], micro_own[i]]
    if vote_rows:
        sc = run.score(score_convs, score_replies)
        for k, i in enumerate(vote_rows):
            if sc[2 * k + 1] < sc[2 * k]:
                final[i] = micro_own[i]
    stats: dict = defaultdict(list)
    for i, r in enumerate(recs):
        t = r.qtype
        stats[f"macro_{t}"].append(macro[i] == r.answer)
        stats[f"micro_true_{t}"].append(micro_true[i] == r.answer)
        stats[f"dualfocus_{t}"].append(final[i] == r.answer)
        stats[f"oracle_{t}"].append(macro[i] == r.answer or micro_own[i] == r.answer)
        stats["dualfocus_all"].append(final[i] == r.answer)
        stats["oracle_all"].append(macro[i] == r.answer or micro_own[i] == r.answer)
        stats["unparseable"].append(parsed[i] is None)
        if t == "detail" or (t == "global" and "color" in r.question):
            stats[f"iou_{t}"].append(iou(parsed[i], r.box) if parsed[i] else 0.0)
    result = {k: round(sum(map(float, v)) / len(v), 3) for k, v in sorted(stats.items())}
    result["examples"] = [
        {
            "q": recs[i].question,
            "a": recs[i].answer,
            "macro": macro[i],
            "box": boxes_text[i],
            "true_box": recs[i].box_text(),
            "micro": micro_own[i],
            "final": final[i],
        }
        for i in range(min(6, len(recs)))
    ]
    return result


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


__all__ = ["Runner", "evaluate", "iou", "parse_box"]
