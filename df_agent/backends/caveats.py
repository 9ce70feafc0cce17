"""What a result's `warnings` say: the shipped model is a demonstration, and inputs it cannot know.

Two cheap signals, measured by ``python bench/warnings.py``:

- **Unknown words**: words of the question that the model's tokenizer turns into its unknown
  token (the shipped tokenizer is word-level: every word outside its 274 tokens becomes ``<unk>``,
  so the model never sees it). Tokenizers without an unknown token (byte-level BPE) never fire.
- **Not a FocusShapes scene** (shipped model only): the share of pixels in the FocusShapes
  palette. A scene is a light, nearly grey canvas with grey clutter, a few shapes in six
  saturated colours and black or white digits; nearly every pixel is one of those. Photos,
  gradients, noise and documents are not.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image

from df_agent.data.focusshapes import COLORS

SHIPPED_MODEL_NOTE = (
    "df-agent/focusshapes-small is a demonstration model trained only on synthetic FocusShapes scenes "
    "(coloured shapes carrying digits): its answers about any other image mean nothing. For real images "
    "use a real checkpoint: --model PATH_OR_HUB_ID, or DualFocus.from_pretrained(PATH_OR_HUB_ID)"
)
_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)
_SIDE = 96  # pixels are sampled on a 96x96 grid (nearest neighbour: no blended edge colours)
_NEAR_PALETTE = 60.0  # RGB distance to a shape colour
# A scene passes with all three: nearly every pixel familiar, some shape colour, mostly canvas.
# Lowest over 2,000 FocusShapes scenes (bench/warnings.py): familiar 0.997, colour 0.029, canvas 0.825.
MIN_FAMILIAR, MIN_COLOUR, MIN_CANVAS = 0.98, 0.01, 0.5


class PaletteShare(NamedTuple):
    """Shares of an image's pixels: familiar (any of the below), shape colours, light grey canvas."""

    familiar: float
    colour: float
    canvas: float


def palette_share(image: Image.Image) -> PaletteShare:
    """How much of `image` is in the FocusShapes palette (see the module docstring)."""
    pixels = np.asarray(image.convert("RGB").resize((_SIDE, _SIDE), Image.Resampling.NEAREST), np.float32)
    pixels = pixels.reshape(-1, 3)
    distance = np.sqrt(((pixels[:, None, :] - _PALETTE[None]) ** 2).sum(-1)).min(axis=1)
    low, high = pixels.min(axis=1), pixels.max(axis=1)
    colour = distance <= _NEAR_PALETTE
    canvas = (high - low <= 30) & (low >= 130)  # the canvas (225-250) and its grey clutter (150-210)
    ink = (high <= 40) | (low >= 245)  # the digits: black or white
    return PaletteShare(float((colour | canvas | ink).mean()), float(colour.mean()), float(canvas.mean()))


def looks_like_focusshapes(image: Image.Image) -> bool:
    """True when `image` has the palette of a FocusShapes scene (what the shipped model knows)."""
    share = palette_share(image)
    return share.familiar >= MIN_FAMILIAR and share.colour >= MIN_COLOUR and share.canvas >= MIN_CANVAS


def unknown_words(tokenizer, question: str) -> list[str]:
    """The words of `question` that `tokenizer` encodes with its unknown token (none without one)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    words = re.findall(r"\w+", question)
    if unk is None or not words:
        return []
    encoded = tokenizer(words, add_special_tokens=False)["input_ids"]
    return [word for word, ids in zip(words, encoded, strict=True) if unk in ids]


def input_warnings(tokenizer, question: str, image: Image.Image | None, *, shipped: bool) -> list[str]:
    """The warnings of one question: the shipped model's note, unknown words, an unfamiliar image.

    Args:
        tokenizer: The model's tokenizer (a transformers tokenizer), or None.
        question: The question as asked.
        image: The image asked about (checked against FocusShapes only for the shipped model).
        shipped: Whether the model is the shipped demonstration model.
    """
    found: list[str] = [SHIPPED_MODEL_NOTE] if shipped else []
    unknown = unknown_words(tokenizer, question) if tokenizer is not None else []
    if unknown:
        total = len(re.findall(r"\w+", question))
        found.append(
            f"{len(unknown)} of the question's {total} words are unknown to the model's tokenizer and reach "
            f"it as {tokenizer.unk_token}: {_listed(unknown)}"
        )
    if shipped and image is not None and not looks_like_focusshapes(image):
        found.append(
            "the image does not look like a FocusShapes scene, the only kind the shipped model was trained "
            f"on ({_unlike(palette_share(image))})"
        )
    return found


def _unlike(share: PaletteShare) -> str:
    """Which of the palette checks the image fails, with its figures."""
    failed = []
    if share.familiar < MIN_FAMILIAR:
        failed.append(f"{share.familiar:.0%} of its pixels are in the palette (scenes: {MIN_FAMILIAR:.0%}+)")
    if share.colour < MIN_COLOUR:
        failed.append(f"{share.colour:.1%} are shape colours (scenes: {MIN_COLOUR:.0%}+)")
    if share.canvas < MIN_CANVAS:
        failed.append(f"{share.canvas:.0%} are light-grey canvas (scenes: {MIN_CANVAS:.0%}+)")
    return "; ".join(failed)


def _listed(words: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(repr(w) for w in words[:limit])
    return shown + (f" and {len(words) - limit} more" if len(words) > limit else "")


__all__ = [
    "SHIPPED_MODEL_NOTE",
    "PaletteShare",
    "input_warnings",
    "looks_like_focusshapes",
    "palette_share",
    "unknown_words",
]
