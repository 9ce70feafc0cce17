"""Boxes: one internal box type in original-image pixels, and every model convention converted to it.

A model writes a box as text in its own convention (fractions, 0..1000, pixels of its resized input,
...). `parse_box` turns that text into a `Box` in pixels of the *original* image, or a `NoBox` that
says why it could not (`parse_boxes`: every box of a text that writes several); `format_box` is its
inverse. `zoom_box` turns a box into the crop region the
DualFocus protocol looks at (`dualfocus.md`, "Inference", step 3), and `crop` cuts it out.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Sequence
from enum import StrEnum

from PIL import Image
from pydantic import BaseModel, ConfigDict, model_validator


class BoxConvention(StrEnum):
    """How a model writes a box as text.

    Attributes:
        FRACTION: DualFocus / LLaVA: ``[x1,y1,x2,y2]`` as fractions 0..1 of the original image.
        SQUARE_FRACTION: Visual CoT: fractions 0..1 of the image padded to a square, the image centred
            in it (as LLaVA's ``expand2square`` pads), 3 decimals.
        QWEN_1000: Qwen-VL / Qwen2-VL: integers 0..1000 of the image,
            ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>``.
        PIXELS: Qwen2.5-VL: absolute pixels of the resized model input image, JSON ``bbox_2d``.
        JSON_1000: Qwen3-VL / Qwen-Agent: 0..1000 of the image, JSON ``bbox_2d``.
        GEMINI_1000: Gemini: JSON ``box_2d`` as ``[ymin, xmin, ymax, xmax]``, 0..1000 of the image
            (y first).
    """

    FRACTION = "fraction"
    SQUARE_FRACTION = "square_fraction"
    QWEN_1000 = "qwen_1000"
    PIXELS = "pixels"
    JSON_1000 = "json_1000"
    GEMINI_1000 = "gemini_1000"


class Box(BaseModel):
    """An axis-aligned box in original-image pixels; ``(x1, y1)`` top-left, ``(x2, y2)`` bottom-right."""

    model_config = ConfigDict(frozen=True)

    x1: float
    y1: float
    x2: float
    y2: float

    @model_validator(mode="after")
    def _ordered_and_finite(self) -> Box:
        if not all(math.isfinite(v) for v in self.as_tuple()):
            raise ValueError(f"box coordinates must be finite, got {self.as_tuple()}")
        if self.x2 < self.x1 or self.y2 < self.y1:
            raise ValueError(f"box is inverted: {self.as_tuple()}")
        return self

    def __str__(self) -> str:
        """For display: coordinates to one decimal (``x1=105.6 y1=20 x2=160 y2=112``)."""
        return " ".join(
            f"{k}={round(v, 1):g}" for k, v in zip(("x1", "y1", "x2", "y2"), self.as_tuple(), strict=True)
        )

    @property
    def width(self) -> float:
        """Width in pixels."""
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        """Height in pixels."""
        return self.y2 - self.y1

    @property
    def area(self) -> float:
        """Area in square pixels."""
        return self.width * self.height

    @property
    def center(self) -> tuple[float, float]:
        """The centre ``(x, y)``."""
        return (self.x1 + self.x2) / 2, (self.y1 + self.y2) / 2

    def as_tuple(self) -> tuple[float, float, float, float]:
        """The box as ``(x1, y1, x2, y2)``."""
        return self.x1, self.y1, self.x2, self.y2

    def as_int_tuple(self) -> tuple[int, int, int, int]:
        """The smallest integer box containing this one (floor ``x1, y1``, ceil ``x2, y2``)."""
        return math.floor(self.x1), math.floor(self.y1), math.ceil(self.x2), math.ceil(self.y2)

    def normalized(self, image_size: tuple[int, int]) -> tuple[float, float, float, float]:
        """The box as fractions of the image's width and height.

        Args:
            image_size: ``(width, height)`` of the original image.

        Returns:
            ``(x1 / width, y1 / height, x2 / width, y2 / height)``.
        """
        w, h = _check_size(image_size, "image_size")
        return self.x1 / w, self.y1 / h, self.x2 / w, self.y2 / h

    def iou(self, other: Box) -> float:
        """Intersection over union with `other`, 0.0 when the union is empty."""
        other = _check_box(other, "Box.iou")
        iw = max(0.0, min(self.x2, other.x2) - max(self.x1, other.x1))
        ih = max(0.0, min(self.y2, other.y2) - max(self.y1, other.y1))
        inter = iw * ih
        union = self.area + other.area - inter
        return inter / union if union > 0 else 0.0


class NoBox(BaseModel):
    """No usable box could be read; `reason` says why, in words fit for a trace."""

    model_config = ConfigDict(frozen=True)

    reason: str


class BoxError(TypeError):
    """A box function was given something that is not a `Box` (text goes through `parse_box`)."""


class NoBoxError(ValueError):
    """A box that leaves nothing to look at in this image; `no_box` says why."""

    def __init__(self, no_box: NoBox) -> None:
        super().__init__(no_box.reason)
        self.no_box = no_box


def _check_box(box: object, where: str) -> Box:
    if not isinstance(box, Box):
        raise BoxError(
            f"{where} takes a Box, not {type(box).__name__} ({box!r:.80}); read a model's text with "
            "parse_box, or build Box(x1=..., y1=..., x2=..., y2=...) in image pixels"
        )
    return box


def fit_box(box: Box, image_size: tuple[int, int]) -> Box | NoBox:
    """`box` clipped to the image, or a `NoBox` if it does not overlap it by at least one pixel a side.

    Args:
        box: A box in the image's pixels.
        image_size: ``(width, height)`` of the image.
    """
    box = _check_box(box, "fit_box")
    w, h = _check_size(image_size, "image_size")
    x1, y1 = min(max(box.x1, 0.0), w), min(max(box.y1, 0.0), h)
    x2, y2 = min(max(box.x2, 0.0), w), min(max(box.y2, 0.0), h)
    if x2 <= x1 or y2 <= y1:
        return NoBox(reason=f"box {box.as_tuple()} lies outside the {w}x{h} image")
    if x2 - x1 < 1 or y2 - y1 < 1:
        return NoBox(
            reason=f"box {box.as_tuple()} is smaller than one pixel inside the {w}x{h} image "
            f"({x2 - x1:.3g} x {y2 - y1:.3g} px)"
        )
    return Box(x1=x1, y1=y1, x2=x2, y2=y2)


# A number: optional sign, digits with optional decimals (or a leading dot), optional exponent; or the
# words nan/inf/infinity. Digits glued to a letter or underscore ("x1", "bbox_2d", "Qwen2") are not numbers,
# and a minus right after a digit is a separator ("10-20" is 10 and 20).
_NUMBER = re.compile(
    r"(?<![A-Za-z_\d.])[-+]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|(?:nan|inf(?:inity)?)\b)",
    re.IGNORECASE,
)
_BBOX_2D = re.compile(r"""["']?bbox_2d["']?\s*:\s*\[([^\]]*)\]""")
_BOX_2D = re.compile(r"""(?<![A-Za-z_])["']?box_2d["']?\s*:\s*\[([^\]]*)\]""")
_BOX_TOKENS = re.compile(r"(?:<\|box_start\|>|<box>)(.*?)(?:<\|box_end\|>|</box>|$)", re.DOTALL)

# The range of values each convention writes, and how far past it a value may stray (rounding, a
# sloppy model) and still be clipped rather than rejected. PIXELS has no fixed range.
_RANGE = {
    BoxConvention.FRACTION: 1.0,
    BoxConvention.SQUARE_FRACTION: 1.0,
    BoxConvention.QWEN_1000: 1000.0,
    BoxConvention.JSON_1000: 1000.0,
    BoxConvention.GEMINI_1000: 1000.0,
}
_TOLERANCE = 0.1


def _check_size(size: tuple[int, int], name: str) -> tuple[int, int]:
    try:
        w, h = (operator.index(v) for v in size)
    except (TypeError, ValueError):
        w = h = 0
    if w <= 0 or h <= 0:
        raise ValueError(f"{name} must be two positive integers (width, height), got {size!r}")
    return w, h


def _first_four_numbers(text: str, convention: BoxConvention) -> list[float]:
    match = (convention is BoxConvention.GEMINI_1000 and _BOX_2D.search(text)) or (
        _BBOX_2D.search(text) or _BOX_TOKENS.search(text)
    )
    return _four_numbers(match.group(1) if match else text)


def _four_numbers(text: str) -> list[float]:
    """The first four numbers of `text` (fewer if it has fewer)."""
    numbers = []
    for m in _NUMBER.finditer(text):
        numbers.append(float(m.group()))
        if len(numbers) == 4:
            break
    return numbers


def _scale(
    convention: BoxConvention, image_size: tuple[int, int], input_size: tuple[int, int] | None
) -> tuple[float, float, float, float]:
    """``(sx, sy, ox, oy)`` such that original pixels = value * s - o, per axis."""
    w, h = image_size
    if convention is BoxConvention.FRACTION:
        return w, h, 0, 0
    if convention is BoxConvention.SQUARE_FRACTION:
        side = max(w, h)
        return side, side, (side - w) // 2, (side - h) // 2
    if convention in (BoxConvention.QWEN_1000, BoxConvention.JSON_1000, BoxConvention.GEMINI_1000):
        return w / 1000, h / 1000, 0, 0
    if input_size is None:
        return 1, 1, 0, 0
    iw, ih = _check_size(input_size, "input_size")
    return w / iw, h / ih, 0, 0


def parse_box(
    text: str,
    convention: BoxConvention,
    image_size: tuple[int, int],
    input_size: tuple[int, int] | None = None,
) -> Box | NoBox:
    """Read a model's box text as a box in original-image pixels.

    The first four numbers of the text are read as ``x1, y1, x2, y2``. If the text holds a JSON
    ``bbox_2d`` list, or Qwen box tokens (``<|box_start|>``/``<box>``), the numbers are read from the
    first of those instead, so labels such as "person 1" do not count. With
    `BoxConvention.GEMINI_1000` a ``box_2d`` list comes first and is read as ``ymin, xmin, ymax,
    xmax``. Digits glued to letters ("x1", "Qwen2") are not numbers. A box partly outside the image
    is clipped to it. `parse_boxes` reads every box of a text that writes several.

    Args:
        text: The model's answer. Anything is accepted; this function never raises for it.
        convention: How the model writes boxes.
        image_size: ``(width, height)`` of the original image.
        input_size: ``(width, height)`` of the model's resized input image; only used by
            `BoxConvention.PIXELS`, where ``None`` means the coordinates are original pixels.

    Returns:
        The box, or a `NoBox` whose reason says what was wrong: no or too few numbers, NaN or
        infinite values, values out of the convention's range, an inverted or zero-area box, or a
        box outside the image.

    Raises:
        ValueError: If `image_size` or `input_size` is not two positive integers (a programming
            error, not a model error).
    """
    convention = BoxConvention(convention)
    w, h = _check_size(image_size, "image_size")
    if not isinstance(text, str):
        return NoBox(reason=f"model output is not text (got {type(text).__name__})")
    return _read_values(_first_four_numbers(text, convention), convention, (w, h), input_size)


def _read_values(
    values: list[float],
    convention: BoxConvention,
    image_size: tuple[int, int],
    input_size: tuple[int, int] | None,
) -> Box | NoBox:
    """The box that four numbers written in `convention` make, or why they make none."""
    w, h = image_size
    if not values:
        return NoBox(reason="no numbers in the model output")
    if len(values) < 4:
        return NoBox(reason=f"fewer than four numbers in the model output (found {len(values)})")
    if not all(math.isfinite(v) for v in values):
        return NoBox(reason=f"box has NaN or infinite values: {values}")
    limit = _RANGE.get(convention)
    if limit is not None and not all(-_TOLERANCE * limit <= v <= (1 + _TOLERANCE) * limit for v in values):
        return NoBox(reason=f"box values {values} are out of the {convention.value} range 0..{limit:g}")
    if convention is BoxConvention.GEMINI_1000:  # [ymin, xmin, ymax, xmax]
        values = [values[1], values[0], values[3], values[2]]
    x1, y1, x2, y2 = values
    if x2 < x1 or y2 < y1:
        return NoBox(reason=f"box is inverted (x2 < x1 or y2 < y1): {values}")
    if x2 == x1 or y2 == y1:
        return NoBox(reason=f"box has zero area: {values}")
    whole_units = limit is None or limit > 1  # pixels, 0..1000: no box is less than one unit a side
    if whole_units and (x2 - x1 < 1 or y2 - y1 < 1):
        hint = " (they look like 0-1 fractions)" if all(0 <= v <= 1 for v in values) else ""
        frame = convention.value
        return NoBox(reason=f"box {values} is less than one unit wide or high in the {frame} frame{hint}")
    sx, sy, ox, oy = _scale(convention, (w, h), input_size)
    x1, x2 = x1 * sx - ox, x2 * sx - ox
    y1, y2 = y1 * sy - oy, y2 * sy - oy
    fitted = fit_box(Box(x1=x1, y1=y1, x2=x2, y2=y2), (w, h))
    if isinstance(fitted, NoBox):
        where = "outside the image" if "outside" in fitted.reason else "smaller than one pixel in the image"
        return NoBox(reason=f"box lies {where} ({w}x{h}): {values}")
    return fitted


# Several boxes: each JSON key's value (a list, or a list of lists), each pair of Qwen box tokens, or
# else each innermost ``[...]`` group with a number in it, where two or more groups hold four numbers
# (a group may be cut off by the token budget).
_KEYS = {
    "bbox_2d": re.compile(r"""["']?bbox_2d["']?\s*:\s*"""),
    "box_2d": re.compile(r"""(?<![A-Za-z_])["']?box_2d["']?\s*:\s*"""),
}
_GROUP = re.compile(r"\[([^\[\]]*)(?:\]|$)")


def _list_at(text: str, start: int) -> str:
    """The bracketed list that opens at ``text[start]``, up to its closing bracket or the text's end."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"[": 1, "]": -1}.get(text[i], 0)
        if depth == 0:
            return text[start : i + 1]
    return text[start:]


def _key_spans(text: str, key: str) -> list[str | None]:
    """The text of each box written as ``key: [...]``, in order; None where a key's value is no list."""
    spans: list[str | None] = []
    for match in _KEYS[key].finditer(text):
        if not text.startswith("[", match.end()):
            spans.append(None)
            continue
        value = _list_at(text, match.end())
        inner = [g.group(1) for g in _GROUP.finditer(value[1:])] if "[" in value[1:] else []
        spans.extend(inner or [value])  # a list of lists: one box per inner list
    return spans


def _box_spans(text: str, convention: BoxConvention) -> list[str | None]:
    """The text of each box the model wrote, in order, by the first way of writing boxes found."""
    keys = ("box_2d", "bbox_2d") if convention is BoxConvention.GEMINI_1000 else ("bbox_2d",)
    for key in keys:
        if spans := _key_spans(text, key):
            return spans
    if spans := [m.group(1) for m in _BOX_TOKENS.finditer(text)]:
        return spans  # type: ignore[return-value]
    groups = [g.group(1) for g in _GROUP.finditer(text) if _NUMBER.search(g.group(1))]
    whole = sum(len(_four_numbers(group)) == 4 for group in groups)
    return groups if whole >= 2 else []  # one whole group or none: the text's first four numbers


def read_boxes(
    text: str,
    convention: BoxConvention,
    image_size: tuple[int, int],
    input_size: tuple[int, int] | None = None,
) -> list[Box | NoBox]:
    """Read every box a model's text writes, each as `parse_box` reads one, in the order written.

    The boxes are the values of JSON ``bbox_2d`` keys (Qwen2.5-VL, Qwen3-VL; with
    `BoxConvention.GEMINI_1000` ``box_2d`` keys first), a value that is a list of lists giving one
    box per inner list; else each pair of Qwen box tokens; else, where at least two ``[...]``
    groups hold four numbers, each group holding a number (fractions: ``[x1,y1,x2,y2]
    [x1,y1,x2,y2]``). A text with one such box or none reads exactly as `parse_box` reads it. A
    box equal to an earlier one is a `NoBox` that says so.

    Args:
        text, convention, image_size, input_size: As for `parse_box`.

    Returns:
        One `Box` or `NoBox` per box written (at least one entry).

    Raises:
        ValueError: If `image_size` or `input_size` is not two positive integers.
    """
    convention = BoxConvention(convention)
    size = _check_size(image_size, "image_size")
    spans = _box_spans(text, convention) if isinstance(text, str) else []
    if len(spans) < 2:
        return [parse_box(text, convention, size, input_size)]
    readings: list[Box | NoBox] = []
    for span in spans:
        if span is None:
            reading: Box | NoBox = NoBox(reason="the box's value is not a list of numbers")
        else:
            reading = _read_values(_four_numbers(span), convention, size, input_size)
        if isinstance(reading, Box) and reading in readings:
            reading = NoBox(reason=f"the same box as box {readings.index(reading) + 1}")
        readings.append(reading)
    return readings


def readable_boxes(readings: Sequence[Box | NoBox]) -> list[Box] | NoBox:
    """The boxes among `read_boxes`'s readings, or a `NoBox` that says why each one is unreadable."""
    boxes = [r for r in readings if isinstance(r, Box)]
    if boxes:
        return boxes
    if len(readings) == 1:
        return readings[0]
    if not readings:
        return NoBox(reason="no box in the model output")
    reasons = "; ".join(f"box {i}: {r.reason}" for i, r in enumerate(readings, 1))
    return NoBox(reason=f"none of the {len(readings)} boxes in the model output is readable ({reasons})")


def parse_boxes(
    text: str,
    convention: BoxConvention,
    image_size: tuple[int, int],
    input_size: tuple[int, int] | None = None,
) -> list[Box] | NoBox:
    """Every readable box of a model's text, in original-image pixels, in the order written.

    Boxes that cannot be read (too few numbers, out of range, degenerate, outside the image, a
    repeat) are left out; `read_boxes` says why for each. Where the model writes one box this is
    ``[parse_box(...)]``.

    Args:
        text, convention, image_size, input_size: As for `parse_box`.

    Returns:
        At least one box, or a `NoBox` when none is readable (its reason names each box's fault).

    Raises:
        ValueError: If `image_size` or `input_size` is not two positive integers.
    """
    return readable_boxes(read_boxes(text, convention, image_size, input_size))


def format_box(
    box: Box,
    convention: BoxConvention,
    image_size: tuple[int, int],
    input_size: tuple[int, int] | None = None,
) -> str:
    """Write a box as a model of `convention` would; the inverse of `parse_box`.

    Args:
        box: The box in original-image pixels.
        convention: The convention to write.
        image_size: ``(width, height)`` of the original image.
        input_size: ``(width, height)`` of the model's resized input image (`BoxConvention.PIXELS`).

    Returns:
        FRACTION ``[0.12,0.34,0.56,0.78]``; SQUARE_FRACTION ``[0.123, 0.345, 0.567, 0.789]``;
        QWEN_1000 ``<|box_start|>(120,340),(560,780)<|box_end|>``; PIXELS and JSON_1000
        ``[{"bbox_2d": [x1, y1, x2, y2]}]`` with integers; GEMINI_1000
        ``[{"box_2d": [y1, x1, y2, x2]}]`` with integers.
    """
    box = _check_box(box, "format_box")
    convention = BoxConvention(convention)
    w, h = _check_size(image_size, "image_size")
    sx, sy, ox, oy = _scale(convention, (w, h), input_size)
    v = ((box.x1 + ox) / sx, (box.y1 + oy) / sy, (box.x2 + ox) / sx, (box.y2 + oy) / sy)
    if convention is BoxConvention.FRACTION:
        return "[" + ",".join(f"{x:.2f}" for x in v) + "]"
    if convention is BoxConvention.SQUARE_FRACTION:
        return "[" + ", ".join(f"{x:.3f}" for x in v) + "]"
    a, b, c, d = (round(x) for x in v)
    if convention is BoxConvention.QWEN_1000:
        return f"<|box_start|>({a},{b}),({c},{d})<|box_end|>"
    if convention is BoxConvention.GEMINI_1000:
        return f'[{{"box_2d": [{b}, {a}, {d}, {c}]}}]'
    return f'[{{"bbox_2d": [{a}, {b}, {c}, {d}]}}]'


def _fit(lo: float, hi: float, target: float, size: int) -> tuple[float, float]:
    """Grow ``[lo, hi]`` around its centre to at least `target`, then shift it inside ``[0, size]``."""
    if hi - lo >= target:
        return lo, hi
    c = (lo + hi) / 2
    lo, hi = c - target / 2, c + target / 2
    if lo < 0:
        lo, hi = 0.0, hi - lo
    if hi > size:
        lo, hi = lo - (hi - size), float(size)
    return max(lo, 0.0), hi


def zoom_box(box: Box, image_size: tuple[int, int], *, margin: int = 25, min_side: int = 0) -> Box:
    """The region to zoom into for `box`, as DualFocus crops it.

    Following `dualfocus.md`: the box is made square around its centre (side = its longer side),
    clipped to the image, enlarged by `margin` pixels on every side and clipped again. Our documented
    deviation: a side shorter than `min_side` is then grown around its centre to
    ``min(min_side, that image dimension)``, shifted as needed to stay inside the image. Coordinates
    are finally rounded outward to integers, so a crop is exact.

    Args:
        box: The region in original-image pixels (as `parse_box` returns it).
        image_size: ``(width, height)`` of the original image.
        margin: Pixels added on every side (the official code uses 25).
        min_side: Minimum crop side in pixels (0: none, as in the official code).

    Returns:
        An integer-valued box inside the image that contains `box` (clipped to the image).

    Raises:
        BoxError: If `box` is not a `Box`.
        NoBoxError: If `box` does not overlap the image (its `no_box` says so); a box outside
            the image is never turned into a corner crop.
    """
    box = _check_box(box, "zoom_box")
    w, h = _check_size(image_size, "image_size")
    if box.x2 <= 0 or box.y2 <= 0 or box.x1 >= w or box.y1 >= h:  # not even a point inside the image
        raise NoBoxError(NoBox(reason=f"box {box.as_tuple()} lies outside the {w}x{h} image"))
    if margin < 0 or min_side < 0:
        raise ValueError(f"margin and min_side must be >= 0, got {margin} and {min_side}")
    bx1, by1 = min(max(box.x1, 0.0), w), min(max(box.y1, 0.0), h)
    bx2, by2 = min(max(box.x2, 0.0), w), min(max(box.y2, 0.0), h)
    cx, cy = (box.x1 + box.x2) / 2, (box.y1 + box.y2) / 2
    half = max(box.width, box.height) / 2
    # Square, clipped; the min/max with the clipped box guards against float rounding.
    x1, y1 = min(max(cx - half, 0.0), bx1), min(max(cy - half, 0.0), by1)
    x2, y2 = max(min(cx + half, w), bx2), max(min(cy + half, h), by2)
    x1, y1 = max(x1 - margin, 0.0), max(y1 - margin, 0.0)
    x2, y2 = min(x2 + margin, w), min(y2 + margin, h)
    x1, x2 = _fit(x1, x2, min(min_side, w), w)
    y1, y2 = _fit(y1, y2, min(min_side, h), h)
    return Box(
        x1=max(math.floor(x1), 0),
        y1=max(math.floor(y1), 0),
        x2=min(math.ceil(x2), w),
        y2=min(math.ceil(y2), h),
    )


def crop(image: Image.Image, box: Box) -> Image.Image:
    """Cut `box` out of `image`, using its integer hull (`Box.as_int_tuple`) clipped to the image.

    Args:
        image: The original image.
        box: The region in the image's pixels.

    Returns:
        A new image of the region.

    Raises:
        BoxError: If `box` is not a `Box` (or `image` not a PIL image).
        NoBoxError: If the box does not overlap the image.
    """
    box = _check_box(box, "crop")
    if not isinstance(image, Image.Image):
        raise BoxError(f"crop takes a PIL image, not {type(image).__name__}")
    w, h = image.size
    x1, y1, x2, y2 = box.as_int_tuple()
    x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
    if x2 <= x1 or y2 <= y1:
        raise NoBoxError(NoBox(reason=f"box {box.as_tuple()} does not overlap the {w}x{h} image"))
    return image.crop((x1, y1, x2, y2))


__all__ = [
    "Box",
    "BoxConvention",
    "BoxError",
    "NoBox",
    "NoBoxError",
    "crop",
    "fit_box",
    "format_box",
    "parse_box",
    "parse_boxes",
    "read_boxes",
    "readable_boxes",
    "zoom_box",
]
