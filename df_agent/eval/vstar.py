"""V* Bench: 191 multiple-choice questions on high-resolution images (115 attribute, 76 spatial).

The benchmark folder holds ``direct_attributes/`` and ``relative_position/``; each image ``NAME.jpg``
has an annotation ``NAME.json`` with ``question``, ``options`` (the correct one first),
``target_object`` and ``bbox`` (one ``[x, y, width, height]`` per target object, in pixels).

Two ways of answering, both computed from one DualFocus pass:

- **by option loss** (the official V* scoring): each option's text is scored as the reply to the bare
  question and the lowest mean NLL is the choice. The macro choice scores in the macro context (the
  whole image), the micro choice in the DualFocus scoring context ([full image, crop]); the DualFocus
  choice is the engine's vote between those two choices (`DualFocus.arbitrate`, the engine's method);
- **by generation**: the engine asks with lettered options and reduces the answers to letters. The
  options are shuffled first, with a seed fixed per question, since the annotation files always put
  the correct option first.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image

from df_agent.boxes import Box, crop
from df_agent.engine import DualFocus
from df_agent.eval.harness import Benchmark
from df_agent.eval.items import EvalItem, exact_match
from df_agent.prompt_sets import OPTION_LETTERS
from df_agent.results import FocusResult

CATEGORIES = ("direct_attributes", "relative_position")


def read_bench(root: str | Path, *, shuffle_seed: int = 0) -> list[EvalItem]:
    """Read V* Bench from its folder.

    Args:
        root: The folder holding ``direct_attributes/`` and ``relative_position/``.
        shuffle_seed: Seed of the per-question option shuffle used when answering by generation.

    Returns:
        One item per annotated image; ``answers`` is the correct option's letter after the shuffle,
        ``options`` the shuffled options, ``target_box`` the union of the target objects' boxes.

    Raises:
        ValueError: If a category folder is missing or an annotation is malformed, naming the file.
    """
    root = Path(root)
    items = []
    for category in CATEGORIES:
        folder = root / category
        if not folder.is_dir():
            raise ValueError(f"{root} is not a V* Bench folder: {category}/ is missing")
        for annotation_path in sorted(folder.glob("*.json")):
            try:
                items.append(_item(annotation_path, category, shuffle_seed))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{annotation_path}: not a V* annotation: {err!r}") from None
    return items


def _item(annotation_path: Path, category: str, shuffle_seed: int) -> EvalItem:
    annotation = json.loads(annotation_path.read_text(encoding="utf-8"))
    images = [p for p in annotation_path.parent.glob(annotation_path.stem + ".*") if p.suffix != ".json"]
    if not images:
        raise ValueError("no image file next to it")
    options = [str(o) for o in annotation["options"]]
    if len(options) < 2:
        raise ValueError("needs at least two options")
    order = list(range(len(options)))
    random.Random(f"vstar:{shuffle_seed}:{category}/{annotation_path.stem}").shuffle(order)
    boxes = [Box(x1=x, y1=y, x2=x + w, y2=y + h) for x, y, w, h in annotation.get("bbox", [])]
    target = None
    if boxes:
        target = Box(
            x1=min(b.x1 for b in boxes),
            y1=min(b.y1 for b in boxes),
            x2=max(b.x2 for b in boxes),
            y2=max(b.y2 for b in boxes),
        )
    return EvalItem(
        id=f"{category}/{annotation_path.stem}",
        image=str(images[0]),
        question=annotation["question"],
        answers=[OPTION_LETTERS[order.index(0)]],
        category=category,
        options=[options[i] for i in order],
        target_box=target,
    )


def loss_choices(
    engine: DualFocus, image: Image.Image, item: EvalItem, result: FocusResult
) -> dict[str, str]:
    """The option letters chosen by lowest option loss, per path, reusing the pass's box.

    Args:
        engine: The engine that produced `result`.
        image: The item's image, loaded.
        item: A V* item (with options).
        result: The DualFocus result of `item` (its box text and crop box are reused).

    Returns:
        ``{"macro": letter, "micro": letter, "dualfocus": letter}``; without a crop, micro and
        DualFocus are the macro choice.
    """
    options = item.options or []
    backend = engine.backend
    macro_scores = backend.score(engine.macro_conversation(image, item.question, None), options)
    macro = min(range(len(options)), key=macro_scores.__getitem__)
    if result.crop_box is None or result.box_text is None:
        letter = OPTION_LETTERS[macro]
        return {"macro": letter, "micro": letter, "dualfocus": letter}
    crop_image = crop(image, result.crop_box)
    context = engine.score_conversation(image, crop_image, item.question, result.box_text)
    micro_scores = backend.score(context, options)
    micro = min(range(len(options)), key=micro_scores.__getitem__)
    chosen = macro
    if micro != macro:
        vote = engine.arbitrate(
            image, crop_image, item.question, [options[macro], options[micro]], box_text=result.box_text
        )
        chosen = (macro, micro)[vote.winner]
    letters = OPTION_LETTERS
    return {"macro": letters[macro], "micro": letters[micro], "dualfocus": letters[chosen]}


def _loss_systems(
    engine: DualFocus, image: Image.Image, item: EvalItem, result: FocusResult
) -> dict[str, str]:
    return {f"loss.{path}": letter for path, letter in loss_choices(engine, image, item, result).items()}


def benchmark(root: str | Path, *, shuffle_seed: int = 0) -> Benchmark:
    """V* Bench, answered by generation and by option loss from one pass.

    The report's macro, micro and dualfocus figures are by generation; its ``"loss"`` group holds the
    same three by option loss, the official V* scoring.
    """
    return Benchmark(
        name="vstar",
        items=read_bench(root, shuffle_seed=shuffle_seed),
        judge=exact_match,
        extra=_loss_systems,
        settings={"root": str(root), "shuffle_seed": shuffle_seed, "official_scoring": "loss"},
    )


__all__ = ["CATEGORIES", "benchmark", "loss_choices", "read_bench"]
