"""The six DualFocus tool operations, framework-neutral: shared by the LangChain tools and the MCP server.

A `Toolbox` holds one engine, one `ImageRegistry` and optionally one visual Q&A memory. Each method is
one tool: it resolves the planner's image reference, runs the engine's steps and returns a pydantic
result whose `summary()` is the short text a planner reads. Planner mistakes (a bad reference, a
region given twice, a box outside the image) raise `ImageReferenceError` or `ToolInputError`, which
the adapters turn into tool errors. `DESCRIPTIONS` (one per tool) and the argument types below carry
the planner-facing descriptions, read from `prompts/_tools/`, so both adapters describe every tool and
argument with the same words.

A `StepObserver` sees every engine step a method runs (macro, locate, zoom, micro, arbitrate) with its
inputs and outputs; the LangChain tools use one to emit nested child runs.
"""

from __future__ import annotations

import copy
import functools
import inspect
import io
import tomllib
from collections.abc import Sequence
from importlib import resources
from typing import Annotated, Any, Literal, Protocol

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from df_agent.agents.registry import ImageReferenceError, ImageRegistry, RegisteredImage
from df_agent.boxes import Box, format_box
from df_agent.engine import AnswerMemory, DualFocus
from df_agent.results import Arbitration, FocusResult

STEPS = ("macro", "locate", "zoom", "micro", "arbitrate")
PREVIEW_MAX_SIDE = 768

# -- what a planner reads: tool and argument descriptions, kept in prompts/_tools/ ------------------

_TOOL_NAMES = (
    "dualfocus_answer",
    "global_answer",
    "zoom_region",
    "focused_answer",
    "arbitrate_answers",
    "recall_visual_qa",
)
_TEXTS = resources.files("df_agent.prompts") / "_tools"

DESCRIPTIONS: dict[str, str] = {
    name: (_TEXTS / f"{name}.txt").read_text(encoding="utf-8").removesuffix("\n") for name in _TOOL_NAMES
}
_FIELDS: dict[str, str] = tomllib.loads((_TEXTS / "fields.toml").read_text(encoding="utf-8"))

ImageArg = Annotated[str, Field(min_length=1, description=_FIELDS["image"])]
QuestionArg = Annotated[str, Field(min_length=1, description=_FIELDS["question"])]
OptionsArg = Annotated[list[str] | None, Field(description=_FIELDS["options"])]
CropIdArg = Annotated[str | None, Field(description=_FIELDS["crop_id"])]
BoxArg = Annotated[list[float] | None, Field(min_length=4, max_length=4, description=_FIELDS["box"])]
BoxUnits = Literal["pixels", "fraction"]
BoxUnitsArg = Annotated[BoxUnits, Field(description=_FIELDS["box_units"])]
CandidatesArg = Annotated[list[str], Field(min_length=2, description=_FIELDS["candidates"])]
RecallQuestionArg = Annotated[str, Field(min_length=1, description=_FIELDS["recall_question"])]
RecallImageArg = Annotated[str | None, Field(description=_FIELDS["recall_image"])]
RecallKArg = Annotated[int, Field(ge=1, le=20, description=_FIELDS["recall_k"])]


class ToolInputError(ValueError):
    """A tool was called with arguments that do not fit together; the message says how to fix them."""


# -- watching the engine's steps -------------------------------------------------------------------


class StepRun(Protocol):
    """One running step, as a `StepObserver` tracks it."""

    def end(self, outputs: dict[str, Any]) -> None:
        """The step returned `outputs`."""
        ...

    def fail(self, error: BaseException) -> None:
        """The step raised `error`."""
        ...


class StepObserver(Protocol):
    """Sees each engine step start with its inputs, then end with its outputs (JSON-able dicts)."""

    def start(self, step: str, inputs: dict[str, Any]) -> StepRun:
        """Step `step` (one of `STEPS`) starts with `inputs`; returns the handle it ends through."""
        ...


def traced_engine(engine: DualFocus, observer: StepObserver) -> DualFocus:
    """A view of `engine` (same backend, prompts and settings) whose steps report to `observer`.

    Every step method (`STEPS`) of the view reports its inputs (images left out, boxes as dicts) and
    its outputs; `ask` on the view reports each step it runs, since it runs them through these methods.
    """
    traced = copy.copy(engine)
    for step in STEPS:
        setattr(traced, step, _traced_step(step, getattr(engine, step), observer))
    return traced


def _traced_step(step: str, method: Any, observer: StepObserver) -> Any:
    signature = inspect.signature(method)

    @functools.wraps(method)
    def run(*args: Any, **kwargs: Any) -> Any:
        arguments = signature.bind(*args, **kwargs).arguments
        inputs = {k: _jsonable(v) for k, v in arguments.items() if not isinstance(v, Image.Image)}
        handle = observer.start(step, inputs)
        try:
            result = method(*args, **kwargs)
        except BaseException as exc:
            handle.fail(exc)
            raise
        handle.end(_step_outputs(result))
        return result

    return run


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _step_outputs(result: Any) -> dict[str, Any]:
    if isinstance(result, str):
        return {"answer": result}
    outputs = result.model_dump(mode="json")
    if isinstance(result, Arbitration):
        outputs["answer"] = result.answer
    crop = getattr(result, "crop", None)
    if isinstance(crop, Image.Image):
        outputs["crop_size"] = list(crop.size)
    return outputs


# -- results: the artifact for programs, `summary()` for the planner --------------------------------


def _box_list(box: Box | None) -> str:
    return "none" if box is None else "[" + ", ".join(f"{v:.0f}" for v in box.as_tuple()) + "]"


def _fractions(values: Sequence[float] | None) -> str:
    return "none" if values is None else "[" + ", ".join(f"{v:.3f}" for v in values) + "]"


class GlobalAnswer(BaseModel):
    """The answer from the whole image (the macro step)."""

    image_id: str
    question: str
    options: list[str] | None = None
    answer: str

    def summary(self) -> str:
        """The text a planner reads."""
        return f"Answer from the whole image: {self.answer}"


class RegionAnswer(BaseModel):
    """The region a question is about, as the model located it, and the crop made from it."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    image_id: str
    question: str
    image_size: tuple[int, int] = Field(description="(width, height) of the original image.")
    box_text: str = Field(description="The model's reply to the box request, verbatim.")
    box: Box | None = Field(description="The located region in original-image pixels; None if unreadable.")
    box_normalized: tuple[float, float, float, float] | None = Field(
        default=None, description="The located region as fractions of the image's width and height."
    )
    crop_box: Box | None = Field(default=None, description="The square region actually cropped, pixels.")
    crop_box_normalized: tuple[float, float, float, float] | None = None
    crop_id: str | None = Field(default=None, description="The crop's image id, for later calls.")
    failure: str | None = Field(default=None, description="Why no box could be read, if none was.")
    crop: Image.Image | None = Field(default=None, exclude=True, repr=False)

    def summary(self) -> str:
        """The text a planner reads."""
        w, h = self.image_size
        if self.box is None:
            return (
                f"The model gave no readable region ({self.failure}); its reply was {self.box_text!r}. "
                f"Choose a region yourself and call focused_answer with box=[x1, y1, x2, y2] in pixels of "
                f"the {w}x{h} image (or box_units='fraction')."
            )
        return (
            f"Region for the question: box {_box_list(self.box)} in pixels of the {w}x{h} image "
            f"(fractions {_fractions(self.box_normalized)}); model's box text {self.box_text!r}. "
            f"Cropped the square region {_box_list(self.crop_box)} as crop id {self.crop_id!r}: pass it as "
            "crop_id to focused_answer or arbitrate_answers."
        )


class FocusedAnswer(BaseModel):
    """The answer from the full image and the crop of one region (the micro step)."""

    image_id: str
    question: str
    options: list[str] | None = None
    crop_id: str
    crop_box: Box = Field(description="The cropped region in original-image pixels.")
    box_text: str = Field(description="The box as the model's conversation showed it.")
    answer: str

    def summary(self) -> str:
        """The text a planner reads."""
        return (
            f"Answer from the zoomed view of region {_box_list(self.crop_box)} px "
            f"(crop id {self.crop_id!r}): {self.answer}"
        )


class ArbitrationAnswer(BaseModel):
    """The perplexity vote between candidates in the zoomed context of one region."""

    image_id: str
    question: str
    crop_id: str
    crop_box: Box
    arbitration: Arbitration
    answer: str = Field(description="The winning candidate.")

    def summary(self) -> str:
        """The text a planner reads."""
        vote = self.arbitration
        scores = ", ".join(f"{c!r} {s:.3f}" for c, s in zip(vote.candidates, vote.scores, strict=True))
        return (
            f"Winner: {self.answer!r}. Scores (mean negative log-likelihood in the zoomed context of region "
            f"{_box_list(self.crop_box)} px, lower is more plausible): {scores}."
        )


class PipelineAnswer(BaseModel):
    """The whole DualFocus pipeline's result, with the ids a planner can refer to afterwards."""

    image_id: str
    crop_id: str | None = Field(default=None, description="The id of the crop looked at, if any.")
    result: FocusResult

    def summary(self) -> str:
        """The text a planner reads."""
        r = self.result
        w, h = r.image_size
        why = r.fallback or "it won the perplexity vote"
        lines = [f"Answer: {r.answer}"]
        if r.cached:
            lines.append("Answered from memory: the same question about this image was answered before.")
        lines.append(f"Chosen view: {r.path} ({why}).")
        if r.micro_answer is not None:
            lines.append(f"Whole-image answer: {r.macro_answer!r}; zoomed answer: {r.micro_answer!r}.")
        if r.crop_box is not None:
            lines.append(
                f"Region looked at: {_box_list(r.crop_box)} in pixels of the {w}x{h} image "
                f"(crop id {self.crop_id!r})."
            )
        if r.scores:
            scores = ", ".join(f"{k} {v:.3f}" for k, v in r.scores.items())
            lines.append(f"Vote (mean negative log-likelihood, lower wins): {scores}.")
        return "\n".join(lines)


class PastAnswer(BaseModel):
    """A logged answer found by recall, its distance to the query, and the id of its image if held."""

    record_id: str
    distance: float = Field(description="Cosine distance to the query; smaller is more similar.")
    image_id: str | None = Field(default=None, description="The id of its image, if the registry holds it.")
    result: FocusResult


class RecallAnswer(BaseModel):
    """Past questions and answers similar to a question."""

    question: str
    image_id: str | None = Field(default=None, description="The image the search was limited to, if any.")
    records: list[PastAnswer]

    def summary(self) -> str:
        """The text a planner reads."""
        scope = f" about image {self.image_id!r}" if self.image_id else ""
        if not self.records:
            return f"No past questions{scope} are similar to {self.question!r}."
        lines = [f"{len(self.records)} past answer(s){scope} similar to {self.question!r}, closest first:"]
        for i, past in enumerate(self.records, 1):
            image = f", image {past.image_id!r}" if past.image_id and not self.image_id else ""
            lines.append(
                f"{i}. Q: {past.result.question!r} A: {past.result.answer!r} "
                f"(distance {past.distance:.3f}{image}, {past.result.created_at:%Y-%m-%d})"
            )
        return "\n".join(lines)


class Recalled(Protocol):
    """One record `recall` found (`df_agent.memory.Recollection`): the logged record and its distance."""

    record: Any
    distance: float


class VisualMemory(AnswerMemory, Protocol):
    """What the toolbox needs of a visual Q&A memory (`df_agent.memory.VisualQAMemory` has it)."""

    def recall(self, query: str, image: Any = None, k: int = 5) -> Sequence[Recalled]:
        """The records closest in meaning to `query`, optionally for one image hash, closest first."""
        ...


def preview_png(image: Image.Image, max_side: int = PREVIEW_MAX_SIDE) -> bytes:
    """`image` as PNG bytes, scaled down (never up) so that its longer side is at most `max_side`."""
    if max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# -- the operations --------------------------------------------------------------------------------


class Toolbox:
    """The DualFocus tool operations over one engine, one image registry and optionally one memory.

    Args:
        engine: The engine every operation runs on (one engine is safe to share between threads when
            its backend is, as `HFBackend` is).
        registry: Where image ids live and how references resolve; default: no paths, no URLs.
        memory: A visual Q&A memory (default: the engine's): `dualfocus_answer` answers exact repeats
            from it and logs to it, and `recall_visual_qa` reads it.
    """

    def __init__(
        self, engine: DualFocus, registry: ImageRegistry | None = None, memory: VisualMemory | None = None
    ) -> None:
        self.engine = engine
        self.registry = registry if registry is not None else ImageRegistry()
        self.memory = memory if memory is not None else getattr(engine, "memory", None)

    def _engine(self, observer: StepObserver | None) -> DualFocus:
        """The engine with this toolbox's memory attached, its steps reporting to `observer`."""
        engine = self.engine
        if getattr(engine, "memory", None) is not self.memory:
            engine = copy.copy(engine)
            engine.memory = self.memory
        return engine if observer is None else traced_engine(engine, observer)

    def dualfocus_answer(
        self,
        image: str,
        question: str,
        options: Sequence[str] | None = None,
        *,
        observer: StepObserver | None = None,
    ) -> PipelineAnswer:
        """The whole pipeline: macro, locate, zoom, micro, vote; exact repeats come from the memory."""
        entry = self.registry.resolve(image)
        result = self._engine(observer).ask(entry.image, _question(question), options=_options(options))
        crop_id = None
        if result.crop is not None and result.crop_box is not None:
            crop_id = self.registry.add_crop(
                result.crop, parent=entry, box=result.crop_box, box_text=result.box_text or ""
            ).id
        return PipelineAnswer(image_id=entry.id, crop_id=crop_id, result=result)

    def global_answer(
        self,
        image: str,
        question: str,
        options: Sequence[str] | None = None,
        *,
        observer: StepObserver | None = None,
    ) -> GlobalAnswer:
        """The macro step: the answer from the whole image."""
        entry = self.registry.resolve(image)
        question, options = _question(question), _options(options)
        answer = self._engine(observer).macro(entry.image, question, options)
        return GlobalAnswer(image_id=entry.id, question=question, options=options, answer=answer)

    def zoom_region(self, image: str, question: str, *, observer: StepObserver | None = None) -> RegionAnswer:
        """The locate and zoom steps; the crop is registered under a new id."""
        entry = self.registry.resolve(image)
        engine = self._engine(observer)
        picture = entry.image
        location = engine.locate(picture, _question(question))
        region = RegionAnswer(
            image_id=entry.id,
            question=question,
            image_size=picture.size,
            box_text=location.box_text,
            box=location.box,
            failure=location.failure,
        )
        if location.box is None:
            return region
        zoomed = engine.zoom(picture, location.box)
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

    def focused_answer(
        self,
        image: str,
        question: str,
        *,
        crop_id: str | None = None,
        box: Sequence[float] | None = None,
        box_units: BoxUnits = "pixels",
        options: Sequence[str] | None = None,
        observer: StepObserver | None = None,
    ) -> FocusedAnswer:
        """The micro step on a region given as a crop id or as a box."""
        entry = self.registry.resolve(image)
        engine = self._engine(observer)
        crop = self._region(engine, entry, image, crop_id, box, box_units)
        options = _options(options)
        answer = engine.micro(
            entry.image, crop.image, _question(question), box_text=crop.box_text or "", options=options
        )
        return FocusedAnswer(
            image_id=entry.id, question=question, options=options, crop_id=crop.id,
            crop_box=crop.box, box_text=crop.box_text or "", answer=answer,
        )  # fmt: skip

    def arbitrate_answers(
        self,
        image: str,
        question: str,
        candidates: Sequence[str],
        *,
        crop_id: str | None = None,
        box: Sequence[float] | None = None,
        box_units: BoxUnits = "pixels",
        observer: StepObserver | None = None,
    ) -> ArbitrationAnswer:
        """The official perplexity vote among `candidates` in the micro context of a region."""
        candidates = [c.strip() if isinstance(c, str) else c for c in candidates]
        if len(candidates) < 2 or not all(isinstance(c, str) and c for c in candidates):
            raise ToolInputError("candidates must be two or more non-empty answers to compare")
        entry = self.registry.resolve(image)
        engine = self._engine(observer)
        crop = self._region(engine, entry, image, crop_id, box, box_units)
        vote = engine.arbitrate(
            entry.image, crop.image, _question(question), candidates,
            box_text=crop.box_text or "", method="official",
        )  # fmt: skip
        return ArbitrationAnswer(
            image_id=entry.id, question=question, crop_id=crop.id, crop_box=crop.box,
            arbitration=vote, answer=vote.answer,
        )  # fmt: skip

    def recall_visual_qa(self, question: str, image: str | None = None, k: int = 5) -> RecallAnswer:
        """Similar past questions and answers from the memory, optionally about one image only."""
        from df_agent.memory import MemoryUnavailableError

        if self.memory is None:
            raise ToolInputError("no visual Q&A memory is attached, so there is nothing to recall")
        if not 1 <= k <= 20:
            raise ToolInputError(f"k must be between 1 and 20, not {k}")
        entry = self.registry.resolve(image) if image else None
        try:
            found = self.memory.recall(_question(question), image=entry.hash if entry else None, k=k)
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
        return RecallAnswer(question=question, image_id=entry.id if entry else None, records=records)

    # -- regions ---------------------------------------------------------------------------------

    def _region(
        self,
        engine: DualFocus,
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
        zoomed = engine.zoom(picture, region)
        backend = engine.backend
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


def _question(question: str) -> str:
    if not isinstance(question, str) or not question.strip():
        raise ToolInputError("question must be a non-empty question about the image")
    return question.strip()


def _options(options: Sequence[str] | None) -> list[str] | None:
    if not options:
        return None
    if not all(isinstance(o, str) and o.strip() for o in options):
        raise ToolInputError("options must be non-empty texts")
    if len(options) > 26:
        raise ToolInputError(f"at most 26 options (A..Z) are supported, got {len(options)}")
    return [o.strip() for o in options]


PLANNER_ERRORS = (ImageReferenceError, ToolInputError)

__all__ = [
    "DESCRIPTIONS",
    "PLANNER_ERRORS",
    "PREVIEW_MAX_SIDE",
    "STEPS",
    "ArbitrationAnswer",
    "BoxArg",
    "BoxUnits",
    "BoxUnitsArg",
    "CandidatesArg",
    "CropIdArg",
    "FocusedAnswer",
    "GlobalAnswer",
    "ImageArg",
    "OptionsArg",
    "PastAnswer",
    "PipelineAnswer",
    "QuestionArg",
    "RecallAnswer",
    "RecallImageArg",
    "RecallKArg",
    "RecallQuestionArg",
    "Recalled",
    "RegionAnswer",
    "StepObserver",
    "StepRun",
    "ToolInputError",
    "Toolbox",
    "VisualMemory",
    "planner_box",
    "preview_png",
    "traced_engine",
]
