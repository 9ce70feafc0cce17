"""The DualFocus tool operations, framework-neutral: what the LangChain tools and the MCP server run.

A `Toolbox` holds one engine and one `ImageRegistry`. Each operation is one tool: it takes the tool's
validated input model (`df_agent.agents.inputs`), resolves the planner's image reference, runs the
engine's steps and returns a result (`df_agent.agents.answers`) whose `summary()` is the short text a
planner reads. Every operation checks the question against the engine's limits before any model work.
Planner mistakes (a bad reference, a region given twice, a box outside the image) raise a
`PlannerError`, which the adapters turn into tool errors. The memory is the engine's: `ask` looks up
exact repeats in it and logs to it, and `recall_visual_qa` reads it.

Any image may be a crop id: the operation then works in the crop's frame (it locates inside the crop,
and the micro step sees [the crop, the new crop], as the engine's micro step sees [image, crop]). Every
new crop is cut from the root image's full-resolution pixels (`ImageRegistry.add_crop`), and results
give boxes both in the pixels of the image passed and in the root's (`df_agent.agents.answers`).

To watch the engine's steps, run an operation inside ``with toolbox.engine.observing(observer):``
(`df_agent.agents.specs.ToolSpec.call` does).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from df_agent.agents.answers import (
    ArbitrationAnswer,
    DeeperZoom,
    FocusedAnswer,
    GlobalAnswer,
    PastAnswer,
    PipelineAnswer,
    RecallAnswer,
    Region,
    RegionAnswer,
)
from df_agent.agents.errors import ToolInputError
from df_agent.agents.inputs import (
    ArbitrateInput,
    AskInput,
    BoxFrame,
    BoxUnits,
    FocusedInput,
    PipelineInput,
    RecallInput,
    ZoomInput,
)
from df_agent.agents.registry import ImageRegistry, RegisteredImage
from df_agent.boxes import Box, NoBoxError, format_box
from df_agent.engine import DualFocus, option_letter
from df_agent.results import Location

# zoom_deeper: the first zoom's micro answer goes one level deeper when its mean NLL (in the context it
# was generated in) is above this. Measured with bench/zoom_deeper.py on the shipped model, FocusShapes
# at 1280 px (4-8 objects), 150 questions (seed 19): accuracy 0.233 without, 0.240 at 0.3 (detail 0.14
# either way, global 0.06 -> 0.08); always deeper: it fires on 95% and replaces 14% of the answers. The
# first zoom, located from the model's 64 px view of the whole 1280 px image, rarely holds the object,
# so a second zoom inside it cannot find it (the tile search is the fix). Recalibrate for other models.
DEEPER_THRESHOLD = 0.3


class Recalled(Protocol):
    """One record `recall` found (`df_agent.memory.Recollection`): the logged record and its distance."""

    record: Any
    distance: float


@runtime_checkable
class RecallingMemory(Protocol):
    """A memory `recall_visual_qa` can search (`df_agent.memory.VisualQAMemory` is one)."""

    def recall(self, query: str, image: Any = None, k: int = 5) -> Sequence[Recalled]:
        """The records closest in meaning to `query`, optionally for one image hash, closest first."""
        ...


class Toolbox:
    """The DualFocus tool operations over one engine and one image registry.

    Args:
        engine: The engine every operation runs on (one engine is safe to share between threads when
            its backend is, as `HFBackend` is). Its memory, if any, is the toolbox's: build the engine
            with ``DualFocus(backend, memory=memory)``.
        registry: Where image ids live and how references resolve; default: no paths, no URLs.
        deeper_threshold: ``dualfocus_answer(zoom_deeper=True)`` zooms one level deeper when the
            micro answer's mean NLL is above this (see `DeeperZoom`).
    """

    def __init__(
        self,
        engine: DualFocus,
        registry: ImageRegistry | None = None,
        *,
        deeper_threshold: float = DEEPER_THRESHOLD,
    ) -> None:
        self.engine = engine
        self.registry = registry if registry is not None else ImageRegistry()
        self.deeper_threshold = deeper_threshold

    @property
    def memory(self) -> RecallingMemory | None:
        """The engine's memory when it can be searched (then `recall_visual_qa` is offered), else None."""
        memory = self.engine.memory
        return memory if isinstance(memory, RecallingMemory) else None

    def dualfocus_answer(self, args: PipelineInput) -> PipelineAnswer:
        """The whole pipeline (macro, locate, zoom, micro, vote; exact repeats come from the memory), and
        with ``zoom_deeper`` one level deeper into the crop when the micro answer is not confident."""
        entry = self.registry.resolve(args.image)
        result = self.engine.ask(entry.image, args.question, options=args.options)
        crop = None
        if result.crop is not None and result.crop_box is not None:
            crop = self._crop(entry, result.crop_box, result.box_text or "")
        answer = PipelineAnswer(
            **self._frame(entry), answer=result.answer, crop_id=crop.id if crop else None,
            box_root=entry.frame.to_root(result.box) if result.box is not None else None,
            crop_box_root=crop.region if crop else None, result=result,
        )  # fmt: skip
        if not args.zoom_deeper:
            return answer
        deeper = self._deeper(entry, crop, result, args)
        update: dict = {"deeper": deeper}
        if deeper.chosen:
            update["answer"] = deeper.answer
        return answer.model_copy(update=update)

    def global_answer(self, args: AskInput) -> GlobalAnswer:
        """The macro step: the answer from the whole image."""
        self.engine.check_question(args.question, args.options)
        entry = self.registry.resolve(args.image)
        answer = self.engine.macro(entry.image, args.question, args.options)
        return GlobalAnswer(image_id=entry.id, question=args.question, options=args.options, answer=answer)

    def zoom_region(self, args: ZoomInput) -> RegionAnswer:
        """The locate and zoom steps in the image's frame; each region's crop is registered under a new id."""
        self.engine.check_question(args.question)
        entry = self.registry.resolve(args.image)
        picture = entry.image
        location = self.engine.locate(picture, args.question)
        boxes = located_boxes(location)
        regions = []
        for box in boxes:
            # one box: the micro step continues the model's own reply; several: each its own box, written
            # as the model writes boxes
            box_text = location.box_text if len(boxes) == 1 else self._box_text(box, picture)
            zoomed = self.engine.zoom(picture, box)
            crop = self._crop(entry, zoomed.box, box_text)
            regions.append(
                Region(
                    box=box, box_root=entry.frame.to_root(box), box_normalized=box.normalized(picture.size),
                    crop_box=entry.frame.from_root(crop.region), crop_box_root=crop.region,
                    crop_box_normalized=zoomed.box.normalized(picture.size), crop_id=crop.id,
                    box_text=box_text, crop=crop.image,
                )
            )  # fmt: skip
        first = regions[0] if regions else None
        return RegionAnswer(
            **self._frame(entry), question=args.question, box_text=location.box_text,
            box=first.box if first else None, failure=location.failure if not regions else None,
            regions=regions,
            **({} if first is None else {
                "box_root": first.box_root, "box_normalized": first.box_normalized,
                "crop_box": first.crop_box, "crop_box_root": first.crop_box_root,
                "crop_box_normalized": first.crop_box_normalized, "crop_id": first.crop_id,
            }),
        )  # fmt: skip

    def focused_answer(self, args: FocusedInput) -> FocusedAnswer:
        """The micro step on [the image, the crop of a region] given as a crop id or as a box."""
        self.engine.check_question(args.question, args.options)
        entry = self.registry.resolve(args.image)
        crop, box_text = self._region(
            entry, args.image, args.crop_id, args.box, args.box_units, args.box_frame
        )
        answer = self.engine.micro(
            entry.image, crop.image, args.question, box_text=box_text, options=args.options
        )
        return FocusedAnswer(
            **self._frame(entry), question=args.question, options=args.options, crop_id=crop.id,
            crop_box=entry.frame.from_root(crop.region), crop_box_root=crop.region, box_text=box_text,
            answer=answer,
        )  # fmt: skip

    def arbitrate_answers(self, args: ArbitrateInput) -> ArbitrationAnswer:
        """The official perplexity vote among the candidates in the micro context of a region."""
        self.engine.check_question(args.question)
        limit = self.engine.max_option_chars
        for candidate in args.candidates:
            if len(candidate) > limit:
                raise ToolInputError(
                    f"a candidate is {len(candidate):,} characters; the limit is {limit:,} (max_option_chars)"
                )
        entry = self.registry.resolve(args.image)
        crop, box_text = self._region(
            entry, args.image, args.crop_id, args.box, args.box_units, args.box_frame
        )
        vote = self.engine.arbitrate(
            entry.image, crop.image, args.question, args.candidates, box_text=box_text, method="official",
        )  # fmt: skip
        return ArbitrationAnswer(
            **self._frame(entry), question=args.question, crop_id=crop.id,
            crop_box=entry.frame.from_root(crop.region), crop_box_root=crop.region, arbitration=vote,
            answer=vote.answer,
        )  # fmt: skip

    def recall_visual_qa(self, args: RecallInput) -> RecallAnswer:
        """Similar past questions and answers from the memory, optionally about one image only."""
        memory = self.memory
        if memory is None:
            raise ToolInputError("no visual Q&A memory is attached, so there is nothing to recall")
        entry = self.registry.resolve(args.image) if args.image else None
        from df_agent.memory import MemoryUnavailableError  # loaded already: the memory is one

        try:
            found = memory.recall(args.question, image=entry.hash if entry else None, k=args.k)
        except MemoryUnavailableError as exc:
            raise ToolInputError(f"the visual Q&A memory cannot be reached now: {exc}") from None
        records = [
            PastAnswer(
                record_id=item.record.id,
                distance=item.distance,
                image_id=self.registry.id_for_hash(item.record.result.image_hash),
                result=item.record.result,
            )
            for item in found
        ]
        return RecallAnswer(question=args.question, image_id=entry.id if entry else None, records=records)

    # -- frames and regions ----------------------------------------------------------------------

    def _frame(self, entry: RegisteredImage) -> dict:
        """The frame fields of a result about `entry`."""
        root = self.registry.root_of(entry)
        return {
            "image_id": entry.id, "root_id": root.id, "frame": entry.id,
            "image_size": entry.image.size, "root_size": root.image.size,
        }  # fmt: skip

    def _crop(self, entry: RegisteredImage, region: Box, box_text: str) -> RegisteredImage:
        """Register `region` (pixels of `entry`) as a crop, cut from the root's full-resolution pixels."""
        try:
            return self.registry.add_crop(entry, region, box_text=box_text)
        except ValueError as exc:
            raise ToolInputError(f"the region cannot be cropped: {exc}") from None

    def _box_text(self, box: Box, picture) -> str:
        """`box` (pixels of `picture`) written as the backend's model writes boxes about `picture`."""
        backend = self.engine.backend
        return format_box(box, backend.box_convention, picture.size, backend.input_size(picture))

    def _region(
        self,
        entry: RegisteredImage,
        image: str,
        crop_id: str | None,
        box: Sequence[float] | None,
        box_units: BoxUnits,
        box_frame: BoxFrame,
    ) -> tuple[RegisteredImage, str]:
        """The crop a region names and the box text the micro step shows for it in `entry`'s frame.

        A registered crop inside this image (its own crop: the box text it was made with; a crop of the
        same root within it: its region written in this image's frame), or a new crop of a planner's box.
        """
        if (crop_id is None) == (box is None):
            raise ToolInputError(
                "give the region either as crop_id (from zoom_region) or as box=[x1, y1, x2, y2]"
                + (", not both" if crop_id is not None else "")
            )
        picture = entry.image
        if crop_id is not None:
            crop = self.registry.get(crop_id)
            if crop.is_root:
                raise ToolInputError(
                    f"{crop_id!r} is a whole image, not a crop; pass a crop id from zoom_region, or a box"
                )
            if crop.parent_hash == entry.hash and crop.root_hash == entry.root_hash:  # its own crop
                return crop, crop.box_text or ""
            inside = crop.root_hash == entry.root_hash and _contains(entry.region, crop.region)
            if not inside:
                raise ToolInputError(
                    f"crop {crop_id!r} was cut from another image than {image!r}, or lies outside it; pass "
                    "the image it was cut from, or give a box on this image instead"
                )
            return crop, self._box_text(entry.frame.from_root(crop.region), picture)
        values = list(box)  # type: ignore[arg-type]
        if box_frame == "root":
            root = self.registry.root_of(entry)
            in_root = planner_box(values, box_units, root.image.size)
            region = entry.frame.from_root(in_root)
            values, box_units = list(region.as_tuple()), "pixels"
            where = f"the root image {root.id!r}"
        else:
            where = None
        try:
            region = planner_box(values, box_units, picture.size)
        except ToolInputError as exc:
            if where is None:
                raise
            raise ToolInputError(f"{exc} ({image!r} shows only part of {where}: {entry.region})") from None
        try:
            zoomed = self.engine.zoom(picture, region)
        except NoBoxError as exc:
            raise ToolInputError(f"box {values} leaves nothing to crop: {exc}") from None
        box_text = self._box_text(region, picture)
        return self._crop(entry, zoomed.box, box_text), box_text

    # -- one level deeper ----------------------------------------------------------------------------

    def _deeper(
        self, entry: RegisteredImage, crop: RegisteredImage | None, result, args: PipelineInput
    ) -> DeeperZoom:
        """Zoom once more inside `crop` when the micro answer is not confident (the `DeeperZoom` rule)."""
        threshold = self.deeper_threshold
        if crop is None or result.micro_answer is None:
            why = "answered from memory" if result.cached else "the pipeline made no crop"
            return DeeperZoom(threshold=threshold, fired=False, reason=f"not run: {why}")
        if not self.engine.backend.abilities.prompt_logprobs:
            return DeeperZoom(
                threshold=threshold, fired=False,
                reason="not run: the backend cannot score answers, so the micro answer has no confidence",
            )  # fmt: skip
        engine, question, options = self.engine, args.question, args.options
        nll = self._micro_nll(entry.image, crop.image, result.box_text or "", result.micro_answer, args)
        if nll <= threshold:
            return DeeperZoom(
                threshold=threshold, micro_nll=nll, fired=False,
                reason=f"not needed: the zoomed answer's mean NLL {nll:.3f} is at most {threshold:g}",
            )  # fmt: skip
        location = engine.locate(crop.image, question)
        if location.box is None:
            return DeeperZoom(
                threshold=threshold, micro_nll=nll, fired=True, box_text=location.box_text,
                reason=f"no box inside the crop ({location.failure}); the pipeline's answer stands",
            )  # fmt: skip
        zoomed = engine.zoom(crop.image, location.box)
        deeper = self._crop(crop, zoomed.box, location.box_text)
        answer = engine.micro(crop.image, deeper.image, question, box_text=location.box_text, options=options)
        deeper_nll = self._micro_nll(crop.image, deeper.image, location.box_text, answer, args)
        usable = bool(answer.strip()) and (not options or option_letter(answer, options) is not None)
        chosen = usable and deeper_nll < nll
        final = (option_letter(answer, options) if options else answer) if chosen else None
        verdict = (
            f"the deeper answer's mean NLL {deeper_nll:.3f} is lower: it is the answer"
            if chosen else f"the deeper answer's mean NLL {deeper_nll:.3f} is not lower"
            + ("" if usable else " or it is not an answer") + "; the pipeline's answer stands"
        )  # fmt: skip
        return DeeperZoom(
            threshold=threshold, micro_nll=nll, fired=True,
            reason=f"the zoomed answer's mean NLL {nll:.3f} is above {threshold:g}; {verdict}",
            box_text=location.box_text, box=location.box, box_root=crop.frame.to_root(location.box),
            crop_box_root=deeper.region, crop_id=deeper.id, answer=final if chosen else answer,
            answer_nll=deeper_nll, chosen=chosen,
        )  # fmt: skip

    def _micro_nll(self, image, crop_image, box_text: str, answer: str, args: PipelineInput) -> float:
        """`answer`'s mean NLL in the micro context it was generated in (inf when empty)."""
        if not answer.strip():
            return float("inf")
        context = self.engine.micro_conversation(image, crop_image, args.question, box_text, args.options)
        return self.engine.backend.score(context, [answer])[0]


def located_boxes(location: Location) -> list[Box]:
    """Every box the locate step read, in order: `Location.boxes` when the engine reads several, else
    the one box (none when unreadable)."""
    boxes = getattr(location, "boxes", None)  # several boxes: once the engine's Location carries them
    if boxes:
        return list(boxes)
    return [] if location.box is None else [location.box]


def _contains(outer: Box, inner: Box, eps: float = 1e-6) -> bool:
    return (
        inner.x1 >= outer.x1 - eps and inner.y1 >= outer.y1 - eps
        and inner.x2 <= outer.x2 + eps and inner.y2 <= outer.y2 + eps
    )  # fmt: skip


def planner_box(values: Sequence[float], units: BoxUnits, image_size: tuple[int, int]) -> Box:
    """A planner's ``[x1, y1, x2, y2]`` in `units` as a box in image pixels, clipped to the image.

    Raises:
        ToolInputError: If the box is not four finite numbers, is inverted or empty, is out of the
            0..1 range for fractions, is smaller than a pixel (fractions passed as pixels?), or lies
            outside the image.
    """
    w, h = image_size
    values = list(values)
    if len(values) != 4 or not all(isinstance(v, int | float) and abs(v) < float("inf") for v in values):
        raise ToolInputError(f"box must be four finite numbers [x1, y1, x2, y2], got {values}")
    if units not in ("pixels", "fraction"):
        raise ToolInputError(f"box_units must be 'pixels' or 'fraction', not {units!r}")
    x1, y1, x2, y2 = (float(v) for v in values)
    if x2 <= x1 or y2 <= y1:
        raise ToolInputError(
            f"box {values} is empty or inverted: it must be [left, top, right, bottom] with right > left "
            "and bottom > top"
        )
    if units == "fraction":
        if not all(-0.01 <= v <= 1.01 for v in values):
            raise ToolInputError(
                f"box {values} has values outside 0..1 but box_units is 'fraction'; for pixels pass "
                "box_units='pixels'"
            )
        x1, x2, y1, y2 = x1 * w, x2 * w, y1 * h, y2 * h
    elif x2 - x1 < 1 and y2 - y1 < 1 and max(w, h) > 2:
        raise ToolInputError(
            f"box {values} in pixels is smaller than one pixel; if these are fractions of the image, "
            "pass box_units='fraction'"
        )
    cx1, cy1, cx2, cy2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(w)), min(y2, float(h))
    if cx2 <= cx1 or cy2 <= cy1:
        raise ToolInputError(f"box {values} ({units}) lies outside the {w}x{h} image")
    return Box(x1=cx1, y1=cy1, x2=cx2, y2=cy2)


__all__ = ["DEEPER_THRESHOLD", "Recalled", "RecallingMemory", "Toolbox", "located_boxes", "planner_box"]
