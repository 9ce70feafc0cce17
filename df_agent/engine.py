"""The DualFocus protocol: macro answer, region, zoom, micro answer, perplexity vote.

Each step is a method named after it; `ask` runs them in the official order and
returns the whole trace. See shared/dualfocus.md for the protocol this follows.
"""

from __future__ import annotations

import math
import re
import string
import time
import weakref
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path as FilePath
from typing import TYPE_CHECKING, Protocol

from PIL import Image

from df_agent.backends.base import Backend, Conversation, ScoringUnavailableError
from df_agent.boxes import Box, NoBox, crop, parse_box, zoom_box
from df_agent.images import image_hash, load_image
from df_agent.prompt_sets import OPTION_LETTERS, PromptSet, load_prompts
from df_agent.results import Arbitration, ArbitrationMethod, FocusResult, Location, Mode, Zoom

if TYPE_CHECKING:
    from collections.abc import Iterator

ImageInput = str | FilePath | bytes | Image.Image
ARBITRATION_METHODS: tuple[ArbitrationMethod, ...] = ("official", "own_context", "average")
MODES: tuple[Mode, ...] = ("dualfocus", "macro", "micro", "auto")
LOCATE_MAX_NEW_TOKENS = 64
# mode="auto" skips the zoom when the macro answer's own mean NLL is at most this: calibrated for the
# shipped model on FocusShapes (bench/auto.py, README "Performance"); recalibrate for other models.
AUTO_THRESHOLD = 0.44


class AnswerMemory(Protocol):
    """A store of past answers that the engine consults before running and logs after."""

    def lookup(
        self,
        image: str,
        question: str,
        model_id: str,
        mode: Mode,
        options: Sequence[str] | None = None,
        *,
        arbitration: ArbitrationMethod | None = None,
    ) -> FocusResult | None:
        """The remembered answer to exactly this asking (`image` is the image's content hash), or None."""
        ...

    def log(self, result: FocusResult) -> str:
        """Store `result`; return its record id once it is durable."""
        ...


class DualFocus:
    """DualFocus over any backend with `generate` and `score`.

    Args:
        backend: The model (see `df_agent.backends.base.Backend`).
        prompts: Prompt set; defaults to the backend's `prompt_family`.
        margin: Pixels added on every side of the squared region (official: 25).
        min_side: Minimum crop side in pixels (our deviation from the official code, which has none).
        max_new_tokens: Token budget of each generated answer (official: 128).
        arbitration: Default vote: "official" (both candidates scored in the micro context),
            "own_context" (each in the context it was generated in) or "average" (each
            candidate's score averaged over the macro and micro contexts).
        memory: Where `ask` looks up exact repeats and logs answers (e.g.
            `df_agent.memory.VisualQAMemory`); None: no memory.
        auto_threshold: With ``mode="auto"``, the macro answer stands without a zoom when its own
            mean NLL is at most this (default: calibrated for the shipped model).
    """

    def __init__(
        self,
        backend: Backend,
        *,
        prompts: PromptSet | None = None,
        margin: int = 25,
        min_side: int = 32,
        max_new_tokens: int = 128,
        arbitration: ArbitrationMethod = "official",
        memory: AnswerMemory | None = None,
        auto_threshold: float = AUTO_THRESHOLD,
    ) -> None:
        if arbitration not in ARBITRATION_METHODS:
            raise ValueError(f"arbitration must be one of {ARBITRATION_METHODS}, not {arbitration!r}")
        if margin < 0 or min_side < 0 or max_new_tokens < 1:
            raise ValueError("margin and min_side must be >= 0 and max_new_tokens >= 1")
        self.backend = backend
        self.prompts = prompts or load_prompts(backend.prompt_family)
        self.margin = margin
        self.min_side = min_side
        self.max_new_tokens = max_new_tokens
        self.arbitration = arbitration
        self.memory = memory
        self.auto_threshold = auto_threshold
        # images this engine loaded itself, by id: steps called from `ask` reuse them uncopied
        self._loaded: weakref.WeakValueDictionary[int, Image.Image] = weakref.WeakValueDictionary()

    def _picture(self, image: ImageInput) -> Image.Image:
        """`image` loaded with `load_image`, once: an image this engine loaded passes through."""
        if isinstance(image, Image.Image) and self._loaded.get(id(image)) is image:
            return image
        picture = load_image(image)
        self._loaded[id(picture)] = picture
        return picture

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | FilePath | None = None,
        *,
        device: str | None = None,
        dtype: str | None = None,
        **engine_kwargs: object,
    ) -> DualFocus:
        """An engine over a transformers checkpoint: the shipped model when no path is given.

        Args:
            path_or_id: A local folder or a hub id (the hub needs network access).
            device: "cpu", "cuda", "cuda:1"...; default cuda when present, else cpu.
            dtype: "float32", "bfloat16", "float16"; default bfloat16 on cuda, float32 on cpu.
            **engine_kwargs: Passed to `DualFocus` (margin, min_side, arbitration, ...).
        """
        from df_agent.backends.hf import HFBackend

        backend = HFBackend.from_pretrained(path_or_id, device=device, dtype=dtype)
        return cls(backend, **engine_kwargs)  # type: ignore[arg-type]

    # -- conversations -------------------------------------------------------------------------

    def macro_conversation(
        self, image: Image.Image, question: str, options: Sequence[str] | None
    ) -> Conversation:
        """Turn 1 of the macro path: the image and the question (with options)."""
        text = self.prompts.macro.format(question=self.prompts.with_options(question, options))
        return Conversation().user(text, [image])

    def locate_conversation(self, image: Image.Image, question: str) -> Conversation:
        """The box request: the image and the bare question."""
        return Conversation().user(self.prompts.locate.format(question=question), [image])

    def micro_conversation(
        self,
        image: Image.Image,
        crop_image: Image.Image,
        question: str,
        box_text: str,
        options: Sequence[str] | None = None,
        *,
        template: str | None = None,
    ) -> Conversation:
        """Box request, the model's box text, then [crop] and the combine-question: images full, crop."""
        turn2 = (template or self.prompts.micro).format(question=self.prompts.with_options(question, options))
        return self.locate_conversation(image, question).assistant(box_text).user(turn2, [crop_image])

    def score_conversation(
        self, image: Image.Image, crop_image: Image.Image, question: str, box_text: str
    ) -> Conversation:
        """The official vote's context: the micro conversation worded with the short-answer hint."""
        return self.micro_conversation(image, crop_image, question, box_text, template=self.prompts.score)

    # -- the steps -----------------------------------------------------------------------------

    def macro(self, image: ImageInput, question: str, options: Sequence[str] | None = None) -> str:
        """Step 1: the answer from the whole image."""
        conversation = self.macro_conversation(self._picture(image), question, options)
        return self.backend.generate(conversation, max_new_tokens=self.max_new_tokens)

    def locate(self, image: ImageInput, question: str) -> Location:
        """Step 2: ask for the region the question is about and read the box in original pixels."""
        picture = self._picture(image)
        box_text = self.backend.generate(
            self.locate_conversation(picture, question), max_new_tokens=LOCATE_MAX_NEW_TOKENS
        )
        input_size = self.backend.input_size(picture)
        parsed = parse_box(box_text, self.backend.box_convention, picture.size, input_size)
        if isinstance(parsed, NoBox):
            return Location(box_text=box_text, box=None, failure=parsed.reason)
        return Location(box_text=box_text, box=parsed)

    def confidence(
        self, image: ImageInput, question: str, answer: str, options: Sequence[str] | None = None
    ) -> float:
        """The macro answer's own mean NLL in the macro context: lower is more confident (inf if empty)."""
        if not answer.strip():
            return math.inf
        conversation = self.macro_conversation(self._picture(image), question, options)
        return self.backend.score(conversation, [answer])[0]

    def zoom(self, image: ImageInput, box: Box) -> Zoom:
        """Step 3: square the box, add the margin, enforce the minimum side, clip, crop."""
        picture = self._picture(image)
        region = zoom_box(box, picture.size, margin=self.margin, min_side=self.min_side)
        return Zoom(box=region, crop=crop(picture, region))

    def micro(
        self,
        image: ImageInput,
        crop_image: Image.Image,
        question: str,
        *,
        box_text: str,
        options: Sequence[str] | None = None,
    ) -> str:
        """Step 4: the answer from [full image, crop], continuing the box conversation."""
        conversation = self.micro_conversation(self._picture(image), crop_image, question, box_text, options)
        return self.backend.generate(conversation, max_new_tokens=self.max_new_tokens)

    def arbitrate(
        self,
        image: ImageInput,
        crop_image: Image.Image,
        question: str,
        candidates: Sequence[str],
        *,
        box_text: str,
        method: ArbitrationMethod | None = None,
        options: Sequence[str] | None = None,
    ) -> Arbitration:
        """Step 5: the perplexity vote; the candidate with the lowest mean NLL wins.

        Args:
            candidates: Two or more answers. With "own_context" exactly two: [macro, micro].
            method: "official", "own_context" or "average"; default the engine's.
            options: The multiple-choice options, for the macro context of the
                "own_context" and "average" methods.
        """
        method = method or self.arbitration
        if method not in ARBITRATION_METHODS:
            raise ValueError(f"arbitration method must be one of {ARBITRATION_METHODS}, not {method!r}")
        if len(candidates) < 2:
            raise ValueError("arbitration needs at least two candidates")
        picture = self._picture(image)
        scoring = self.score_conversation(picture, crop_image, question, box_text)
        if method == "official":
            scores = self.backend.score(scoring, candidates)
        elif method == "own_context":
            if len(candidates) != 2:
                raise ValueError("own_context arbitration takes exactly two candidates: [macro, micro]")
            macro_context = self.macro_conversation(picture, question, options)
            micro_context = self.micro_conversation(picture, crop_image, question, box_text, options)
            scores = [
                self.backend.score(macro_context, [candidates[0]])[0],
                self.backend.score(micro_context, [candidates[1]])[0],
            ]
        else:
            macro_context = self.macro_conversation(picture, question, options)
            in_macro = self.backend.score(macro_context, candidates)
            in_micro = self.backend.score(scoring, candidates)
            scores = [(a + b) / 2 for a, b in zip(in_macro, in_micro, strict=True)]
        winner = min(range(len(scores)), key=scores.__getitem__)
        return Arbitration(method=method, candidates=list(candidates), scores=scores, winner=winner)

    # -- the whole protocol --------------------------------------------------------------------

    def ask(
        self,
        image: ImageInput,
        question: str,
        *,
        options: Sequence[str] | None = None,
        mode: Mode = "dualfocus",
        arbitration: ArbitrationMethod | None = None,
        use_memory: bool = True,
    ) -> FocusResult:
        """Answer `question` about `image` and return the full trace.

        Args:
            image: A path, bytes, a base64 data URI or a PIL image.
            question: The question, without options.
            options: Multiple-choice options; answers are then reduced to option letters.
            mode: "dualfocus" (macro, zoom, micro, vote), "macro" (whole image only),
                "micro" (zoomed answer only; falls back to macro when no box is found) or
                "auto" (dualfocus, unless the macro answer is confident: see `confidence`).
            arbitration: The vote's method for this call; default the engine's.
            use_memory: With a memory attached, answer an exact repeat from it (``cached=True``,
                timings of the lookup only) and log every new answer; False skips both.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if not isinstance(question, str) or not question.strip():
            raise ValueError("question must be a non-empty string")
        options = list(options) if options else None
        picture = self._picture(image)
        digest = image_hash(picture)
        method = arbitration or self.arbitration
        memory = self.memory if use_memory else None
        timings: dict[str, float] = {}
        if memory is not None:
            with _timed(timings, "lookup"):
                remembered = memory.lookup(
                    digest, question, self.backend.model_id, mode, options, arbitration=method
                )
            if remembered is not None:
                timings["total"] = timings["lookup"]
                return remembered.model_copy(update={"cached": True, "timings": timings})
        trace: dict[str, object] = {}
        with _timed(timings, "total"):
            answer, path = self._run(picture, question, options, mode, method, timings, trace)
        result = FocusResult(
            question=question,
            options=options,
            image_hash=digest,
            image_size=picture.size,
            model_id=self.backend.model_id,
            mode=mode,
            answer=answer,
            path=path,  # type: ignore[arg-type]
            timings=timings,
            warnings=self.backend.input_warnings(picture, question),
            **trace,  # type: ignore[arg-type]
        )
        if memory is not None:
            memory.log(result)
        return result

    def _run(
        self,
        picture: Image.Image,
        question: str,
        options: list[str] | None,
        mode: Mode,
        method: ArbitrationMethod,
        timings: dict[str, float],
        trace: dict[str, object],
    ) -> tuple[str, str]:
        """The steps of `ask`; fills `timings` and `trace`, returns (answer, path)."""
        if mode != "micro":
            with _timed(timings, "macro"):
                trace["macro_answer"] = self.macro(picture, question, options)
        if mode == "macro":
            return trace["macro_answer"], "macro"  # type: ignore[return-value]
        if mode == "auto":
            macro_answer: str = trace["macro_answer"]  # type: ignore[assignment]
            with _timed(timings, "confidence"):
                trace["macro_nll"] = nll = self.confidence(picture, question, macro_answer, options)
            if nll <= self.auto_threshold:
                trace["fallback"] = (
                    f"confident macro answer (mean NLL {nll:.4g} <= {self.auto_threshold:g}); no zoom"
                )
                return macro_answer, "macro"

        with _timed(timings, "locate"):
            location = self.locate(picture, question)
        trace.update(box_text=location.box_text, box=location.box)
        if location.box is None:
            if "macro_answer" not in trace:
                with _timed(timings, "macro"):
                    trace["macro_answer"] = self.macro(picture, question, options)
            trace["fallback"] = f"no box: {location.failure}; the macro answer stands"
            return trace["macro_answer"], "macro"  # type: ignore[return-value]

        with _timed(timings, "zoom"):
            zoomed = self.zoom(picture, location.box)
        with _timed(timings, "micro"):
            micro_answer = self.micro(
                picture, zoomed.crop, question, box_text=location.box_text, options=options
            )
        trace.update(crop_box=zoomed.box, crop=zoomed.crop, micro_answer=micro_answer)
        if mode == "micro":
            return micro_answer, "micro"

        with _timed(timings, "arbitrate"):
            return self._vote(
                picture, zoomed.crop, question, options, trace["macro_answer"], micro_answer,  # type: ignore[arg-type]
                box_text=location.box_text, method=method, trace=trace,
            )  # fmt: skip

    def _vote(
        self,
        image: Image.Image,
        crop_image: Image.Image,
        question: str,
        options: list[str] | None,
        macro_answer: str,
        micro_answer: str,
        *,
        box_text: str,
        method: ArbitrationMethod,
        trace: dict[str, object],
    ) -> tuple[str, str]:
        """Pick between the two candidates as dualfocus.md steps 5 and 6 say."""
        if options:
            macro_letter = option_letter(macro_answer, options)
            micro_letter = option_letter(micro_answer, options)
            if macro_letter is None and micro_letter is None:
                trace["fallback"] = "neither answer is a valid option letter; the macro answer stands"
                return macro_answer, "macro"
            if micro_letter is None or macro_letter == micro_letter:
                if macro_letter == micro_letter:
                    trace["fallback"] = "both answers chose the same option; no vote needed"
                else:
                    trace["fallback"] = "only the macro answer is a valid option letter"
                return macro_letter, "macro"  # type: ignore[return-value]
            if macro_letter is None:
                trace["fallback"] = "only the micro answer is a valid option letter"
                return micro_letter, "micro"
            pair = [options[OPTION_LETTERS.index(macro_letter)], options[OPTION_LETTERS.index(micro_letter)]]
            letters = [macro_letter, micro_letter]
        else:
            if _normalise(macro_answer) == _normalise(micro_answer):
                trace["fallback"] = "both answers agree; no vote needed"
                return macro_answer, "macro"
            pair = [macro_answer, micro_answer]
            letters = pair
        try:
            vote = self.arbitrate(
                image, crop_image, question, pair, box_text=box_text, method=method, options=options
            )
        except ScoringUnavailableError as err:
            trace["fallback"] = (
                f"the backend could not score the candidates, so no vote: {err}; the macro answer stands"
            )
            return letters[0], "macro"
        trace.update(scores={"macro": vote.scores[0], "micro": vote.scores[1]}, arbitration=method)
        return letters[vote.winner], ("macro", "micro")[vote.winner]


def option_letter(answer: str, options: Sequence[str]) -> str | None:
    """The option letter an answer picks ("B", "(B)", "B. red", or an option's own text), or None."""
    letters = OPTION_LETTERS[: len(options)]
    text = answer.strip()
    match = re.match(r"^\(?([A-Z])\)?(?=$|[.:)\s,])", text)
    if match and match.group(1) in letters:
        return match.group(1)
    for letter, option in zip(letters, options, strict=False):
        if _normalise(text) == _normalise(option):
            return letter
    return None


def _normalise(answer: str) -> str:
    return answer.strip().strip(string.punctuation + " ").lower()


@contextmanager
def _timed(timings: dict[str, float], step: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[step] = timings.get(step, 0.0) + time.perf_counter() - start


__all__ = [
    "ARBITRATION_METHODS",
    "AUTO_THRESHOLD",
    "LOCATE_MAX_NEW_TOKENS",
    "MODES",
    "AnswerMemory",
    "DualFocus",
    "ImageInput",
    "option_letter",
]
