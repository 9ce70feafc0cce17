"""Curate DualFocus training data from Visual Genome question-answer pairs.

The DualFocus paper trains on Visual Genome (VG) questions whose answer lies in
one region, after an "ambiguity filtration" that its authors describe but never
released. This module is our reading of it. Every question-answer pair (QA) of
``question_answers.json`` is either written as a :class:`~df_agent.data.format.FocusRecord`
or dropped for exactly one reason. The checks run in this order and the first one
that fails names the reason:

1. ``empty_text``: the question or the answer is blank.
2. ``unknown_image``: the image is missing from ``image_data.json`` (or has no usable size).
3. ``ungrounded``: none of the QA's grounding objects (``a_objects`` then ``q_objects``)
   resolves to a box, neither from the QA itself nor by id from the object files.
4. ``multiple_regions``: the grounding objects are more than one region. Objects
   with the same id, and boxes whose pairwise IoU reaches
   :attr:`CurationConfig.same_region_iou`, count as one region (the union of their boxes).
5. ``invalid_box``: the region is empty, or nothing of it is left after clipping to the image.
6. ``region_too_small``: a side of the clipped box is below :attr:`CurationConfig.min_side_px`,
   or its area is below :attr:`CurationConfig.min_area_fraction` of the image.
7. ``region_too_large``: its area is above :attr:`CurationConfig.max_area_fraction`
   of the image, so zooming in adds little.
8. ``ambiguous_category``: another object of the target's category (same first synset,
   or same first name when either lacks a synset) is in the image, and the question
   does not name an attribute that only the target has, so it does not say which of
   them it asks about ("What color is the car?" with two cars is dropped even if only
   one is red). :attr:`CurationConfig.attribute_rule` can loosen this. Same-category
   objects overlapping the target by :attr:`CurationConfig.same_region_iou` or more
   are duplicate annotations of it, not rivals.

Attributes come from ``attributes.json`` when given, and from an ``attributes``
list on the objects of ``objects.json`` when present.

Memory: the files are read as streams of top-level array elements, never with one
``json.load``. ``image_data.json`` is kept as a small id -> size table. The object
files are joined to ``question_answers.json`` by image id with a look-ahead buffer:
VG's files list images in the same order, so the buffer stays at a few entries; for
files in different orders it grows, at worst to a whole object file (what
``json.load`` would have cost anyway). Each image must appear once in
``question_answers.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from df_agent.data.format import FocusRecord, write_records

DropReason = Literal[
    "empty_text",
    "unknown_image",
    "ungrounded",
    "multiple_regions",
    "invalid_box",
    "region_too_small",
    "region_too_large",
    "ambiguous_category",
]
DROP_REASONS: tuple[DropReason, ...] = get_args(DropReason)  # in the order the checks run
"""Every reason a QA can be dropped for, in the order the checks run."""

AttributeRule = Literal["unique_or_mentioned", "unique_and_mentioned"]

_SOURCE = "visual_genome"
_PATTERN_FIELDS = {"image_id": 1, "url_dir": "VG_100K", "url_name": "1.jpg"}

Box = tuple[float, float, float, float]


class CurationConfig(BaseModel):
    """Thresholds and choices of the Visual Genome curation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_area_fraction: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="Drop regions covering more than this fraction of the image (zooming adds little).",
    )
    min_side_px: float = Field(
        default=8.0, ge=0, description="Drop regions with a side shorter than this, in original pixels."
    )
    min_area_fraction: float = Field(
        default=0.0005, ge=0, lt=1, description="Drop regions covering less than this fraction of the image."
    )
    same_region_iou: float = Field(
        default=0.7,
        gt=0,
        le=1,
        description=(
            "Boxes whose IoU reaches this are one region: grounding objects are merged, and "
            "same-category objects this close to the target are duplicate annotations, not rivals."
        ),
    )
    attribute_rule: AttributeRule = Field(
        default="unique_and_mentioned",
        description=(
            "When a same-category rival exists, what keeps the QA. 'unique_and_mentioned' (default): "
            "an attribute no rival has is named in the question, so the question points at one region. "
            "'unique_or_mentioned' (looser): the target has an attribute no rival has, or one of its "
            "attributes is named in the question."
        ),
    )
    image_pattern: str = Field(
        default="{image_id}.jpg",
        description=(
            "Record image path, relative to the JSONL folder. Fields: {image_id}, {url_dir} (the "
            "image URL's folder, VG_100K or VG_100K_2) and {url_name} (the URL's file name)."
        ),
    )

    @model_validator(mode="after")
    def _check(self) -> CurationConfig:
        if self.min_area_fraction >= self.max_area_fraction:
            raise ValueError("min_area_fraction must be below max_area_fraction")
        try:
            self.image_pattern.format(**_PATTERN_FIELDS)
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"image_pattern {self.image_pattern!r} is not a valid pattern: {err!r}") from err
        return self


class CurationReport(BaseModel):
    """What a curation run kept and why it dropped the rest.

    ``total == kept + sum(dropped.values())``: every QA is counted once, under the
    first check it fails (the order of :data:`DROP_REASONS`).
    """

    total: int = Field(ge=0, description="QAs read from question_answers.json.")
    kept: int = Field(ge=0, description="Records written.")
    dropped: dict[DropReason, int] = Field(description="Dropped QAs per reason; every reason is present.")
    output: str = Field(description="The JSONL file written.")
    config: CurationConfig


class VisualGenomePaths(BaseModel):
    """Where the Visual Genome v1.2 JSON files are.

    ``objects`` and ``attributes`` may each be omitted, not both: ``attributes.json``
    lists the same objects, with their attributes.
    """

    model_config = ConfigDict(frozen=True)

    question_answers: Path
    image_data: Path
    objects: Path | None = None
    attributes: Path | None = None

    @model_validator(mode="after")
    def _check(self) -> VisualGenomePaths:
        if self.objects is None and self.attributes is None:
            raise ValueError("need objects.json or attributes.json")
        return self

    @classmethod
    def from_dir(cls, folder: str | os.PathLike[str]) -> VisualGenomePaths:
        """Find the files by their VG names in a folder.

        Args:
            folder: Holds ``question_answers.json``, ``image_data.json`` and
                ``objects.json`` and/or ``attributes.json``.

        Returns:
            The paths; ``attributes`` is set when ``attributes.json`` exists.

        Raises:
            FileNotFoundError: A required file is missing.
        """
        root = Path(folder)
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a folder")

        def optional(name: str) -> Path | None:
            path = root / name
            return path if path.is_file() else None

        found = {name: optional(f"{name}.json") for name in cls.model_fields}
        missing = [f"{name}.json" for name in ("question_answers", "image_data") if found[name] is None]
        if found["objects"] is None and found["attributes"] is None:
            missing.append("objects.json (or attributes.json)")
        if missing:
            raise FileNotFoundError(f"{root} lacks {', '.join(missing)}")
        return cls(**found)


# --- streaming JSON ---------------------------------------------------------------------------

_NON_SPACE = re.compile(r"\S")
_SCALAR_END = re.compile(r"[,\]]")


def _iter_json_array(path: str | os.PathLike[str], chunk_chars: int = 1 << 20) -> Iterator[Any]:
    """Yield the elements of a top-level JSON array one by one, reading the file in chunks.

    Memory is one chunk plus the element being decoded, whatever the file's size.

    Raises:
        ValueError: The file is not a JSON array.
    """
    decoder = json.JSONDecoder()
    with Path(path).open(encoding="utf-8") as f:
        buf, pos, eof = "", 0, False

        def more() -> bool:
            # Drop what was consumed and append the next chunk; False at the end of the file.
            nonlocal buf, pos, eof
            chunk = "" if eof else f.read(chunk_chars)
            if not chunk:
                eof = True
                return False
            buf, pos = buf[pos:] + chunk, 0
            return True

        def peek() -> str:
            # Move to the next non-space character and return it ("" at the end of the file).
            nonlocal pos
            while True:
                match = _NON_SPACE.search(buf, pos)
                if match:
                    pos = match.start()
                    return buf[pos]
                pos = len(buf)
                if not more():
                    return ""

        if peek() != "[":
            raise ValueError(f"{path}: expected a JSON array")
        pos += 1
        if peek() == "]":
            return
        while True:
            first = peek()
            if not first:
                raise ValueError(f"{path}: truncated JSON array")
            if first not in '{["':
                # A number or literal cut at the chunk's end would decode as a shorter one:
                # read on to the ',' or ']' that ends it.
                while not _SCALAR_END.search(buf, pos) and more():
                    pass
            while True:
                try:
                    value, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError as err:
                    if more():
                        continue
                    raise ValueError(f"{path}: malformed JSON array element: {err}") from err
                break
            pos = end
            yield value
            sep = peek()
            if sep == "]":
                return
            if sep != ",":
                raise ValueError(f"{path}: expected ',' or ']' after an array element, got {sep!r}")
            pos += 1


def _entry_image_id(entry: dict[str, Any]) -> Any:
    return entry.get("image_id", entry.get("id"))


class _AlignedLookup:
    """Pops per-image entries from a stream queried in (mostly) the same image order."""

    def __init__(self, entries: Iterator[tuple[Any, list[Any]]]) -> None:
        self._entries = entries
        self._ahead: dict[Any, list[Any]] = {}

    def pop(self, image_id: Any) -> list[Any]:
        if image_id in self._ahead:
            return self._ahead.pop(image_id)
        for key, items in self._entries:
            if key == image_id:
                return items
            self._ahead.setdefault(key, []).extend(items)
        return []


def _object_entries(path: Path) -> Iterator[tuple[Any, list[Any]]]:
    # objects.json lists an image's objects under "objects", attributes.json under "attributes".
    for entry in _iter_json_array(path):
        if not isinstance(entry, dict):
            continue
        items = entry.get("objects")
        if items is None:
            items = entry.get("attributes")
        yield _entry_image_id(entry), items if isinstance(items, list) else []


# --- objects, boxes, images ------------------------------------------------------------------


def _norm(text: Any) -> str:
    return " ".join(str(text).lower().split()) if text is not None else ""


def _first(values: Any) -> str:
    if isinstance(values, list) and values:
        return _norm(values[0])
    return ""


@dataclass(frozen=True, slots=True)
class _Object:
    object_id: Any
    box: Box  # x1, y1, x2, y2 in original pixels, not clipped
    name: str
    synset: str
    attributes: frozenset[str]
    aliases: tuple[Any, ...] = ()  # merged_object_ids (objects.json v1.4)


def _parse_object(raw: Any) -> _Object | None:
    """An object or attributes.json entry, or a QA's a_objects/q_objects item; None without a box."""
    if not isinstance(raw, dict):
        return None
    try:
        x, y, w, h = (float(raw[k]) for k in ("x", "y", "w", "h"))
    except (KeyError, TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return None
    names = raw.get("names")
    if names is None and "name" in raw:
        names = [raw["name"]]
    attributes = raw.get("attributes")
    attrs = frozenset(a for a in map(_norm, attributes) if a) if isinstance(attributes, list) else frozenset()
    merged = raw.get("merged_object_ids")
    return _Object(
        object_id=raw.get("object_id", raw.get("id")),
        box=(x, y, x + w, y + h),
        name=_first(names),
        synset=_first(raw.get("synsets")),
        attributes=attrs,
        aliases=tuple(merged) if isinstance(merged, list) else (),
    )


def _area(box: Box) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def _iou(a: Box, b: Box) -> float:
    inter = _area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    union = _area(a) + _area(b) - inter
    return inter / union if union > 0 else 0.0


def _union(boxes: Iterable[Box]) -> Box:
    x1s, y1s, x2s, y2s = zip(*boxes, strict=True)
    return (min(x1s), min(y1s), max(x2s), max(y2s))


def _same_category(a: _Object, b: _Object) -> bool:
    if a.synset and b.synset:
        return a.synset == b.synset
    return bool(a.name) and a.name == b.name


class _ImageObjects:
    """One image's objects, parsed on first use; attributes of the same object id are merged."""

    def __init__(self, raw_lists: list[list[Any]]) -> None:
        # objects.json's list first, then attributes.json's; None once parsed
        self._raw_lists: list[list[Any]] | None = raw_lists
        self.by_id: dict[Any, _Object] = {}
        self.objects: list[_Object] = []
        self._by_category: dict[str, list[_Object]] | None = None

    def parse(self) -> None:
        if self._raw_lists is None:
            return
        primary: dict[Any, _Object] = {}
        alias_of: dict[Any, Any] = {}
        anonymous: list[_Object] = []
        for raw_list in self._raw_lists:
            for raw in raw_list:
                obj = _parse_object(raw)
                if obj is None:
                    continue
                if obj.object_id is None:
                    anonymous.append(obj)
                    continue
                key = alias_of.get(obj.object_id, obj.object_id)
                known = primary.get(key)
                if known is not None:
                    primary[key] = replace(known, attributes=known.attributes | obj.attributes)
                    continue
                primary[key] = obj
                for alias in obj.aliases:
                    alias_of.setdefault(alias, key)
        self._raw_lists = None
        self.objects = [*primary.values(), *anonymous]
        self.by_id = {alias: primary[key] for alias, key in alias_of.items()} | primary

    def same_category(self, target: _Object) -> list[_Object]:
        """Objects of the target's category (the target included, if it is one of them)."""
        if self._by_category is None:
            self._by_category = {}
            for obj in self.objects:
                for key in (f"s:{obj.synset}" if obj.synset else None, f"n:{obj.name}" if obj.name else None):
                    if key is not None:
                        self._by_category.setdefault(key, []).append(obj)
        found: dict[int, _Object] = {}
        for key in (f"s:{target.synset}", f"n:{target.name}"):
            for obj in self._by_category.get(key, []):
                if _same_category(target, obj):
                    found[id(obj)] = obj
        return list(found.values())


@dataclass(frozen=True, slots=True)
class _Image:
    width: int
    height: int
    url_dir: str
    url_name: str


def _load_images(path: Path) -> dict[Any, _Image]:
    images: dict[Any, _Image] = {}
    for entry in _iter_json_array(path):
        if not isinstance(entry, dict):
            continue
        try:
            width, height = int(entry["width"]), int(entry["height"])
        except (KeyError, TypeError, ValueError):
            continue
        if width <= 0 or height <= 0:
            continue
        image_id = _entry_image_id(entry)
        url = PurePosixPath(str(entry.get("url") or ""))
        images[image_id] = _Image(width, height, url.parent.name, url.name or f"{image_id}.jpg")
    return images


# --- the checks ------------------------------------------------------------------------------


def _resolve_grounding(qa: dict[str, Any], objects: _ImageObjects) -> list[_Object]:
    """The QA's grounding objects (answer's first), one per object id, resolved where possible."""
    refs = [*(qa.get("a_objects") or []), *(qa.get("q_objects") or [])]
    if not refs:
        return []
    objects.parse()
    found: list[_Object] = []
    seen: set[Any] = set()
    for ref in refs:
        if isinstance(ref, dict):
            object_id = ref.get("object_id", ref.get("id"))
        elif isinstance(ref, int) and not isinstance(ref, bool):
            object_id = ref
        else:
            continue
        if object_id is not None and object_id in seen:
            continue
        obj = objects.by_id.get(object_id) if object_id is not None else None
        if obj is None:
            obj = _parse_object(ref)
        if obj is None:
            continue
        if obj.object_id is not None and obj.object_id in seen:  # an alias of an object already found
            continue
        seen.update(k for k in (object_id, obj.object_id) if k is not None)
        found.append(obj)
    return found


def _one_region(grounding: list[_Object], same_region_iou: float) -> Box | None:
    """The union of the grounding boxes if they are all one region, else None."""
    boxes = list(dict.fromkeys(obj.box for obj in grounding))
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            if _iou(a, b) < same_region_iou:
                return None
    return _union(boxes)


def _mentions(question: str, attribute: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(attribute)}(?!\w)", question) is not None


def _is_ambiguous(
    grounding: list[_Object], region: Box, question: str, objects: _ImageObjects, config: CurationConfig
) -> bool:
    targets = {id(obj) for obj in grounding}
    rivals = [
        obj
        for obj in objects.same_category(grounding[0])
        if id(obj) not in targets and _iou(obj.box, region) < config.same_region_iou
    ]
    if not rivals:
        return False
    own = frozenset().union(*(obj.attributes for obj in grounding))
    unique = own - frozenset().union(*(obj.attributes for obj in rivals))
    text = _norm(question)
    if config.attribute_rule == "unique_and_mentioned":
        return not any(_mentions(text, attr) for attr in unique)
    return not unique and not any(_mentions(text, attr) for attr in own)


def _check_qa(
    qa: dict[str, Any],
    record_id: str,
    image_id: Any,
    image: _Image | None,
    objects: _ImageObjects,
    config: CurationConfig,
) -> DropReason | FocusRecord:
    question = qa.get("question")
    answer = qa.get("answer")
    question = question.strip() if isinstance(question, str) else ""
    answer = answer.strip() if isinstance(answer, str) else ""
    if not question or not answer:
        return "empty_text"
    if image is None:
        return "unknown_image"
    grounding = _resolve_grounding(qa, objects)
    if not grounding:
        return "ungrounded"
    region = _one_region(grounding, config.same_region_iou)
    if region is None:
        return "multiple_regions"
    x1, y1 = max(0.0, region[0]), max(0.0, region[1])
    x2, y2 = min(float(image.width), region[2]), min(float(image.height), region[3])
    if x2 <= x1 or y2 <= y1:
        return "invalid_box"
    fraction = (x2 - x1) * (y2 - y1) / (image.width * image.height)
    if min(x2 - x1, y2 - y1) < config.min_side_px or fraction < config.min_area_fraction:
        return "region_too_small"
    if fraction > config.max_area_fraction:
        return "region_too_large"
    if _is_ambiguous(grounding, region, question, objects, config):
        return "ambiguous_category"
    return FocusRecord(
        id=record_id,
        image=config.image_pattern.format(image_id=image_id, url_dir=image.url_dir, url_name=image.url_name),
        width=image.width,
        height=image.height,
        question=question,
        answer=answer,
        box=(x1, y1, x2, y2),
        qtype="other",
        source=_SOURCE,
    )


# --- public API ------------------------------------------------------------------------------


def _as_paths(
    vg: str | os.PathLike[str] | VisualGenomePaths | Sequence[str | os.PathLike[str]],
) -> VisualGenomePaths:
    if isinstance(vg, VisualGenomePaths):
        return vg
    if isinstance(vg, str | os.PathLike):
        return VisualGenomePaths.from_dir(vg)
    paths = [Path(p) for p in vg]
    if len(paths) not in (3, 4):
        raise ValueError("give a folder, or question_answers, objects, image_data [, attributes] paths")
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(path)
    return VisualGenomePaths(
        question_answers=paths[0],
        objects=paths[1],
        image_data=paths[2],
        attributes=paths[3] if len(paths) == 4 else None,
    )


def report_path(out_jsonl: str | os.PathLike[str]) -> Path:
    """Where :func:`curate` writes its report: ``data.jsonl`` -> ``data.report.json`` beside it."""
    out = Path(out_jsonl)
    return out.with_name(f"{out.stem}.report.json")


def curate(
    vg_dir_or_paths: str | os.PathLike[str] | VisualGenomePaths | Sequence[str | os.PathLike[str]],
    out_jsonl: str | os.PathLike[str],
    config: CurationConfig | None = None,
) -> CurationReport:
    """Turn Visual Genome QAs grounded in one unambiguous region into DualFocus training records.

    The files are streamed, not loaded with ``json.load`` (see the module docstring
    for the memory this needs and the order in which QAs are checked).

    Args:
        vg_dir_or_paths: A folder holding VG v1.2's ``question_answers.json``,
            ``image_data.json`` and ``objects.json`` (``attributes.json`` is used when
            present); or those paths as ``(question_answers, objects, image_data[, attributes])``;
            or a :class:`VisualGenomePaths`.
        out_jsonl: The JSONL file to write, one :class:`~df_agent.data.format.FocusRecord`
            per kept QA, boxes in original pixels clipped to the image. Its folder is created.
        config: Thresholds; the defaults when None.

    Returns:
        The report, also written as JSON to :func:`report_path` of ``out_jsonl``.

    Raises:
        FileNotFoundError: An input file is missing.
        ValueError: A file is not a JSON array, or an image appears twice in ``question_answers.json``.
    """
    config = config or CurationConfig()
    paths = _as_paths(vg_dir_or_paths)
    out = Path(out_jsonl)
    out.parent.mkdir(parents=True, exist_ok=True)

    images = _load_images(paths.image_data)
    lookups = [_AlignedLookup(_object_entries(p)) for p in (paths.objects, paths.attributes) if p is not None]
    dropped: dict[DropReason, int] = dict.fromkeys(DROP_REASONS, 0)
    total = 0
    done_images: set[Any] = set()

    def records() -> Iterator[FocusRecord]:
        nonlocal total
        for entry in _iter_json_array(paths.question_answers):
            if not isinstance(entry, dict):
                continue
            entry_image = _entry_image_id(entry)
            per_image: dict[Any, _ImageObjects] = {}
            for position, qa in enumerate(entry.get("qas") or []):
                if not isinstance(qa, dict):
                    continue
                total += 1
                qa_id = qa.get("qa_id", qa.get("id"))
                image_id = qa.get("image_id", entry_image)
                image = images.get(image_id)
                if image is not None and image_id not in per_image:
                    if image_id in done_images:
                        raise ValueError(f"{paths.question_answers}: image {image_id} appears twice")
                    done_images.add(image_id)
                    per_image[image_id] = _ImageObjects([lookup.pop(image_id) for lookup in lookups])
                record_id = f"vg-{qa_id}" if qa_id is not None else f"vg-{image_id}-{position}"
                objects = per_image.get(image_id) or _ImageObjects([])
                result = _check_qa(qa, record_id, image_id, image, objects, config)
                if isinstance(result, FocusRecord):
                    yield result
                else:
                    dropped[result] += 1

    kept = write_records(records(), out)
    report = CurationReport(total=total, kept=kept, dropped=dropped, output=str(out), config=config)
    report_path(out).write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m df_agent.data.visual_genome VG_DIR OUT.jsonl [options]``.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` when None.

    Returns:
        The exit status, 0 on success. The report is printed as JSON.
    """
    defaults = CurationConfig()
    parser = argparse.ArgumentParser(
        prog="python -m df_agent.data.visual_genome",
        description="Curate DualFocus training records from Visual Genome v1.2 question-answer pairs.",
    )
    parser.add_argument("vg_dir", help="folder with question_answers.json, objects.json, image_data.json")
    parser.add_argument("out", help="JSONL file to write; the report goes beside it as <stem>.report.json")
    parser.add_argument("--max-area-fraction", type=float, default=defaults.max_area_fraction)
    parser.add_argument("--min-side-px", type=float, default=defaults.min_side_px)
    parser.add_argument("--min-area-fraction", type=float, default=defaults.min_area_fraction)
    parser.add_argument("--same-region-iou", type=float, default=defaults.same_region_iou)
    parser.add_argument(
        "--attribute-rule",
        choices=get_args(AttributeRule),
        default=defaults.attribute_rule,
        help="what keeps a QA whose target has a same-category rival (default: %(default)s)",
    )
    parser.add_argument(
        "--image-pattern", default=defaults.image_pattern, help="e.g. '{url_dir}/{image_id}.jpg'"
    )
    args = parser.parse_args(argv)
    config = CurationConfig(
        max_area_fraction=args.max_area_fraction,
        min_side_px=args.min_side_px,
        min_area_fraction=args.min_area_fraction,
        same_region_iou=args.same_region_iou,
        attribute_rule=args.attribute_rule,
        image_pattern=args.image_pattern,
    )
    report = curate(args.vg_dir, args.out, config)
    sys.stdout.write(report.model_dump_json(indent=2) + "\n")
    return 0


__all__ = [
    "DROP_REASONS",
    "AttributeRule",
    "CurationConfig",
    "CurationReport",
    "DropReason",
    "VisualGenomePaths",
    "curate",
    "main",
    "report_path",
]


if __name__ == "__main__":
    raise SystemExit(main())
