"""POPE: yes/no object-hallucination questions, read from the official question files and scored officially.

The official files (``coco_pope_random.json``, ``..._popular.json``, ``..._adversarial.json``) hold one JSON
object per line: ``{"question_id", "image", "text", "label": "yes" | "no"}``. The official answer parsing
keeps the first sentence of the answer (the text before the first ``.``), drops commas, splits it on
spaces, and reads "no" if one of the words is ``No``, ``no`` or ``not``, else "yes". It is case-sensitive
as the official script is: "NOT" or "Not" alone read as "yes". The metrics treat "yes" as the positive
class.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from df_agent.eval.harness import Benchmark, ResultRow
from df_agent.eval.items import EvalItem

SPLITS = ("random", "popular", "adversarial")
_NO_WORDS = frozenset({"No", "no", "not"})


def parse_answer(answer: str) -> str:
    """Read a raw model answer as "yes" or "no", as the official POPE script does.

    Args:
        answer: The model's answer, verbatim.

    Returns:
        "no" if the first sentence contains the word "No", "no" or "not", else "yes".
    """
    first_sentence = answer.split(".", 1)[0]
    words = first_sentence.replace(",", "").split(" ")
    return "no" if _NO_WORDS.intersection(words) else "yes"


def score(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """POPE's metrics for raw model answers against "yes"/"no" labels ("yes" is the positive class).

    Args:
        predictions: Raw model answers, parsed with `parse_answer`.
        labels: The gold labels, "yes" or "no" (case and surrounding spaces are ignored).

    Returns:
        ``accuracy``, ``precision``, ``recall``, ``f1`` and ``yes_ratio`` (share of answers read as
        "yes"), each in 0..1; a ratio whose denominator is zero is 0.0. Also the confusion counts
        ``tp``, ``fp``, ``tn``, ``fn`` and ``n``.

    Raises:
        ValueError: If the two sequences differ in length, are empty, or a label is not yes/no.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    if not labels:
        raise ValueError("POPE needs at least one prediction")
    gold = [str(label).strip().lower() for label in labels]
    bad = sorted({label for label in gold if label not in ("yes", "no")})
    if bad:
        raise ValueError(f"POPE labels must be 'yes' or 'no', got {bad}")
    said = [parse_answer(p) for p in predictions]
    tp = sum(p == "yes" and g == "yes" for p, g in zip(said, gold, strict=True))
    fp = sum(p == "yes" and g == "no" for p, g in zip(said, gold, strict=True))
    tn = sum(p == "no" and g == "no" for p, g in zip(said, gold, strict=True))
    fn = sum(p == "no" and g == "yes" for p, g in zip(said, gold, strict=True))
    n = len(gold)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "n": n,
    }


def split_of(path: str | Path) -> str:
    """The split a question file belongs to, from its name ("coco_pope_random.json" -> "random")."""
    name = Path(path).stem.lower()
    for split in SPLITS:
        if split in name:
            return split
    return Path(path).stem


def read_questions(path: str | Path, image_root: str | Path, *, split: str | None = None) -> list[EvalItem]:
    """Read an official POPE question file.

    Args:
        path: The JSON-lines question file.
        image_root: The folder the ``image`` names are relative to (COCO val2014 for the official files).
        split: The category to file the questions under; default from the file name (`split_of`).

    Returns:
        One item per line; its category is the split and its answer the label.

    Raises:
        ValueError: If a line is not JSON or lacks a field, naming the file and line.
    """
    split = split or split_of(path)
    items = []
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                label = str(row["label"]).strip().lower()
                if label not in ("yes", "no"):
                    raise ValueError(f"label must be yes or no, got {row['label']!r}")
                items.append(
                    EvalItem(
                        id=f"{split}-{row['question_id']}",
                        image=str(Path(image_root) / row["image"]),
                        question=row["text"],
                        answers=[label],
                        category=split,
                    )
                )
            except (json.JSONDecodeError, KeyError, ValueError, TypeError) as err:
                raise ValueError(f"{path}:{lineno}: not a POPE question line: {err!r}") from None
    return items


def judge(prediction: str, item: EvalItem) -> float:
    """1.0 if the answer, read the official way, equals the label, else 0.0."""
    return float(parse_answer(prediction) == item.answers[0])


def _per_split(rows: Sequence[ResultRow]) -> dict[str, Any]:
    splits: dict[str, dict[str, dict[str, float]]] = {}
    for split in dict.fromkeys(row.category for row in rows):
        chosen = [row for row in rows if row.category == split]
        labels = [row.gold[0] for row in chosen]
        splits[split] = {
            path: score([row.predictions[path] for row in chosen], labels)
            for path in ("macro", "micro", "dualfocus")
        }
    return {"pope": splits}


def benchmark(question_files: Sequence[str | Path], image_root: str | Path) -> Benchmark:
    """POPE from its question files, one split each.

    The report adds ``"pope"``: per split and path, accuracy, precision, recall, F1 and yes-ratio
    (`score`).
    """
    if not question_files:
        raise ValueError("POPE needs at least one question file")
    return Benchmark(
        name="pope",
        items=[item for path in question_files for item in read_questions(path, image_root)],
        judge=judge,
        summarize=_per_split,
        settings={"questions": [str(p) for p in question_files], "images": str(image_root)},
    )


__all__ = ["SPLITS", "benchmark", "judge", "parse_answer", "read_questions", "score", "split_of"]
