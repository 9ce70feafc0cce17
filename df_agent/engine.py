"""The DualFocus protocol: macro answer, region, zoom, micro answer, vote.

Each step is a method named after it; `ask` runs them in the official order and returns the whole
trace. The protocol as implemented, and where it deviates from the official code, is in
docs/protocol.md.
"""

from __future__ import annotations

import math
import re
import string
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path as FilePath
from typing import Any, Protocol

from PIL import Image

from df_agent.backends.base import (
    Backend,
    Conversation,
    Generation,
    GuessRejected,
    Request,
    ScoringUnavailableError,
)
from df_agent.boxes import Box, BoxError, NoBox, crop, read_boxes, readable_boxes, zoom_box
from df_agent.frames import Frame
from df_agent.images import image_hash, load_image
from df_agent.observers import StepObserver
from df_agent.prompt_sets import OPTION_LETTERS, PromptSet, load_prompts
from df_agent.results import (
    Arbitration,
    ArbitrationMethod,
    FocusRegion,
    FocusResult,
    Location,
    Mode,
    Path,
    TileSearch,
    UnscoredVote,
    Vote,
    Zoom,
)
from df_agent.search import SEARCH_OVERLAP, SEARCH_TILE_SIDE, find_tile

ImageInput = str | FilePath | bytes | Image.Image
# What the micro step shows after the full image: the crop, or one crop per region in order.
Crops = Image.Image | Sequence[Image.Image]
ARBITRATION_METHODS: tuple[ArbitrationMethod, ...] = ("official", "own_context", "average")
UNSCORED_VOTES: tuple[UnscoredVote, ...] = ("micro_policy", "judge")
MODES: tuple[Mode, ...] = ("dualfocus", "macro", "micro", "auto", "search")
LOCATE_MAX_NEW_TOKENS = 64
JUDGE_MAX_NEW_TOKENS = 8
# mode="auto" skips the zoom when the macro answer's own mean NLL is at most this: calibrated for the
# shipped model on FocusShapes (bench/auto.py, README "Performance"); recalibrate for other models.
AUTO_THRESHOLD = 0.44
# The vote for backends that report no log-probabilities, chosen by measurement on the shipped model
# (README "Performance": micro policy against the judge turn on held-out FocusShapes).
UNSCORED_VOTE: UnscoredVote = "micro_policy"
# Input limits, checked before any model work (each overridable on `DualFocus`).
MAX_QUESTION_CHARS = 2000
MAX_OPTION_CHARS = 500


class InputLimitError(ValueError):
    """An input exceeds one of the engine's limits, or has the wrong type; `limit` names the setting."""

    def __init__(self, message: str, *, limit: str) -> None:
        super().__init__(message)
        self.limit = limit


class QuestionTooLongError(InputLimitError):
    """The question (with its options) is longer than `max_question_chars` or the model's context."""


class TooManyOptionsError(InputLimitError):
    """More options than there are option letters."""


class InvalidOptionError(InputLimitError):
    """An option that is not a non-empty string or is longer than `max_option_chars`, or a candidate
    answer that is not a non-empty string."""


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


@dataclass
class _Run:
    """One attempt at one question: its timings and the trace fields of its result."""

    timings: dict[str, float] = field(default_factory=dict)
    trace: dict[str, Any] = field(default_factory=dict)
    macro: Generation | None = None
    micro: Generation | None = None
    model_calls: int = 0


# The attempt `ask` is running in this context (steps record their seconds into it).
_RUN: ContextVar[_Run | None] = ContextVar("df_agent_run", default=None)


class DualFocus:
    """DualFocus over any `Backend`: the one engine, fast where the backend offers a session.

    Each question runs inside ``backend.session(speculate=True)`` (a backend without that ability
    shares nothing, at no cost); a guess the backend has to take back (`GuessRejected`) makes the
    question run again in a plain ``backend.session()``. The macro answer and the box request go to
    the backend together (`Backend.generate_many`), so a backend may decode them side by side.

    The vote follows `backend.abilities`: with prompt log-probabilities the configured perplexity
    vote (`arbitration`); with generation log-probabilities only, each answer's own mean NLL as it
    was generated (no extra request); with neither, `unscored_vote`. `FocusResult.vote` and
    `vote_reason` say which ran and why.

    Args:
        backend: The model (see `df_agent.backends.base.Backend`).
        prompts: Prompt set; defaults to the backend's `prompt_family`.
        margin: Pixels added on every side of the squared region (official: 25).
        min_side: Minimum crop side in pixels (our deviation from the official code, which has none).
        max_new_tokens: Token budget of each generated answer (official: 128).
        arbitration: The perplexity vote where the backend scores: "official" (both candidates
            scored in the micro context), "own_context" (each in the context it was generated in)
            or "average" (each candidate's score averaged over the macro and micro contexts).
        unscored_vote: Where the backend reports no log-probabilities: "micro_policy" (the micro
            answer whenever a box was read: it saw both views) or "judge" (one more generation
            shows both views and both answers and asks the model to pick one).
        memory: Where `ask` looks up exact repeats and logs answers (e.g.
            `df_agent.memory.VisualQAMemory`); None: no memory.
        auto_threshold: With ``mode="auto"``, the macro answer stands without a zoom when its own
            mean NLL is at most this (default: calibrated for the shipped model).
        session: False runs the plain path: no backend session, one generation per request, in the
            official order (for comparisons; the answers are the same).
        observers: Told about every step of every call (see `df_agent.observers`); add one for the
            calls of a block with `observing`.
        max_question_chars: The longest question (with its options' texts) accepted.
        max_option_chars: The longest option accepted.
        max_regions: How many of the regions the model names the micro step shows, as [full image,
            crop 1, ..., crop k] (default 1: the first, as the protocol does), at most the backend's
            `abilities.max_images` less one. Above 1 the box request and the micro turn use the
            family's several-region templates (``locate_many``, ``micro_many``, ``score_many``).
        search_tile_side: With ``mode="search"``, the side of the tiles a large image is split into:
            the scale the model reads well (default 320 px, the shipped model's training canvases).
            An image whose longer side is at most 1.5 tile sides is not tiled.
        search_overlap: Pixels neighbouring tiles share at least: the largest object expected.
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
        unscored_vote: UnscoredVote = UNSCORED_VOTE,
        memory: AnswerMemory | None = None,
        auto_threshold: float = AUTO_THRESHOLD,
        session: bool = True,
        observers: Sequence[StepObserver] = (),
        max_question_chars: int = MAX_QUESTION_CHARS,
        max_option_chars: int = MAX_OPTION_CHARS,
        max_regions: int = 1,
        search_tile_side: int = SEARCH_TILE_SIDE,
        search_overlap: int = SEARCH_OVERLAP,
    ) -> None:
        if arbitration not in ARBITRATION_METHODS:
            raise ValueError(f"arbitration must be one of {ARBITRATION_METHODS}, not {arbitration!r}")
        if unscored_vote not in UNSCORED_VOTES:
            raise ValueError(f"unscored_vote must be one of {UNSCORED_VOTES}, not {unscored_vote!r}")
        if margin < 0 or min_side < 0 or max_new_tokens < 1:
            raise ValueError("margin and min_side must be >= 0 and max_new_tokens >= 1")
        if max_question_chars < 1 or max_option_chars < 1:
            raise ValueError("max_question_chars and max_option_chars must be >= 1")
        if max_regions < 1:
            raise ValueError(f"max_regions must be >= 1, got {max_regions}")
        if search_tile_side < 1 or not 0 <= search_overlap < search_tile_side:
            raise ValueError("search_tile_side must be >= 1 and search_overlap in 0..search_tile_side-1")
        self.backend = backend
        self.prompts = prompts or load_prompts(backend.prompt_family)
        self.margin = margin
        self.min_side = min_side
        self.max_new_tokens = max_new_tokens
        self.arbitration = arbitration
        self.unscored_vote = unscored_vote
        self.memory = memory
        self.auto_threshold = auto_threshold
        self.session = session
        self.observers = list(observers)
        self.max_question_chars = max_question_chars
        self.max_option_chars = max_option_chars
        self.max_regions = max_regions
        self.search_tile_side = search_tile_side
        self.search_overlap = search_overlap
        self._observing: ContextVar[tuple[StepObserver, ...]] = ContextVar(
            f"df_agent_observers_{id(self)}", default=()
        )

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | FilePath | None = None,
        *,
        device: str | None = None,
        dtype: str | None = None,
        **engine_kwargs: Any,
    ) -> DualFocus:
        """An engine over a transformers checkpoint (fast path on): the shipped model when no path is given.

        Args:
            path_or_id: A local folder or a hub id (the hub needs network access). None: the
                shipped demonstration model, trained only on synthetic FocusShapes scenes (its
                answers about other images mean nothing; `FocusResult.warnings` says so).
            device: "cpu", "cuda", "cuda:1"...; default cuda when present, else cpu.
            dtype: "float32", "bfloat16", "float16"; default bfloat16 on cuda, float32 on cpu.
            **engine_kwargs: Passed to `DualFocus` (margin, min_side, arbitration, ...).
        """
        from df_agent.backends.hf import HFBackend

        backend = HFBackend.from_pretrained(path_or_id, device=device, dtype=dtype)
        return cls(backend, **engine_kwargs)

    @contextmanager
    def observing(self, observer: StepObserver) -> Iterator[None]:
        """Tell `observer` about the steps of this engine's calls inside the block (this context only)."""
        token = self._observing.set((*self._observing.get(), observer))
        try:
            yield
        finally:
            self._observing.reset(token)

    # -- input checks --------------------------------------------------------------------------

    def check_question(self, question: str, options: Sequence[str] | None = None) -> list[str] | None:
        """Check a question and its options against the limits before any model work; the options as a list.

        Raises:
            ValueError: An empty question.
            QuestionTooLongError, TooManyOptionsError, InvalidOptionError: A limit is exceeded
                (the error's `limit` names the setting).
        """
        if not isinstance(question, str) or not question.strip():
            raise ValueError("question must be a non-empty string")
        if isinstance(options, str):
            raise InvalidOptionError("options must be a list of strings, not one string", limit="options")
        if not isinstance(options, Sequence | None):
            raise InvalidOptionError(
                f"options must be a list of strings, not {type(options).__name__}", limit="options"
            )
        options = list(options) if options else None
        if options:
            if len(options) > len(OPTION_LETTERS):
                raise TooManyOptionsError(
                    f"{len(options)} options given; at most {len(OPTION_LETTERS)} (one per letter A-Z)",
                    limit="options",
                )
            for option in options:
                self._check_text(option, "option")
        length = len(question) + sum(len(o) for o in options or ())
        if length > self.max_question_chars:
            raise QuestionTooLongError(
                f"the question is {length:,} characters (with its options); the limit is "
                f"{self.max_question_chars:,} (max_question_chars)",
                limit="max_question_chars",
            )
        context = self.backend.context_length
        if context is not None:
            tokens = self.backend.count_tokens(self.prompts.with_options(question, options))
            if tokens is not None and tokens + self.max_new_tokens > context:
                raise QuestionTooLongError(
                    f"the question is {tokens:,} tokens; with {self.max_new_tokens} for the answer it "
                    f"does not fit the model's context of {context:,} tokens (context_length)",
                    limit="context_length",
                )
        return options

    def _check_text(self, text: object, what: str) -> None:
        if not isinstance(text, str) or not text.strip():
            raise InvalidOptionError(
                f"each {what} must be a non-empty string, not {type(text).__name__} {text!r:.40}", limit=what
            )
        if len(text) > self.max_option_chars:
            raise InvalidOptionError(
                f"an {what} is {len(text):,} characters; the limit is {self.max_option_chars:,} "
                "(max_option_chars)",
                limit="max_option_chars",
            )

    @property
    def region_limit(self) -> int:
        """How many regions the micro step shows: `max_regions`, at most the backend's images less one."""
        most = self.backend.abilities.max_images
        return self.max_regions if most is None else max(1, min(self.max_regions, most - 1))

    # -- conversations -------------------------------------------------------------------------

    def macro_conversation(
        self, image: Image.Image, question: str, options: Sequence[str] | None
    ) -> Conversation:
        """Turn 1 of the macro path: the image and the question (with options)."""
        text = self.prompts.macro.format(question=self.prompts.with_options(question, options))
        return Conversation().user(text, [image])

    def locate_conversation(self, image: Image.Image, question: str) -> Conversation:
        """The box request: the image and the bare question (asking for every region if several are shown)."""
        template = self.prompts.locate_many if self.region_limit > 1 else self.prompts.locate
        return Conversation().user(template.format(question=question), [image])

    def micro_conversation(
        self,
        image: Image.Image,
        crop_image: Crops,
        question: str,
        box_text: str,
        options: Sequence[str] | None = None,
        *,
        template: str | None = None,
    ) -> Conversation:
        """Box request, the model's box text, then the crop and the combine-question: images full, crop.

        With several crops (one per region, in order) the images are [full, crop 1, ..., crop k] and
        the turn is worded with the family's ``micro_many`` template.
        """
        crops = _crops(crop_image)
        default = self.prompts.micro_many if len(crops) > 1 else self.prompts.micro
        turn2 = (template or default).format(question=self.prompts.with_options(question, options))
        return self.locate_conversation(image, question).assistant(box_text).user(turn2, crops)

    def score_conversation(
        self, image: Image.Image, crop_image: Crops, question: str, box_text: str
    ) -> Conversation:
        """The official vote's context: the micro conversation worded with the short-answer hint."""
        template = self.prompts.score_many if len(_crops(crop_image)) > 1 else self.prompts.score
        return self.micro_conversation(image, crop_image, question, box_text, template=template)

    def judge_conversation(
        self, image: Image.Image, crop_image: Crops, question: str, candidates: Sequence[str]
    ) -> Conversation:
        """The judge turn: [full image, crop], the question and both answers as options A and B."""
        first, second = candidates
        text = self.prompts.judge.format(question=question, first=first, second=second)
        return Conversation().user(text, [image, *_crops(crop_image)])

    # -- the steps -----------------------------------------------------------------------------

    def macro(self, image: ImageInput, question: str, options: Sequence[str] | None = None) -> str:
        """Step 1: the answer from the whole image."""
        options = self.check_question(question, options)
        return self._macro(load_image(image), question, options).text

    def locate(self, image: ImageInput, question: str) -> Location:
        """Step 2: ask for the region the question is about and read the box in original pixels."""
        self.check_question(question)
        picture = load_image(image)
        with self._step("locate", {"question": question}) as outputs:
            [reply] = self._generate([self._locate_request(picture, question)])
            return self._read_box(picture, reply.text, outputs)

    def confidence(
        self, image: ImageInput, question: str, answer: str, options: Sequence[str] | None = None
    ) -> float:
        """The macro answer's mean NLL scored in the macro context: lower is more confident (inf if empty)."""
        if not answer.strip():
            return math.inf
        with self._step("confidence", {"answer": answer, "source": "score"}) as outputs:
            conversation = self.macro_conversation(load_image(image), question, options)
            outputs["macro_nll"] = nll = self._score(conversation, [answer])[0]
            return nll

    def zoom(self, image: ImageInput, box: Box) -> Zoom:
        """Step 3: square the box, add the margin, enforce the minimum side, clip, crop."""
        if not isinstance(box, Box):
            raise BoxError(f"zoom takes a Box in image pixels, not {type(box).__name__} {box!r:.60}")
        picture = load_image(image)
        with self._step("zoom", {"box": box.model_dump()}) as outputs:
            region = zoom_box(box, picture.size, margin=self.margin, min_side=self.min_side)
            outputs["crop_box"] = region.model_dump()
            return Zoom(box=region, crop=crop(picture, region))

    def search(self, image: ImageInput, question: str) -> TileSearch:
        """Search mode's first step: the tile of a large image where the object the question names is.

        See `df_agent.search.find_tile`; the result's `tile` is None (and `reason` says why) when the
        image is small enough, the question names no object or the backend cannot rank tiles.
        """
        picture = load_image(image)
        with self._step("search", {"question": question}) as outputs:
            found = find_tile(
                self.backend, self.prompts, picture, question,
                tile_side=self.search_tile_side, overlap=self.search_overlap,
            )  # fmt: skip
            _count(found.model_calls)
            outputs.update(found.model_dump())
            return found

    def micro(
        self,
        image: ImageInput,
        crop_image: Crops,
        question: str,
        *,
        box_text: str,
        options: Sequence[str] | None = None,
    ) -> str:
        """Step 4: the answer from [full image, crop] (or several crops), continuing the box conversation."""
        options = self.check_question(question, options)
        return self._micro(load_image(image), crop_image, question, box_text, options).text

    def arbitrate(
        self,
        image: ImageInput,
        crop_image: Crops,
        question: str,
        candidates: Sequence[str],
        *,
        box_text: str,
        method: ArbitrationMethod | None = None,
        options: Sequence[str] | None = None,
    ) -> Arbitration:
        """Step 5: the perplexity vote (the backend scores); the candidate with the lowest mean NLL wins.

        Args:
            candidates: Two or more answers. With "own_context" exactly two: [macro, micro].
            method: "official", "own_context" or "average"; default the engine's.
            options: The multiple-choice options, for the macro context of the
                "own_context" and "average" methods.

        Raises:
            ScoringUnavailableError: The backend cannot score.
        """
        method = method or self.arbitration
        if method not in ARBITRATION_METHODS:
            raise ValueError(f"arbitration method must be one of {ARBITRATION_METHODS}, not {method!r}")
        if len(candidates) < 2:
            raise ValueError("arbitration needs at least two candidates")
        for candidate in candidates:
            if not isinstance(candidate, str) or not candidate.strip():
                raise InvalidOptionError(
                    f"each candidate must be a non-empty string, not {type(candidate).__name__}",
                    limit="candidate",
                )
        picture = load_image(image)
        with self._step("arbitrate", {"candidates": list(candidates), "vote": method}) as outputs:
            scoring = self.score_conversation(picture, crop_image, question, box_text)
            if method == "official":
                scores = self._score(scoring, candidates)
            elif method == "own_context":
                if len(candidates) != 2:
                    raise ValueError("own_context arbitration takes exactly two candidates: [macro, micro]")
                macro_context = self.macro_conversation(picture, question, options)
                micro_context = self.micro_conversation(picture, crop_image, question, box_text, options)
                scores = [
                    self._score(macro_context, [candidates[0]])[0],
                    self._score(micro_context, [candidates[1]])[0],
                ]
            else:
                macro_context = self.macro_conversation(picture, question, options)
                in_macro = self._score(macro_context, candidates)
                in_micro = self._score(scoring, candidates)
                scores = [(a + b) / 2 for a, b in zip(in_macro, in_micro, strict=True)]
            winner = min(range(len(scores)), key=scores.__getitem__)
            outputs.update(scores=scores, winner=winner)
            return Arbitration(method=method, candidates=list(candidates), scores=scores, winner=winner)

    def judge(
        self, image: ImageInput, crop_image: Crops, question: str, candidates: Sequence[str]
    ) -> int | None:
        """The judge vote: one generation sees both views and both answers; the index it picks, or None.

        Args:
            candidates: Exactly two answers: [macro, micro].
        """
        if len(candidates) != 2:
            raise ValueError("the judge takes exactly two candidates: [macro, micro]")
        picture = load_image(image)
        with self._step("arbitrate", {"candidates": list(candidates), "vote": "judge"}) as outputs:
            conversation = self.judge_conversation(picture, crop_image, question, candidates)
            [reply] = self._generate([Request(conversation, JUDGE_MAX_NEW_TOKENS)])
            letter = option_letter(reply.text, candidates)
            winner = None if letter is None else OPTION_LETTERS.index(letter)
            outputs.update(reply=reply.text, winner=winner)
            return winner

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
            image: A path, bytes, a base64 data URI or a PIL image (loaded once with `load_image`).
            question: The question, without options.
            options: Multiple-choice options; the answer is then an option letter or None.
            mode: "dualfocus" (macro, zoom, micro, vote), "macro" (whole image only),
                "micro" (zoomed answer only; falls back to macro when no box is found),
                "auto" (dualfocus, unless the macro answer is confident: its own mean NLL at most
                `auto_threshold`; without any confidence from the backend, dualfocus) or
                "search" (for large images: dualfocus on the tile where the model is surest the
                object the question names is, boxes in the image's pixels; see `search`).
            arbitration: The perplexity vote's method for this call; default the engine's.
            use_memory: With a memory attached, answer an exact repeat from it (``cached=True``,
                timings of the lookup only) and log every new answer; False skips both.

        Raises:
            ValueError: A bad mode or an empty question; `InputLimitError` for a limit exceeded.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        method = arbitration or self.arbitration
        if method not in ARBITRATION_METHODS:
            raise ValueError(f"arbitration must be one of {ARBITRATION_METHODS}, not {method!r}")
        options = self.check_question(question, options)
        picture = load_image(image)
        digest = image_hash(picture)
        memory = self.memory if use_memory else None
        lookup: dict[str, float] = {}
        if memory is not None:
            start = time.perf_counter()
            remembered = memory.lookup(
                digest, question, self.backend.model_id, mode, options, arbitration=method
            )
            lookup["lookup"] = seconds = time.perf_counter() - start
            if remembered is not None:
                timings = {"lookup": seconds, "total": seconds}
                return remembered.model_copy(update={"cached": True, "model_calls": 0, "timings": timings})
        start = time.perf_counter()
        run = self._answer(picture, question, options, mode, method)
        run.timings = {**lookup, **run.timings, "total": time.perf_counter() - start}
        result = FocusResult(
            question=question,
            options=options,
            image_hash=digest,
            image_size=picture.size,
            model_id=self.backend.model_id,
            mode=mode,
            model_calls=run.model_calls,
            timings=run.timings,
            warnings=self.backend.input_warnings(picture, question),
            **run.trace,
        )
        if memory is not None:
            memory.log(result)
        return result

    def _answer(
        self,
        picture: Image.Image,
        question: str,
        options: list[str] | None,
        mode: Mode,
        method: ArbitrationMethod,
    ) -> _Run:
        """One question in a backend session (redone in a plain one if a guess is rejected)."""
        if not self.session:
            return self._attempt(picture, question, options, mode, method)
        try:
            with self.backend.session(speculate=True):
                return self._attempt(picture, question, options, mode, method)
        except GuessRejected:
            with self.backend.session():
                return self._attempt(picture, question, options, mode, method)

    def _attempt(
        self,
        picture: Image.Image,
        question: str,
        options: list[str] | None,
        mode: Mode,
        method: ArbitrationMethod,
    ) -> _Run:
        run = _Run()
        token = _RUN.set(run)
        try:
            answer, path = self._protocol(run, picture, question, options, mode, method)
        finally:
            _RUN.reset(token)
        run.trace.update(answer=answer, path=path)
        return run

    def _protocol(
        self,
        run: _Run,
        picture: Image.Image,
        question: str,
        options: list[str] | None,
        mode: Mode,
        method: ArbitrationMethod,
    ) -> tuple[str | None, Path | None]:
        """The steps of `ask` in order; fills `run`, returns (answer, path)."""
        trace = run.trace
        if mode == "search":
            found = trace["search"] = self.search(picture, question)
            mode = "dualfocus"
            if found.tile is not None:  # DualFocus on the tile; its boxes back in the image's pixels
                answer = self._protocol(run, crop(picture, found.tile), question, options, mode, method)
                frame = Frame.of_region(found.tile)
                for name in ("box", "crop_box"):
                    if trace.get(name) is not None:
                        trace[name] = frame.to_root(trace[name])
                trace["regions"] = [
                    r.model_copy(update={"box": frame.to_root(r.box), "crop_box": frame.to_root(r.crop_box)})
                    for r in trace.get("regions", [])
                ]
                return answer
        # the macro answer and the box request go to the backend together; in mode="auto" only where a
        # session makes the box nearly free (the zoom may be skipped)
        together = self.session and (
            mode == "dualfocus" or (mode == "auto" and self.backend.abilities.session)
        )
        location = None
        if together:
            with self._step("macro", {"question": question, "options": options}) as outputs:
                run.macro, box_reply = self._generate(
                    [self._macro_request(picture, question, options), self._locate_request(picture, question)]
                )
                outputs["answer"] = run.macro.text
            with self._step("locate", {"question": question}) as outputs:
                location = self._read_box(picture, box_reply.text, outputs)
        elif mode != "micro":
            run.macro = self._macro(picture, question, options)
        if run.macro is not None:
            trace["macro_answer"] = run.macro.text
        if mode == "macro":
            return self._only(run, "macro", options)
        if mode == "auto" and self._confident(run, picture, question, options):
            return self._only(run, "macro", options, "confident macro answer; no zoom")

        if location is None:
            location = self.locate(picture, question)
        trace.update(box_text=location.box_text, box=location.box)
        if location.box is None:
            if run.macro is None:
                run.macro = self._macro(picture, question, options)
                trace["macro_answer"] = run.macro.text
            return self._only(run, "macro", options, f"no box: {location.failure}; the macro answer stands")

        boxes = location.boxes[: self.region_limit]  # the first box, or the first k of several
        zooms = [self.zoom(picture, box) for box in boxes]
        crops = [zoomed.crop for zoomed in zooms]
        regions = [FocusRegion(box=b, crop_box=z.box, crop=z.crop) for b, z in zip(boxes, zooms, strict=True)]
        trace.update(crop_box=zooms[0].box, crop=crops[0], regions=regions)
        run.micro = self._micro(picture, crops, question, location.box_text, options)
        trace["micro_answer"] = run.micro.text
        if mode == "micro":
            return self._only(run, "micro", options)
        return self._vote(run, picture, crops, question, options, location.box_text, method)

    def _only(
        self, run: _Run, path: Path, options: list[str] | None, reason: str | None = None
    ) -> tuple[str | None, Path | None]:
        """One candidate is the answer (reduced to its option letter with options); `reason` says why."""
        answer = (run.macro if path == "macro" else run.micro).text  # type: ignore[union-attr]
        if reason is not None:
            run.trace["fallback"] = reason
        if not options:
            return answer, path
        letter = option_letter(answer, options)
        if letter is None:
            run.trace["fallback"] = "; ".join(
                filter(None, [reason, f"the {path} answer is not one of the options' letters; no answer"])
            )
            return None, None
        return letter, path

    def _confident(self, run: _Run, picture: Image.Image, question: str, options: list[str] | None) -> bool:
        """mode="auto": whether the macro answer is confident enough to skip the zoom (trace says how)."""
        trace, answer = run.trace, run.macro.text  # type: ignore[union-attr]
        nll = run.macro.mean_nll  # type: ignore[union-attr]
        if nll is not None:
            source = "the macro answer's generation log-probabilities"
            with self._step("confidence", {"answer": answer, "source": "generation"}) as outputs:
                outputs["macro_nll"] = nll
        elif self.backend.abilities.prompt_logprobs:
            source = "the macro answer scored in the macro context"
            try:
                nll = self.confidence(picture, question, answer, options)
            except ScoringUnavailableError:
                nll = None
        if nll is None:
            trace["auto_reason"] = "the backend reports no confidence for the macro answer; full protocol"
            return False
        trace.update(macro_nll=nll, auto_threshold=self.auto_threshold)
        confident = nll <= self.auto_threshold
        trace["auto_reason"] = f"confidence from {source}; " + (
            "at or below the threshold: no zoom" if confident else "above the threshold: full protocol"
        )
        return confident

    def _vote(
        self,
        run: _Run,
        image: Image.Image,
        crop_image: Crops,
        question: str,
        options: list[str] | None,
        box_text: str,
        method: ArbitrationMethod,
    ) -> tuple[str | None, Path | None]:
        """Pick between the two candidates as the protocol's steps 5 and 6 say."""
        trace = run.trace
        macro_answer, micro_answer = run.macro.text, run.micro.text  # type: ignore[union-attr]
        if options:
            macro_letter = option_letter(macro_answer, options)
            micro_letter = option_letter(micro_answer, options)
            if macro_letter is None and micro_letter is None:
                trace["fallback"] = "neither answer is one of the options' letters; no answer"
                return None, None
            if macro_letter == micro_letter:
                trace["fallback"] = "both answers chose the same option; no vote needed"
                return macro_letter, "macro"
            if micro_letter is None:
                trace["fallback"] = "only the macro answer is one of the options' letters"
                return macro_letter, "macro"
            if macro_letter is None:
                trace["fallback"] = "only the micro answer is one of the options' letters"
                return micro_letter, "micro"
            pair = [options[OPTION_LETTERS.index(macro_letter)], options[OPTION_LETTERS.index(micro_letter)]]
            answers = [macro_letter, micro_letter]
        else:
            if _normalise(macro_answer) == _normalise(micro_answer):
                trace["fallback"] = "both answers agree; no vote needed"
                return macro_answer, "macro"
            if not macro_answer.strip() or not micro_answer.strip():
                empty = "macro" if not macro_answer.strip() else "micro"
                other: Path = "micro" if empty == "macro" else "macro"
                trace["fallback"] = f"the {empty} answer is empty; the {other} answer stands"
                return (micro_answer if other == "micro" else macro_answer), other
            pair = [macro_answer, micro_answer]
            answers = pair
        winner = self._decide(run, image, crop_image, question, options, box_text, method, pair)
        paths: tuple[Path, Path] = ("macro", "micro")
        return answers[winner], paths[winner]

    def _decide(
        self,
        run: _Run,
        image: Image.Image,
        crop_image: Crops,
        question: str,
        options: list[str] | None,
        box_text: str,
        method: ArbitrationMethod,
        pair: list[str],
    ) -> int:
        """The winning candidate's index by the best vote the backend allows; records which ran and why."""
        trace = run.trace
        abilities = self.backend.abilities
        reasons = []
        if abilities.prompt_logprobs:
            try:
                vote = self.arbitrate(
                    image, crop_image, question, pair, box_text=box_text, method=method, options=options
                )
            except ScoringUnavailableError as err:
                reasons.append(f"the backend could not score the answers ({err})")
            else:
                trace.update(scores={"macro": vote.scores[0], "micro": vote.scores[1]}, arbitration=method)
                return self._voted(
                    run, method, "the backend scores answers (prompt log-probabilities)", vote.winner
                )
        macro_nll, micro_nll = run.macro.mean_nll, run.micro.mean_nll  # type: ignore[union-attr]
        if abilities.generation_logprobs and macro_nll is not None and micro_nll is not None:
            with self._step("arbitrate", {"candidates": pair, "vote": "generation_logprobs"}) as outputs:
                winner = int(micro_nll < macro_nll)
                outputs.update(scores=[macro_nll, micro_nll], winner=winner)
            trace["scores"] = {"macro": macro_nll, "micro": micro_nll}
            reason = (
                "the backend reports generation log-probabilities only: each answer's mean NLL as generated"
            )
            return self._voted(run, "generation_logprobs", _joined(reasons, reason), winner)
        reasons.append("the backend reports no log-probabilities")
        if self.unscored_vote == "judge":
            winner = self.judge(image, crop_image, question, pair)
            if winner is not None:
                return self._voted(run, "judge", _joined(reasons, "a judge turn picked one answer"), winner)
            reasons.append("the judge's reply named neither answer")
        reason = _joined(reasons, "policy: the micro answer, which saw both views")
        return self._voted(run, "micro_policy", reason, 1)

    def _voted(self, run: _Run, vote: Vote, reason: str, winner: int) -> int:
        run.trace.update(vote=vote, vote_reason=reason)
        return winner

    # -- requests and steps --------------------------------------------------------------------

    def _macro_request(self, picture: Image.Image, question: str, options: Sequence[str] | None) -> Request:
        return Request(self.macro_conversation(picture, question, options), self.max_new_tokens)

    def _locate_request(self, picture: Image.Image, question: str) -> Request:
        return Request(self.locate_conversation(picture, question), LOCATE_MAX_NEW_TOKENS, reply="box")

    def _macro(self, picture: Image.Image, question: str, options: Sequence[str] | None) -> Generation:
        with self._step("macro", {"question": question, "options": options}) as outputs:
            [reply] = self._generate([self._macro_request(picture, question, options)])
            outputs["answer"] = reply.text
            return reply

    def _micro(
        self,
        picture: Image.Image,
        crop_image: Crops,
        question: str,
        box_text: str,
        options: Sequence[str] | None,
    ) -> Generation:
        inputs = {"question": question, "options": options, "box_text": box_text}
        with self._step("micro", inputs) as outputs:
            conversation = self.micro_conversation(picture, crop_image, question, box_text, options)
            [reply] = self._generate([Request(conversation, self.max_new_tokens)])
            outputs["answer"] = reply.text
            return reply

    def _read_box(self, picture: Image.Image, box_text: str, outputs: dict[str, Any]) -> Location:
        input_size = self.backend.input_size(picture)
        readings = read_boxes(box_text, self.backend.box_convention, picture.size, input_size)
        parsed = readable_boxes(readings)
        if isinstance(parsed, NoBox):
            location = Location(box_text=box_text, box=None, failure=parsed.reason)
        else:
            dropped = [f"box {i}: {r.reason}" for i, r in enumerate(readings, 1) if isinstance(r, NoBox)]
            location = Location(box_text=box_text, box=parsed[0], boxes=parsed, dropped=dropped)
        outputs.update(location.model_dump())
        return location

    def _generate(self, requests: list[Request]) -> list[Generation]:
        """The backend's replies: together in one `generate_many`, or one by one on the plain path."""
        _count(len(requests))
        if self.session:
            return self.backend.generate_many(requests)
        return [self.backend.generate_many([request])[0] for request in requests]

    def _score(self, conversation: Conversation, candidates: Sequence[str]) -> list[float]:
        """The backend's scores of the candidates (one request)."""
        _count(1)
        return self.backend.score(conversation, candidates)

    @contextmanager
    def _step(self, name: str, inputs: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Time one step into the running question's timings and tell the observers about it."""
        observers = [*self.observers, *self._observing.get()]
        handles = [observer.start(name, inputs) for observer in observers]
        outputs: dict[str, Any] = {}
        start = time.perf_counter()
        try:
            yield outputs
        except BaseException as err:
            seconds = self._timed(name, start)
            for handle in handles:
                handle.fail(err, seconds)
            raise
        seconds = self._timed(name, start)
        for handle in handles:
            handle.end(outputs, seconds)

    @staticmethod
    def _timed(name: str, start: float) -> float:
        seconds = time.perf_counter() - start
        run = _RUN.get()
        if run is not None:
            run.timings[name] = run.timings.get(name, 0.0) + seconds
        return seconds


def _count(requests: int) -> None:
    """Add backend requests to the running question's `model_calls`."""
    run = _RUN.get()
    if run is not None:
        run.model_calls += requests


def _crops(crop_image: Crops) -> list[Image.Image]:
    """The crop, or the crops in order, as a list."""
    crops = [crop_image] if isinstance(crop_image, Image.Image) else list(crop_image)
    if not crops:
        raise ValueError("the micro step needs at least one crop")
    return crops


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


def _joined(reasons: list[str], last: str) -> str:
    return "; ".join([*reasons, last])


__all__ = [
    "ARBITRATION_METHODS",
    "AUTO_THRESHOLD",
    "JUDGE_MAX_NEW_TOKENS",
    "LOCATE_MAX_NEW_TOKENS",
    "MAX_OPTION_CHARS",
    "MAX_QUESTION_CHARS",
    "MODES",
    "UNSCORED_VOTE",
    "UNSCORED_VOTES",
    "AnswerMemory",
    "Crops",
    "DualFocus",
    "ImageInput",
    "InputLimitError",
    "InvalidOptionError",
    "QuestionTooLongError",
    "TooManyOptionsError",
    "option_letter",
]
