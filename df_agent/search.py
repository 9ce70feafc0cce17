"""Search mode for images much larger than the scale the model reads well: pick a tile, DualFocus on it.

A model that sees an image at a fixed low resolution cannot find a small object in a large image
from one look, so one zoom from the whole view misses it. ``ask(mode="search")`` splits the image into
overlapping square tiles at the scale the model reads well (`tile_side`; the shipped model was trained
on 320 px scenes), asks the model of every tile whether the object the question names is there (one
batched scoring pass, `Backend.score_many`: the log-odds of "yes" over "no"), and the engine runs the
DualFocus protocol on the best tile, a crop of the original at full resolution. Neighbouring tiles
overlap by at least `overlap` pixels, so any object up to that size lies wholly inside some tile.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from PIL import Image

from df_agent.backends.base import Backend, Conversation, Request, ScoringUnavailableError
from df_agent.boxes import Box, crop
from df_agent.prompt_sets import PromptSet
from df_agent.results import TileSearch

# The shipped model's family reads digits well in 320 px views (its training canvases).
SEARCH_TILE_SIDE = 320
# At least the largest object expected: FocusShapes objects are at most 64 px.
SEARCH_OVERLAP = 80
# Images whose longer side is at most this many tile sides are not tiled (plain DualFocus).
NO_TILING_RATIO = 1.5
PRESENCE_MAX_NEW_TOKENS = 4

# "Is there a green square?" -> "green square"
_EXISTS = re.compile(
    r"^(?:is|are) there (?:an?|any|some)\s+(.+?)\s*(?:in the (?:image|picture|photo))?\s*\?*$", re.I
)
# "What number is on the red circle?" -> "red circle": the phrase after the question's first "the"
_THE = re.compile(r"\bthe\s+(.+?)\s*(?:in the (?:image|picture|photo))?\s*\?*$", re.I)
_NOT_OBJECTS = {"image", "picture", "photo", "scene"}


def tile_boxes(image_size: tuple[int, int], tile_side: int, overlap: int) -> list[Box]:
    """Square tiles of side `tile_side` covering the image, neighbours overlapping by >= `overlap` px.

    Tiles are laid out row by row, evenly spaced; the first starts at the image's edge and the last
    ends at the opposite edge. A side of the image no longer than `tile_side` gets one tile of that
    side's length.

    Raises:
        ValueError: If `tile_side` < 1, `overlap` is not in 0..tile_side-1, or the size is empty.
    """
    if tile_side < 1 or not 0 <= overlap < tile_side:
        raise ValueError(f"need tile_side >= 1 and 0 <= overlap < tile_side, got {tile_side} and {overlap}")
    width, height = image_size
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {image_size}")

    def starts(length: int) -> list[int]:
        if length <= tile_side:
            return [0]
        count = math.ceil((length - tile_side) / (tile_side - overlap)) + 1
        # evenly spaced, floored: every gap between starts is at most the stride, so the overlap holds
        return [(length - tile_side) * i // (count - 1) for i in range(count)]

    return [
        Box(x1=x, y1=y, x2=min(x + tile_side, width), y2=min(y + tile_side, height))
        for y in starts(height)
        for x in starts(width)
    ]


def target_phrase(question: str) -> str | None:
    """The object a question names, or None: "red circle" for "What number is on the red circle?".

    "Is there a/an X?" names X; otherwise the phrase after the question's first "the". A question
    with neither ("How many objects are there?") or about the whole image names no object.
    """
    text = " ".join(question.split())
    match = _EXISTS.match(text) or _THE.search(text)
    if match is None:
        return None
    phrase = match.group(1).strip(" ,.;:")
    return phrase if phrase and phrase.lower() not in _NOT_OBJECTS else None


def presence_question(question: str, prompts: PromptSet) -> str | None:
    """The existence question that ranks tiles ("Is there a red circle?"), or None if no object is named."""
    target = target_phrase(question)
    if target is None:
        return None
    article = "an" if target[:1].lower() in "aeiou" else "a"
    return prompts.presence.format(object=f"{article} {target}")


def rank_tiles(
    backend: Backend, prompts: PromptSet, image: Image.Image, asked: str, tiles: Sequence[Box]
) -> tuple[list[float], str, int]:
    """Each tile's presence score for the existence question `asked`: (scores, ranked_by, model calls).

    With prompt log-probabilities: the log-odds NLL("no") - NLL("yes") of every tile, in one
    `score_many` call. With generation log-probabilities only: one generated answer per tile (one
    `generate_many` call, a request per tile), scored +p for "yes" and -p for "no" (p: the answer's
    probability), 0 for anything else.

    Raises:
        ScoringUnavailableError: The backend reports no log-probabilities of either kind.
    """
    text = prompts.macro.format(question=asked)
    conversations = [Conversation().user(text, [crop(image, tile)]) for tile in tiles]
    abilities, calls = backend.abilities, 0
    if abilities.prompt_logprobs:
        calls += 1
        try:
            scored = backend.score_many([(c, ("yes", "no")) for c in conversations])
        except ScoringUnavailableError:
            if not abilities.generation_logprobs:
                raise
        else:
            return [no - yes for yes, no in scored], "prompt_logprobs", calls
    if abilities.generation_logprobs:
        replies = backend.generate_many([Request(c, PRESENCE_MAX_NEW_TOKENS) for c in conversations])
        scores = [_generated_score(r.text, r.mean_nll) for r in replies]
        return scores, "generation_logprobs", calls + len(tiles)
    raise ScoringUnavailableError("the backend reports no log-probabilities to rank tiles by")


def _generated_score(text: str, mean_nll: float | None) -> float:
    words = text.strip().lower().split()
    first = words[0].strip(".,!") if words else ""
    sign = 1.0 if first == "yes" else -1.0 if first == "no" else 0.0
    return sign * (math.exp(-mean_nll) if mean_nll is not None else 1.0)


def find_tile(
    backend: Backend,
    prompts: PromptSet,
    image: Image.Image,
    question: str,
    *,
    tile_side: int = SEARCH_TILE_SIDE,
    overlap: int = SEARCH_OVERLAP,
) -> TileSearch:
    """Search mode's step: the tile of `image` where the object `question` names most likely is.

    Never raises for what the image, the question or the backend lacks: the result's `tile` is then
    None (DualFocus runs on the whole image) and `reason` says why: the image is small enough
    (longer side at most `NO_TILING_RATIO` tile sides), the question names no object, or the backend
    cannot rank.
    """
    limit = NO_TILING_RATIO * tile_side
    if max(image.size) <= limit:
        return TileSearch(
            reason=f"the image's longer side ({max(image.size)} px) is at most {NO_TILING_RATIO:g} tile "
            f"sides ({limit:g} px): no tiling, plain DualFocus"
        )
    asked = presence_question(question, prompts)
    if asked is None:
        return TileSearch(reason="the question names no object to search for: plain DualFocus")
    tiles = tile_boxes(image.size, tile_side, overlap)
    try:
        scores, ranked_by, calls = rank_tiles(backend, prompts, image, asked, tiles)
    except ScoringUnavailableError as err:
        return TileSearch(
            presence_question=asked,
            tiles=tiles,
            model_calls=int(backend.abilities.prompt_logprobs),  # a scoring request that failed
            reason=f"the tiles cannot be ranked ({err}): plain DualFocus",
        )
    best = max(range(len(tiles)), key=scores.__getitem__)
    return TileSearch(
        presence_question=asked,
        tiles=tiles,
        scores=scores,
        ranked_by=ranked_by,
        tile=tiles[best],
        model_calls=calls,
        reason=f"{len(tiles)} tiles of {tile_side} px (overlap >= {overlap} px) ranked by {ranked_by}; "
        f"DualFocus on tile {best}",
    )


__all__ = [
    "NO_TILING_RATIO",
    "PRESENCE_MAX_NEW_TOKENS",
    "SEARCH_OVERLAP",
    "SEARCH_TILE_SIDE",
    "find_tile",
    "presence_question",
    "rank_tiles",
    "target_phrase",
    "tile_boxes",
]
