"""FocusShapes: synthetic scenes where some answers need a zoom.

A scene is a cluttered canvas with 3-6 coloured shapes that never overlap; every
(shape, colour) pair occurs at most once, and every object carries a small digit.
At a small model's input size (64x64 for a 320x320 canvas) the digits are a few
pixels tall and cannot be read; in a DualFocus crop of the object they can. So:

- ``detail`` questions ("What number is on the red circle?") need the zoom;
- ``global`` questions ("What color is the star?", "How many objects are there?")
  and ``exist`` questions ("Is there a green square?") do not.

The ``"hr"`` preset (FocusShapes-HR, `PRESETS`) draws objects of the usual sizes on
1280 px canvases: from the 64 px view an object is a few pixels wide, so one zoom
from the whole image cannot read its digit (``mode="search"`` is for that).

Everything is a pure function of a seed: the same seed gives the same pixels and
the same questions, on any machine.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from df_agent.data.format import FocusRecord, write_records

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")
COLORS = {
    "red": (220, 30, 30),
    "green": (20, 150, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 10),
}
# Digit ink per fill colour, chosen for contrast.
_INK = {"red": 255, "green": 255, "blue": 255, "yellow": 0, "purple": 255, "orange": 0}
COUNT_QUESTION = "How many objects are there?"
# Named render options: "hr" is FocusShapes-HR (large canvases, objects and digits of the usual sizes).
PRESETS: dict[str, dict] = {
    "default": {"size": 320, "n_objects": (3, 6), "object_size": (44, 64), "font_size": 20},
    "hr": {"size": 1280, "n_objects": (4, 8), "object_size": (44, 64), "font_size": 20},
}


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene; boxes are ``(x1, y1, x2, y2)`` in canvas pixels."""

    shape: str
    color: str
    digit: int
    box: tuple[int, int, int, int]
    digit_box: tuple[int, int, int, int]

    @property
    def name(self) -> str:
        """How questions name it: "red circle"."""
        return f"{self.color} {self.shape}"


@dataclass
class Scene:
    """A rendered scene: the image, its objects and a per-pixel object map (0 = background)."""

    id: str
    image: Image.Image
    objects: list[ShapeObject]
    object_map: np.ndarray = field(repr=False)
    digit_map: np.ndarray = field(repr=False)

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` of the canvas."""
        return self.image.size


def _polygon(shape: str, box: tuple[int, int, int, int]) -> list[tuple[float, float]] | None:
    x1, y1, x2, y2 = box
    cx, cy, r = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2
    if shape == "triangle":
        return [(cx, y1), (x2, y2), (x1, y2)]
    if shape == "diamond":
        return [(cx, y1), (x2, cy), (cx, y2), (x1, cy)]
    if shape == "hexagon":
        return [(cx + r * math.cos(math.pi / 3 * k), cy + r * math.sin(math.pi / 3 * k)) for k in range(6)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.5
            angle = -math.pi / 2 + math.pi / 5 * k
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    return None  # circle, square: drawn directly


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    poly = _polygon(shape, box)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon(poly, fill=fill)


def _tight_box(shape: str, box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    poly = _polygon(shape, box)
    if poly is None:
        return box
    xs, ys = [p[0] for p in poly], [p[1] for p in poly]
    return (math.floor(min(xs)), math.floor(min(ys)), math.ceil(max(xs)), math.ceil(max(ys)))


def _background(rng: random.Random, size: int) -> Image.Image:
    nrng = np.random.default_rng(rng.getrandbits(32))
    base = np.array([rng.randint(225, 250) for _ in range(3)], dtype=np.float32)
    noise = nrng.normal(0, 6, size=(size, size, 1)).astype(np.float32)
    pixels = np.add(noise, base)
    np.clip(pixels, 0, 255, out=pixels)  # in place: a training step renders dozens of scenes
    pixels = pixels.astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(12, 24)):  # faint grey clutter: lines and small arcs
        grey = rng.randint(150, 210)
        pts = [(rng.uniform(0, size), rng.uniform(0, size)) for _ in range(2)]
        if rng.random() < 0.7:
            draw.line(pts, fill=(grey, grey, grey), width=rng.randint(1, 2))
        else:
            x, y = pts[0]
            r = rng.uniform(5, 20)
            draw.arc((x - r, y - r, x + r, y + r), rng.uniform(0, 360), rng.uniform(0, 360), fill=(grey,) * 3)
    return image


@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """PIL's built-in font at `size`, loaded once per process."""
    return ImageFont.load_default(size=size)


def render_scene(
    seed: int | str,
    *,
    size: int = 320,
    n_objects: tuple[int, int] = (3, 6),
    object_size: tuple[int, int] = (44, 64),
    font_size: int = 20,
    scene_id: str | None = None,
) -> Scene:
    """Render one scene, a pure function of `seed` and the options.

    Args:
        seed: Any int or string; equal seeds give identical scenes.
        size: Canvas side in pixels.
        n_objects: Inclusive range of the number of objects.
        object_size: Inclusive range of an object's side in pixels.
        font_size: Size of the digit font (PIL's built-in font).
        scene_id: The scene's id (default: ``str(seed)``).

    Returns:
        The scene, with its object map (object index + 1 per pixel) and digit-glyph map.
    """
    rng = random.Random(f"focusshapes:{seed}")
    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    object_map = Image.new("L", (size, size), 0)
    digit_map = Image.new("L", (size, size), 0)
    omap, dmap = ImageDraw.Draw(object_map), ImageDraw.Draw(digit_map)
    font = _font(font_size)
    pairs = rng.sample([(s, c) for s in SHAPES for c in COLORS], rng.randint(*n_objects))
    placed: list[tuple[int, int, int, int]] = []
    objects: list[ShapeObject] = []
    gap = 8
    for shape, color in pairs:
        for _ in range(200):
            side = rng.randint(*object_size)
            x1, y1 = rng.randint(4, size - side - 4), rng.randint(4, size - side - 4)
            cell = (x1, y1, x1 + side, y1 + side)
            if all(
                cell[2] + gap <= p[0]
                or p[2] + gap <= cell[0]
                or cell[3] + gap <= p[1]
                or p[3] + gap <= cell[1]
                for p in placed
            ):
                break
        else:  # no room left: stop adding objects
            break
        placed.append(cell)
        index = len(objects) + 1
        _draw_shape(draw, shape, cell, COLORS[color])
        _draw_shape(omap, shape, cell, index)
        digit = rng.randint(0, 9)
        cx = (cell[0] + cell[2]) / 2
        cy = (cell[1] + cell[3]) / 2 + (side * 0.12 if shape == "triangle" else 0)
        ink = _INK[color]
        draw.text((cx, cy), str(digit), fill=(ink, ink, ink), font=font, anchor="mm")
        dmap.text((cx, cy), str(digit), fill=255, font=font, anchor="mm")
        glyph = draw.textbbox((cx, cy), str(digit), font=font, anchor="mm")
        objects.append(
            ShapeObject(shape, color, digit, _tight_box(shape, cell), tuple(int(v) for v in glyph))
        )
    return Scene(
        id=scene_id if scene_id is not None else str(seed),
        image=image,
        objects=objects,
        object_map=np.asarray(object_map),
        digit_map=np.asarray(digit_map) > 0,
    )


def _record(scene: Scene, suffix: str, question: str, answer: str, box, qtype: str) -> FocusRecord:
    w, h = scene.size
    return FocusRecord(
        id=f"{scene.id}-{suffix}",
        image=f"images/{scene.id}.png",
        width=w,
        height=h,
        question=question,
        answer=answer,
        box=tuple(float(v) for v in box),
        qtype=qtype,
        source="focusshapes",
    )


def detail_record(scene: Scene, obj: ShapeObject, suffix: str = "detail") -> FocusRecord:
    """ "What number is on the red circle?" -> the digit; box: the object."""
    return _record(scene, suffix, f"What number is on the {obj.name}?", str(obj.digit), obj.box, "detail")


def color_record(scene: Scene, obj: ShapeObject, suffix: str = "color") -> FocusRecord:
    """ "What color is the star?" (the shape occurs once) -> colour; box: the object."""
    return _record(scene, suffix, f"What color is the {obj.shape}?", obj.color, obj.box, "global")


def count_record(scene: Scene, suffix: str = "count") -> FocusRecord:
    """ "How many objects are there?" -> the count; box: the whole image."""
    w, h = scene.size
    return _record(scene, suffix, COUNT_QUESTION, str(len(scene.objects)), (0, 0, w, h), "global")


def exist_record(scene: Scene, rng: random.Random, yes: bool, suffix: str = "exist") -> FocusRecord:
    """ "Is there a green square?" -> yes/no; box: the whole image (the box must not leak the answer).

    Negatives share the colour or the shape of an object in the scene when possible.
    """
    w, h = scene.size
    present = {(o.shape, o.color) for o in scene.objects}
    if yes:
        shape, color = rng.choice(sorted(present))
    else:
        absent = [(s, c) for s in SHAPES for c in COLORS if (s, c) not in present]
        near = [p for p in absent if any(p[0] == q[0] or p[1] == q[1] for q in present)]
        shape, color = rng.choice(near or absent)
    article = "an" if color[0] in "aeiou" else "a"
    return _record(
        scene, suffix, f"Is there {article} {color} {shape}?", "yes" if yes else "no", (0, 0, w, h), "exist"
    )


def scene_records(scene: Scene, rng: random.Random, exist_yes: bool) -> list[FocusRecord]:
    """One question of each type for a scene: detail, global (colour or count), exist."""
    records = [detail_record(scene, rng.choice(scene.objects))]
    shapes = [o.shape for o in scene.objects]
    unique = [o for o in scene.objects if shapes.count(o.shape) == 1]
    if unique and rng.random() < 0.5:
        records.append(color_record(scene, rng.choice(unique)))
    else:
        records.append(count_record(scene))
    records.append(exist_record(scene, rng, exist_yes))
    return records


def iter_scenes(seed: int, n_scenes: int, **render_options) -> Iterator[Scene]:
    """Scenes ``0 .. n_scenes-1`` of the set named by `seed` (ids ``"{seed}-{i:05d}"``)."""
    for i in range(n_scenes):
        scene_id = f"{seed}-{i:05d}"
        yield render_scene(scene_id, scene_id=scene_id, **render_options)


def generate(
    seed: int, n_scenes: int, *, preset: str | None = None, **render_options
) -> tuple[list[Scene], list[FocusRecord]]:
    """Scenes and their records in memory (three questions per scene), for evaluation.

    Exist questions alternate yes/no scene by scene, so they are balanced exactly (up to one).

    Args:
        seed: The set's seed.
        n_scenes: How many scenes.
        preset: A name in `PRESETS` ("hr": FocusShapes-HR); `render_options` override its values.
        **render_options: Passed to `render_scene`.
    """
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown FocusShapes preset {preset!r}; presets: {', '.join(PRESETS)}")
        render_options = {**PRESETS[preset], **render_options}
    scenes, records = [], []
    for i, scene in enumerate(iter_scenes(seed, n_scenes, **render_options)):
        rng = random.Random(f"focusshapes-questions:{scene.id}")
        scenes.append(scene)
        records.extend(scene_records(scene, rng, exist_yes=i % 2 == 0))
    return scenes, records


def write_dataset(out_dir: str | Path, seed: int, n_scenes: int, **render_options) -> Path:
    """Write a data set folder: ``images/*.png`` and ``records.jsonl``; returns the JSONL path."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    scenes, records = generate(seed, n_scenes, **render_options)
    for scene in scenes:
        scene.image.save(out / "images" / f"{scene.id}.png")
    path = out / "records.jsonl"
    write_records(records, path)
    return path


__all__ = [
    "COLORS",
    "COUNT_QUESTION",
    "PRESETS",
    "SHAPES",
    "Scene",
    "ShapeObject",
    "color_record",
    "count_record",
    "detail_record",
    "exist_record",
    "generate",
    "iter_scenes",
    "render_scene",
    "scene_records",
    "write_dataset",
]
