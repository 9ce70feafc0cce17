"""The DualFocus tool operations, framework-neutral: what the LangChain tools and the MCP server run.

A `Toolbox` holds one engine and one `ImageRegistry`. Each operation is one tool: it takes the tool's
validated input model (`df_agent.agents.inputs`), resolves the planner's image reference, runs the
engine's steps and returns a result (`df_agent.agents.answers`) whose `summary()` is the short text a
planner reads. Every operation checks the question against the engine's limits before any model work.
Planner mistakes (a bad reference, a region given twice, a box outside the image) raise a
`PlannerError`, which the adapters turn into tool errors. The memory is the engine's: `ask` looks up
exact repeats in it and logs to it, and `recall_visual_qa` reads it.

To watch the engine's steps, run an operation inside ``with toolbox.engine.observing(observer):``
(`df_agent.agents.specs.ToolSpec.call` does).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from df_agent.agents.answers import (
    ArbitrationAnswer,
    FocusedAnswer,
    GlobalAnswer,
    PastAnswer,
    PipelineAnswer,
    RecallAnswer,
    RegionAnswer,
)
from df_agent.agents.errors import ToolInputError
from df_agent.agents.inputs import ArbitrateInput, AskInput, BoxUnits, FocusedInput, RecallInput, ZoomInput
from df_agent.agents.registry import ImageRegistry, RegisteredImage
from df_agent.boxes import Box, format_box
from df_agent.engine import DualFocus


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
    """

    def __init__(self, engine: DualFocus, registry: ImageRegistry | None = None) -> None:
        self.engine = engine
        self.registry = registry if registry is not None else ImageRegistry()

    @property
    def memory(self) -> RecallingMemory | None:
        """The engine's memory when it can be searched (then `recall_visual_qa` is offered), else None."""
        memory = self.engine.memory
        return memory if isinstance(memory, RecallingMemory) else None

    def dualfocus_answer(self, args: AskInput) -> PipelineAnswer:
        """The whole pipeline: macro, locate, zoom, micro, vote; exact repeats come from the memory."""
        entry = self.registry.resolve(args.image)
        result = self.engine.ask(entry.image, args.question, options=args.options)
        crop_id = None
        if result.crop is not None and result.crop_box is not None:
            crop_id = self.registry.add_crop(
                result.crop, parent=entry, box=result.crop_box, box_text=result.box_text or ""
            ).id
        return PipelineAnswer(image_id=entry.id, crop_id=crop_id, result=result)

    def global_answer(self, args: AskInput) -> GlobalAnswer:
        """The macro step: the answer from the whole image."""
        self.engine.check_question(args.question, args.options)
        entry = self.registry.resolve(args.image)
        answer = self.engine.macro(entry.image, args.question, args.options)
        return GlobalAnswer(image_id=entry.id, question=args.question, options=args.options, answer=answer)

    def zoom_region(self, args: ZoomInput) -> RegionAnswer:
        """The locate and zoom steps; the crop is registered under a new id."""
        self.engine.check_question(args.question)
        entry = self.registry.resolve(args.image)
        picture = entry.image
        location = self.engine.locate(picture, args.question)
        region = RegionAnswer(
            image_id=entry.id,
            question=args.question,
            image_size=picture.size,
            box_text=location.box_text,
            box=location.box,
            failure=location.failure,
        )
        if location.box is None:
            return region
        zoomed = self.engine.zoom(picture, location.box)
        crop = self.registry.add_crop(zoomed.crop, parent=entry, box=zoomed.box, box_text=location.box_text)
        return region.model_copy(
            update={
                "box_normalized": location.box.normalized(picture.size),
                "crop_box": zoomed.box,
                "crop_box_normalized": zoomed.box.normalized(picture.size),
                "crop_id": crop.id,
                "crop": zoomed.crop,
            }
        )

    def focused_answer(self, args: FocusedInput) -> FocusedAnswer:
        """The micro step on a region given as a crop id or as a box."""
        self.engine.check_question(args.question, args.options)
        entry = self.registry.resolve(args.image)
        crop = self._region(entry, args.image, args.crop_id, args.box, args.box_units)
        answer = self.engine.micro(
            entry.image, crop.image, args.question, box_text=crop.box_text or "", options=args.options
        )
        return FocusedAnswer(
            image_id=entry.id, question=args.question, options=args.options, crop_id=crop.id,
            crop_box=crop.box, box_text=crop.box_text or "", answer=answer,
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
        crop = self._region(entry, args.image, args.crop_id, args.box, args.box_units)
        vote = self.engine.arbitrate(
            entry.image, crop.image, args.question, args.candidates,
            box_text=crop.box_text or "", method="official",
        )  # fmt: skip
        return ArbitrationAnswer(
            image_id=entry.id, question=args.question, crop_id=crop.id, crop_box=crop.box,
            arbitration=vote, answer=vote.answer,
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

    # -- regions ---------------------------------------------------------------------------------

    def _region(
        self,
        entry: RegisteredImage,
        image: str,
        crop_id: str | None,
        box: Sequence[float] | None,
        box_units: BoxUnits,
    ) -> RegisteredImage:
        """The crop a region names: a registered crop of this image, or a new crop of a planner's box."""
        if (crop_id is None) == (box is None):
            raise ToolInputError(
                "give the region either as crop_id (from zoom_region) or as box=[x1, y1, x2, y2]"
                + (", not both" if crop_id is not None else "")
            )
        if crop_id is not None:
            crop = self.registry.get(crop_id)
            if crop.source != "crop":
                raise ToolInputError(
                    f"{crop_id!r} is a whole image, not a crop; pass a crop id from zoom_region, or a box"
                )
            if crop.parent_hash != entry.hash:
                raise ToolInputError(
                    f"crop {crop_id!r} was cut from another image than {image!r}; pass the image it was cut "
                    "from, or give a box on this image instead"
                )
            return crop
        picture = entry.image
        region = planner_box(box, box_units, picture.size)  # type: ignore[arg-type]
        zoomed = self.engine.zoom(picture, region)
        backend = self.engine.backend
        box_text = format_box(region, backend.box_convention, picture.size, backend.input_size(picture))
        return self.registry.add_crop(zoomed.crop, parent=entry, box=zoomed.box, box_text=box_text)


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


__all__ = ["Recalled", "RecallingMemory", "Toolbox", "planner_box"]
