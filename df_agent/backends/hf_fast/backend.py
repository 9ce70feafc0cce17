"""The transformers backend, fast: one vision pass per image and one growing key/value cache per question.

Inside a `session()` (one DualFocus question), `FastHFBackend` keeps a *prefix tree* of everything it
computed in a single key/value cache: the image prefix that the macro question and the box request
share, the box turn that the micro turn continues, the micro prefix that the scoring pass continues.
Each forward pass starts where the longest computed prefix ends; several branches (the macro answer
and the box, two candidates) go through one pass side by side under a tree attention mask, with the
rotary positions each would have alone; each image is encoded once.

Decoding is greedy and checks as it goes: a `Draft` proposes tokens (the brackets and commas a box's
grammar fixes, a box or an answer seen before); the model scores them in the same pass and only those
it would have chosen itself are kept. So answers are the plain greedy answers and scores the plain
scores, up to floating-point rounding (fp32: about 1e-6), and a choice between two tokens closer than
rounding could tell apart (`TIE_TOLERANCE`) is left to the plain path. In a `session(speculate=True)`
a reply whose draft says how it ends is returned before the model confirms the end, which rides on
the next pass (`SpeculationError` if the model disagreed). Models, attention kernels or generation
settings this path does not handle fall back to the plain `HFBackend` methods.
"""

from __future__ import annotations

import logging
import re
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

import torch
from PIL import Image
from transformers import DynamicCache

from df_agent.backends.base import Conversation
from df_agent.backends.hf import HFBackend, PromptMismatchError

logger = logging.getLogger(__name__)

FAST_MODEL_TYPES = ("llava", "qwen2_vl")
# A backend stops speculating once more than this many of its guessed endings, plus one in twenty
# of all it guessed, turned out wrong (each costs its question a second run).
SPECULATION_FAILURES_ALLOWED = 2
# Log-probability gap between the best two tokens below which a greedy choice counts as a tie, by
# model dtype (half precision: 0.05): ties go to the plain path, so rounding never changes an answer.
TIE_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9}
# Generation settings that add logits processors or change the search: greedy decoding here knows none,
# so each must be unset or at its no-op value (penalty 1.0, size 0, one beam...).
_NEUTRAL = (None, 0, 1, False, [], ())
_SEARCH_SETTINGS = (
    "num_beams", "repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "min_length", "min_new_tokens", "forced_bos_token_id",
    "forced_eos_token_id", "suppress_tokens", "begin_suppress_tokens", "sequence_bias",
    "exponential_decay_length_penalty", "renormalize_logits", "stop_strings", "max_time", "penalty_alpha",
    "dola_layers", "prompt_lookup_num_tokens", "guidance_scale", "watermarking_config",
)  # fmt: skip


class Draft(Protocol):
    """Guesses at what a reply will say; the model keeps only the guesses it would have made itself."""

    def propose(self, generated: Sequence[int]) -> Sequence[int]:
        """Tokens worth checking next, given the tokens generated so far (possibly none)."""
        ...

    def ending(self, generated: Sequence[int]) -> Sequence[int]:
        """The tokens that end the reply here if the model keeps to its format (end of turn last), or []."""
        ...

    def learn(self, reply: Sequence[int]) -> None:
        """See a finished reply (all its tokens; the end of a guessed ending may be unconfirmed yet)."""
        ...


class BoxDraft:
    """Drafts boxes ``[x1,y1,x2,y2]`` for tokenizers that write each number as one token.

    It proposes the grammar's fixed tokens (``[``, the commas, ``]`` and the end of turn) and, where
    the box so far begins like a box the model wrote before, the rest of the most frequent such box:
    a model that reuses boxes (whole-image boxes, a favourite position) then writes one in a pass or
    two. `ending` is the grammar's part only: ``]`` and the end of turn after the fourth number.

    Args:
        open_id, comma_id, close_id: The ``[``, ``,`` and ``]`` tokens.
        end_id: The end-of-turn token.
        number_ids: Every token that is a number.
        memory: How many different boxes to remember.
    """

    def __init__(
        self,
        open_id: int,
        comma_id: int,
        close_id: int,
        end_id: int,
        number_ids: frozenset[int],
        memory: int = 256,
    ) -> None:
        self.open_id, self.comma_id, self.close_id, self.end_id = open_id, comma_id, close_id, end_id
        self.number_ids = number_ids
        self.memory = memory
        self.boxes: Counter[tuple[int, ...]] = Counter()

    @classmethod
    def for_tokenizer(cls, tokenizer, end_id: int) -> BoxDraft | None:
        """The draft for `tokenizer`; None unless brackets, commas and 2-decimal numbers are single tokens."""
        ids = [tokenizer.encode(s, add_special_tokens=False) for s in ("[", ",", "]", "0.25")]
        if any(len(i) != 1 for i in ids):
            return None
        numbers = frozenset(
            i for token, i in tokenizer.get_vocab().items() if re.fullmatch(r"\d+(\.\d+)?", token)
        )
        box = tokenizer.encode("[0.12,0.34,0.56,0.78]", add_special_tokens=False)
        if ids[3][0] not in numbers or len(box) != 9:
            return None
        return cls(ids[0][0], ids[1][0], ids[2][0], end_id, numbers)

    def _open_box(self, generated: Sequence[int]) -> tuple[int, ...] | None:
        """The tokens since the last ``[`` (with it); () before anything; None outside a box."""
        if not generated:
            return ()
        if self.open_id not in generated:
            return None
        opened = len(generated) - 1 - list(reversed(generated)).index(self.open_id)
        return tuple(generated[opened:])

    def propose(self, generated: Sequence[int]) -> Sequence[int]:
        box = self._open_box(generated)
        if box is None:
            return []
        seen = [b for b, _ in self.boxes.most_common() if len(b) > len(box) and b[: len(box)] == box]
        if seen:
            return [*seen[0][len(box) :], self.end_id]
        if not box:
            return [self.open_id]
        if box[-1] in self.number_ids:
            return self.ending(generated) or [self.comma_id]
        return []

    def ending(self, generated: Sequence[int]) -> Sequence[int]:
        box = self._open_box(generated)
        if not box or box[-1] not in self.number_ids:
            return []
        return [self.close_id, self.end_id] if sum(t in self.number_ids for t in box) == 4 else []

    def learn(self, reply: Sequence[int]) -> None:
        box = tuple(reply[:-1]) if reply and reply[-1] == self.end_id else tuple(reply)
        if len(box) == 9 and box[0] == self.open_id and box[-1] == self.close_id:
            self.boxes[box] += 1
            if len(self.boxes) > self.memory:
                del self.boxes[min(self.boxes, key=self.boxes.__getitem__)]


class AnswerDraft:
    """Guesses at short answers: the last answer again, and where answers usually end.

    It proposes the rest of the last answer it saw while the reply begins like it (the micro answer
    often repeats the macro answer). Its `ending` (the end of turn) is offered once `warmup` answers
    were seen and at least `agreement` of the last `window` had the current length.
    """

    def __init__(self, end_id: int, window: int = 50, agreement: float = 0.95, warmup: int = 5) -> None:
        self.end_id, self.agreement, self.warmup = end_id, agreement, warmup
        self.lengths: deque[int] = deque(maxlen=window)
        self.last: list[int] = []

    def propose(self, generated: Sequence[int]) -> Sequence[int]:
        n = len(generated)
        return self.last[n:] if len(self.last) > n and self.last[:n] == list(generated) else []

    def ending(self, generated: Sequence[int]) -> Sequence[int]:
        if len(self.lengths) < self.warmup:
            return []
        usual = self.lengths.count(len(generated)) >= self.agreement * len(self.lengths)
        return [self.end_id] if usual else []

    def learn(self, reply: Sequence[int]) -> None:
        if reply and reply[-1] == self.end_id:
            self.lengths.append(len(reply) - 1)
            self.last = list(reply)


@dataclass(eq=False)
class _Image:
    """An image as the model sees it: its features (one row per placeholder token) and input size."""

    tag: int
    features: torch.Tensor
    grid: torch.Tensor | None
    input_size: tuple[int, int]


@dataclass(eq=False)
class _Sequence:
    """Token ids with, per position, the tag of the image it shows (0 for text) and its rotary position."""

    ids: torch.Tensor
    tags: torch.Tensor
    positions: torch.Tensor  # (P, L): P = 1, or 3 for multimodal rotary positions
    images: list[_Image]

    def __len__(self) -> int:
        return self.ids.shape[0]

    def common(self, ids: torch.Tensor, tags: torch.Tensor, limit: int) -> int:
        """Length of the common prefix with (ids, tags), at most `limit`."""
        n = min(limit, len(self), ids.shape[0])
        differ = ((self.ids[:n] != ids[:n]) | (self.tags[:n] != tags[:n])).nonzero()
        return int(differ[0, 0]) if differ.numel() else n


@dataclass(eq=False)
class _Branch:
    """A computed sequence in the tree: its ids, the cache slots of its first len(slots) tokens and
    the log-probability of each generated token (by position)."""

    ids: torch.Tensor
    tags: torch.Tensor
    slots: torch.Tensor
    logprobs: dict[int, float] = field(default_factory=dict)


@dataclass(eq=False)
class _Row:
    """One greedy generation in progress: its prompt, the cache slots of every token fed so far."""

    prompt: _Sequence
    max_new_tokens: int
    draft: Draft | None
    slots: list[int] = field(default_factory=list)
    known: list[int] = field(default_factory=list)  # the chosen token not yet in the cache
    generated: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    done: bool = False
    tied: bool = False  # two tokens were too close to call: the plain path decides
    closing: list[int] = field(default_factory=list)  # tokens taken on the draft's word, to confirm
    branch: _Branch | None = None

    @property
    def next_position(self) -> int:
        """Rotary position of the next token to feed (text positions advance by one)."""
        return int(self.prompt.positions.max()) + 1 + len(self.slots) - len(self.prompt)


class _Session:
    """What one question computes: its images, the key/value tree, and generations asked for ahead."""

    def __init__(self, device: torch.device, speculate: bool = False) -> None:
        self.device = device
        self.speculate = speculate
        self.sequences: dict[tuple[str, tuple[int, ...]], _Sequence] = {}
        self.unconfirmed: list[_Row] = []
        self.images: list[tuple[tuple[str, tuple[int, int], bytes], _Image]] = []
        self.by_id: dict[int, tuple[Image.Image, _Image]] = {}
        self.cache = DynamicCache()
        self.size = 0
        self.branches: list[_Branch] = []
        self.rows: list[_Row] = []


class _Pass:
    """The tokens of one forward pass: items appended to the tree, each with the slots it may see."""

    def __init__(self, session: _Session) -> None:
        self.base = session.size
        self.visible: list[torch.Tensor] = []
        self.embeds: list[torch.Tensor] = []
        self.positions: list[torch.Tensor] = []
        self.confirming: list[tuple[_Row, torch.Tensor]] = []
        self.size = 0

    def add(self, visible: torch.Tensor, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Queue tokens that see `visible` and themselves (causally); returns their new slots."""
        n = embeds.shape[0]
        slots = torch.arange(self.base + self.size, self.base + self.size + n)
        self.visible.append(visible)
        self.embeds.append(embeds)
        self.positions.append(positions)
        self.size += n
        return slots


_SESSION: ContextVar[_Session | None] = ContextVar("df_agent_fast_session", default=None)


class FastHFBackend(HFBackend):
    """`HFBackend` with reuse: same `generate` and `score` results, much less computation per question.

    Use `session()` around the calls of one question (`df_agent.fast.FastDualFocus` does): images are
    encoded once, and each forward pass continues the longest prefix already computed in the session.
    Outside a session each call is its own session. `prefetch` asks for a generation ahead of time so that
    it runs in the same forward passes as the next one (the macro answer and the box request), under a
    `Draft` such as `box_draft`; other generations use an `AnswerDraft`. `fast` says whether this model
    takes the fast path at all. Same constructor as `HFBackend`; `from_backend` shares an existing
    backend's model and processor.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._checked = False
        self._speculations = [0, 0]  # endings guessed, endings wrong
        self._answers = AnswerDraft(min(self.end_ids)) if self.end_ids else None
        self.fast = self._fast_supported()

    @classmethod
    def from_backend(cls, backend: HFBackend) -> FastHFBackend:
        """A fast backend over the same model and processor (nothing is copied)."""
        return cls(
            backend.model,
            backend.processor,
            model_id=backend.model_id,
            box_convention=backend.box_convention,
            prompt_family=backend.prompt_family,
        )

    def _fast_supported(self) -> bool:
        config = self.model.config
        text_config = config.get_text_config()
        layer_types = getattr(text_config, "layer_types", None) or ["full_attention"]
        generation = self.model.generation_config
        reasons = {
            f"model type {config.model_type!r}": config.model_type not in FAST_MODEL_TYPES,
            f"attention {text_config._attn_implementation!r}": text_config._attn_implementation
            not in ("sdpa", "eager"),
            "sliding-window layers": any(t != "full_attention" for t in layer_types),
            "non-greedy generation settings": any(
                getattr(generation, name, None) not in _NEUTRAL for name in _SEARCH_SETTINGS
            ),
        }
        why = [reason for reason, bad in reasons.items() if bad]
        if why:
            logger.info("fast path off for %s (%s): plain generate and score", self.model_id, ", ".join(why))
        return not why

    @property
    def end_ids(self) -> frozenset[int]:
        """The token ids that end a generation (the generation config's end of sequence)."""
        eos = self.model.generation_config.eos_token_id
        return frozenset([eos] if isinstance(eos, int) else (eos or []))

    @cached_property
    def box_draft(self) -> Draft | None:
        """The box grammar for this tokenizer, when boxes are fractions written with single-token numbers."""
        if self.box_convention.value != "fraction" or not self.end_ids:
            return None
        return BoxDraft.for_tokenizer(self.tokenizer, min(self.end_ids))

    # -- sessions ------------------------------------------------------------------------------

    @contextmanager
    def session(self, *, speculate: bool = False) -> Iterator[None]:
        """Share images and computed prefixes between the calls made inside (one question).

        Args:
            speculate: Return a reply as soon as its draft says how it ends (a box's ``]`` and end of
                turn after its fourth number), before the model has confirmed those tokens; the
                confirmation rides on the session's next forward pass, or on a last one when the
                session closes. If the model disagrees, `SpeculationError` is raised (at the latest
                when the session closes) and whatever used the reply must be redone without.
        """
        guessed, wrong = self._speculations
        session = _Session(
            super().device, speculate and wrong <= SPECULATION_FAILURES_ALLOWED + guessed // 20
        )
        token = _SESSION.set(session)
        try:
            yield
            if session.unconfirmed:
                with torch.inference_mode():
                    self._forward(session, self._new_pass(session))
        finally:
            _SESSION.reset(token)

    @property
    def device(self) -> torch.device:
        """The model's device (looked up once per session)."""
        session = _SESSION.get()
        return super().device if session is None else session.device

    @property
    def tokens_computed(self) -> int:
        """Tokens run through the language model so far in the current session (0 outside one)."""
        session = _SESSION.get()
        return 0 if session is None else session.size

    @contextmanager
    def _current(self) -> Iterator[_Session]:
        session = _SESSION.get()
        if session is not None:
            yield session
            return
        with self.session():
            yield _SESSION.get()  # type: ignore[misc]

    # -- encoding ------------------------------------------------------------------------------

    def _image(self, session: _Session, image: Image.Image) -> _Image:
        """The image's features, computed once per session (images are matched by their pixels)."""
        held = session.by_id.get(id(image))
        if held is not None and held[0] is image:
            return held[1]
        key = (image.mode, image.size, image.tobytes())
        entry = next((e for k, e in session.images if k == key), None)
        if entry is None:
            entry = self._encode_image(image, tag=len(session.images) + 1)
            session.images.append((key, entry))
        session.by_id[id(image)] = (image, entry)
        return entry

    def _encode_image(self, image: Image.Image, tag: int) -> _Image:
        inputs = self.processor.image_processor(images=[image], return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device)
        grid = inputs.get("image_grid_thw")
        with self._lock:
            if grid is None:
                out = self.model.get_image_features(pixel_values=pixel_values)
                height, width = pixel_values.shape[-2:]
                return _Image(tag, out.pooler_output[0], None, (int(width), int(height)))
            grid = grid.to(self.device)
            out = self.model.get_image_features(pixel_values=pixel_values, image_grid_thw=grid)
        patch = self.processor.image_processor.patch_size
        return _Image(tag, out.pooler_output[0], grid, (int(grid[0, 2]) * patch, int(grid[0, 1]) * patch))

    def _sequence(self, session: _Session, text: str, images: Sequence[Image.Image]) -> _Sequence:
        """Tokenise rendered text as the processor does, each image placeholder expanded to its features."""
        seen = [self._image(session, image) for image in images]
        key = (text, tuple(image.tag for image in seen))
        if key in session.sequences:
            return session.sequences[key]
        placeholder = self.processor.image_token
        parts = text.split(placeholder)
        if len(parts) != len(seen) + 1:
            raise ValueError(f"the prompt has {len(parts) - 1} image placeholders for {len(seen)} images")
        expanded = parts[0] + "".join(
            placeholder * image.features.shape[0] + part for image, part in zip(seen, parts[1:], strict=True)
        )
        ids = self.tokenizer(expanded, return_tensors="pt")["input_ids"][0]
        image_id = self.model.config.image_token_id
        is_image = ids == image_id
        counts = [image.features.shape[0] for image in seen]
        if int(is_image.sum()) != sum(counts):
            raise ValueError("image placeholders and image features do not match")
        tags = torch.zeros_like(ids)
        if seen:
            tags[is_image] = torch.repeat_interleave(
                torch.tensor([image.tag for image in seen]), torch.tensor(counts)
            )
        if self.model.config.model_type == "qwen2_vl":
            grids = torch.cat([image.grid for image in seen]) if seen else None
            positions, _ = self.model.model.get_rope_index(
                ids[None].to(self.device),
                mm_token_type_ids=is_image[None].int().to(self.device),
                image_grid_thw=grids,
            )
            positions = positions[:, 0].cpu()
        else:
            positions = torch.arange(ids.shape[0])[None]
        sequence = _Sequence(ids, tags, positions, seen)
        if not self._checked:
            self._check_against_processor(sequence, text, images)
        session.sequences[key] = sequence
        return sequence

    def _check_against_processor(self, sequence: _Sequence, text: str, images: Sequence[Image.Image]) -> None:
        """Once per backend: the fast tokenisation must give the processor's ids and pixel values."""
        reference = self.encode([text], list(images))
        same = torch.equal(reference["input_ids"][0].cpu(), sequence.ids)
        if images and same:
            pixels = self.processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
            same = torch.equal(reference["pixel_values"].cpu(), pixels)
        self._checked = True
        if not same:
            self.fast = False
            logger.warning(
                "fast path off for %s: its tokenisation differs from the processor's", self.model_id
            )
            raise _FallBack

    def _embed(self, sequence: _Sequence, start: int, end: int | None = None) -> torch.Tensor:
        """Input embeddings of sequence[start:end], image features in place of image placeholders."""
        end = len(sequence) if end is None else end
        embeds = self.model.get_input_embeddings()(sequence.ids[start:end].to(self.device))
        is_image = (sequence.ids == self.model.config.image_token_id).nonzero()[:, 0]
        wanted = is_image[(is_image >= start) & (is_image < end)]
        if wanted.numel():
            features = torch.cat([image.features for image in sequence.images]).to(embeds.dtype)
            first = int((is_image < start).sum())
            embeds[wanted - start] = features[first : first + wanted.numel()]
        return embeds

    def _embed_text(self, ids: Sequence[int]) -> torch.Tensor:
        return self.model.get_input_embeddings()(
            torch.tensor(list(ids), dtype=torch.long, device=self.device)
        )

    # -- the tree ------------------------------------------------------------------------------

    def _forward(self, session: _Session, step: _Pass) -> torch.Tensor:
        """Run one pass: its tokens join the tree; returns their hidden states (row = slot - base).

        Replies still to be confirmed (see `session`) are confirmed in this pass: `_new_pass` queued
        their closing tokens first; `SpeculationError` if the model would not have written them.
        """
        hidden = self._run_pass(session, step)
        for row, slots in step.confirming:
            self._confirm(session, row, self._logprobs(hidden[slots - step.base]))
        return hidden

    def _new_pass(self, session: _Session) -> _Pass:
        """A pass that starts with the closing tokens of the replies still to be confirmed."""
        step = _Pass(session)
        for row in session.unconfirmed:
            tokens = row.known + row.closing[:-1]  # the end of turn is confirmed, never fed
            slots = step.add(
                torch.tensor(row.slots),
                self._embed_text(tokens),
                _text_positions(row, row.next_position, len(tokens)),
            )
            row.slots.extend(slots.tolist())
            row.known = []
            step.confirming.append((row, slots))
            self._keep(session, row)
        session.unconfirmed = []
        return step

    def _speculate(self, session: _Session, row: _Row) -> None:
        """Finish the row now if its draft says how it ends; the model confirms it in the next pass."""
        if not session.speculate or row.draft is None:
            return
        closing = list(row.draft.ending(row.generated))
        if not closing or closing[-1] not in self.end_ids:
            return
        if len(row.generated) + len(closing) > row.max_new_tokens:
            return
        self._speculations[0] += 1
        row.closing = closing
        row.generated.extend(closing)
        row.done = True
        session.unconfirmed.append(row)
        row.draft.learn(row.generated)

    def _confirm(self, session: _Session, row: _Row, logprobs: torch.Tensor) -> None:
        top = logprobs.topk(2, dim=-1)
        tolerance = TIE_TOLERANCE.get(self.model.dtype, 0.05)
        start = len(row.prompt) + len(row.generated) - len(row.closing)
        for j, expected in enumerate(row.closing):
            chosen, margin = int(top.indices[j, 0]), float(top.values[j, 0] - top.values[j, 1])
            if chosen != expected or margin < tolerance:
                self._speculations[1] += 1
                raise SpeculationError(
                    f"the model did not end its reply as its draft said (token {chosen}, not {expected})"
                )
            row.logprobs.append(float(logprobs[j, expected]))
            row.branch.logprobs[start + j] = row.logprobs[-1]  # type: ignore[union-attr]

    def _run_pass(self, session: _Session, step: _Pass) -> torch.Tensor:
        base, total = step.base, step.size
        mask = torch.zeros(total, base + total, dtype=torch.bool)
        offset = 0
        for visible, embeds in zip(step.visible, step.embeds, strict=True):
            n = embeds.shape[0]
            mask[offset : offset + n, visible] = True
            mask[offset : offset + n, base + offset : base + offset + n] = torch.ones(
                n, n, dtype=torch.bool
            ).tril()
            offset += n
        mask = mask.to(self.device)
        if self.model.config.get_text_config()._attn_implementation == "eager":
            dtype = self.model.dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=self.device).masked_fill(
                ~mask, torch.finfo(dtype).min
            )
        positions = torch.cat(step.positions, dim=1).to(self.device)
        positions = positions[:, None] if positions.shape[0] > 1 else positions
        with self._lock:
            hidden = self.model.model.language_model(
                inputs_embeds=torch.cat(step.embeds)[None],
                attention_mask=mask[None, None],
                position_ids=positions,
                cache=session.cache,
                use_cache=True,
            ).last_hidden_state[0]
        session.size += total
        return hidden

    def _logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.model.get_output_embeddings()(hidden).float(), dim=-1)

    def _add_sequences(
        self, session: _Session, step: _Pass, sequences: list[_Sequence], caps: list[int]
    ) -> list[torch.Tensor]:
        """Queue what is missing of each sequence; returns each sequence's slots, one per token.

        Each sequence continues the computed branch it shares most with, up to index `cap` at most
        (the tokens from `cap` on are always computed: their logits are wanted). Sequences that share
        more with each other than with any branch compute their common part once.
        """
        if not sequences:
            return []
        empty = torch.empty(0, dtype=torch.long)
        best = []
        for sequence, cap in zip(sequences, caps, strict=True):
            matches = [(0, empty)]
            for branch in session.branches:
                p = sequence.common(branch.ids, branch.tags, min(cap, branch.slots.shape[0]))
                matches.append((p, branch.slots[:p]))
            best.append(max(matches, key=lambda match: match[0]))
        common = min(caps)
        for sequence in sequences[1:]:
            common = sequences[0].common(sequence.ids, sequence.tags, common)
        reused, prefix = best[0]
        if len(sequences) > 1 and all(p == reused for p, _ in best) and common > reused:
            first = sequences[0]
            shared = step.add(prefix, self._embed(first, reused, common), first.positions[:, reused:common])
            best = [(common, torch.cat([prefix, shared]))] * len(sequences)
        maps = []
        for sequence, (p, slots) in zip(sequences, best, strict=True):
            own = step.add(slots, self._embed(sequence, p), sequence.positions[:, p:])
            maps.append(torch.cat([slots, own]))
        return maps

    # -- generation ----------------------------------------------------------------------------

    def _row(
        self, session: _Session, conversation: Conversation, max_new_tokens: int, draft: Draft | None
    ) -> _Row:
        if not conversation.turns or conversation.turns[-1].role != "user":
            raise ValueError("generate needs a conversation that ends with a user turn")
        text = self.render(conversation, add_generation_prompt=True)
        draft = draft if draft is not None else self._answers
        return _Row(self._sequence(session, text, conversation.images), max_new_tokens, draft)

    def prefetch(
        self, conversation: Conversation, max_new_tokens: int = 128, draft: Draft | None = None
    ) -> None:
        """Ask now for a greedy reply that a later `generate` of the same conversation will return.

        It is decoded in the same forward passes as the next generations of the session; `draft`
        (for example `box_draft`) proposes tokens the model then only has to confirm. Outside a
        session, or on the plain path, this does nothing.
        """
        session = _SESSION.get()
        if session is None or not self.fast:
            return
        try:
            with torch.inference_mode():
                session.rows.append(self._row(session, conversation, max_new_tokens, draft))
        except _FallBack:
            return

    def generate(self, conversation: Conversation, max_new_tokens: int = 128) -> str:
        """Greedy reply to a conversation that ends with a user turn (the plain path's reply)."""
        if not self.fast:
            return super().generate(conversation, max_new_tokens)
        try:
            with self._current() as session, torch.inference_mode():
                wanted = self._row(session, conversation, max_new_tokens, None)
                row = next((r for r in session.rows if _same_request(r, wanted)), None)
                if row is None:
                    row = wanted
                    session.rows.append(row)
                while not row.done:
                    self._step(session, [r for r in session.rows if not r.done])
                session.rows.remove(row)
        except _FallBack:
            return super().generate(conversation, max_new_tokens)
        if row.tied:
            return super().generate(conversation, max_new_tokens)
        return self.tokenizer.decode(row.generated, skip_special_tokens=True).strip()

    def _step(self, session: _Session, rows: list[_Row]) -> None:
        """One forward pass for the unfinished rows: feed what is known and the drafts, then verify."""
        step = self._new_pass(session)
        fresh = [row for row in rows if not row.slots]
        maps = self._add_sequences(
            session, step, [r.prompt for r in fresh], [len(r.prompt) - 1 for r in fresh]
        )
        for row, slots in zip(fresh, maps, strict=True):
            row.slots = slots.tolist()
        planned = []
        for row in rows:
            if row.known:
                position = row.next_position
                known = step.add(
                    torch.tensor(row.slots), self._embed_text(row.known), _text_positions(row, position, 1)
                )
                row.slots.extend(known.tolist())
                row.known = []
            drafts = list(row.draft.propose(row.generated)) if row.draft else []
            fed = drafts[:-1] if drafts and drafts[-1] in self.end_ids else drafts
            fed = fed[: max(0, row.max_new_tokens - len(row.generated) - 1)]
            draft_slots = torch.empty(0, dtype=torch.long)
            if fed:
                draft_slots = step.add(
                    torch.tensor(row.slots),
                    self._embed_text(fed),
                    _text_positions(row, row.next_position, len(fed)),
                )
            planned.append((row, drafts, draft_slots))
        hidden = self._forward(session, step)
        for row, drafts, draft_slots in planned:
            queries = torch.cat([torch.tensor(row.slots[-1:]), draft_slots]) - step.base
            self._verify(session, row, drafts, draft_slots.tolist(), self._logprobs(hidden[queries]))

    def _verify(
        self, session: _Session, row: _Row, drafts: list[int], draft_slots: list[int], logprobs: torch.Tensor
    ) -> None:
        """Keep the drafts the model would have chosen; the first disagreement is the model's own token.

        A choice whose runner-up is within rounding distance (`TIE_TOLERANCE`) could go the other way
        in the plain computation: the row stops there and the plain path generates the reply.
        """
        top = logprobs.topk(2, dim=-1)
        margins = (top.values[:, 0] - top.values[:, 1]).tolist()
        tolerance = TIE_TOLERANCE.get(self.model.dtype, 0.05)
        for j, token in enumerate(top.indices[:, 0].tolist()):
            if margins[j] < tolerance:
                row.tied = row.done = True
                return
            row.generated.append(token)
            row.logprobs.append(float(logprobs[j, token]))
            fed = j < len(draft_slots) and token == drafts[j]
            if fed:
                row.slots.append(draft_slots[j])
            if token in self.end_ids or len(row.generated) >= row.max_new_tokens:
                row.done = True
                self._keep(session, row)
                if row.draft is not None:
                    row.draft.learn(row.generated)
                return
            if not fed:
                row.known = [token]
                self._speculate(session, row)
                return

    def _keep(self, session: _Session, row: _Row) -> None:
        """Record a finished generation as a branch of the tree, with its tokens' log-probabilities."""
        n = len(row.prompt)
        generated = torch.tensor(row.generated, dtype=torch.long)
        row.branch = _Branch(
            ids=torch.cat([row.prompt.ids, generated]),
            tags=torch.cat([row.prompt.tags, torch.zeros_like(generated)]),
            slots=torch.tensor(row.slots),
            logprobs={n + k: lp for k, lp in enumerate(row.logprobs)},
        )
        session.branches.append(row.branch)

    # -- scoring -------------------------------------------------------------------------------

    def score(self, conversation: Conversation, candidates: Sequence[str]) -> list[float]:
        """Mean negative log-likelihood of each candidate's tokens as the reply (the plain path's scores)."""
        if not self.fast:
            return super().score(conversation, candidates)
        if not candidates:
            return []
        if any(not isinstance(c, str) or not c.strip() for c in candidates):
            raise ValueError("candidates must be non-empty strings")
        try:
            with self._current() as session, torch.inference_mode():
                return self._score(session, conversation, candidates)
        except _FallBack:
            return super().score(conversation, candidates)

    def _score(self, session: _Session, conversation: Conversation, candidates: Sequence[str]) -> list[float]:
        images = conversation.images
        prompt = self._sequence(session, self.render(conversation, add_generation_prompt=True), images)
        n = len(prompt)
        rows = []
        for reply in candidates:
            row = self._sequence(
                session, self.render(conversation.assistant(reply), continue_final=True), images
            )
            if len(row) <= n or not torch.equal(row.ids[:n], prompt.ids):
                raise PromptMismatchError(
                    f"the chat template's prompt is not a prefix of prompt + reply for reply {reply!r}; "
                    "the reply cannot be scored separately"
                )
            rows.append(row)
        scores = [self._recorded(session, row, n) for row in rows]
        todo = [i for i, score in enumerate(scores) if score is None]
        if todo:
            step = self._new_pass(session)
            maps = self._add_sequences(session, step, [rows[i] for i in todo], [n - 1] * len(todo))
            hidden = self._forward(session, step)
            for i, slots in zip(todo, maps, strict=True):
                row = rows[i]
                logprobs = self._logprobs(hidden[slots[n - 1 : -1] - step.base])
                token_logprobs = logprobs.gather(-1, row.ids[n:, None].to(self.device))[:, 0]
                scores[i] = -token_logprobs.mean().item()
                session.branches.append(
                    _Branch(row.ids, row.tags, slots, {n + k: float(v) for k, v in enumerate(token_logprobs)})
                )
        return scores  # type: ignore[return-value]

    def _recorded(self, session: _Session, row: _Sequence, start: int) -> float | None:
        """The score of row[start:] from log-probabilities recorded earlier in the session, if any."""
        for branch in session.branches:
            if all(i in branch.logprobs for i in range(start, len(row))) and row.common(
                branch.ids, branch.tags, len(row)
            ) == len(row):
                return -sum(branch.logprobs[i] for i in range(start, len(row))) / (len(row) - start)
        return None

    def input_size(self, image: Image.Image) -> tuple[int, int]:
        """The (width, height) the image processor resizes `image` to."""
        session = _SESSION.get()
        if session is None or not self.fast:
            return super().input_size(image)
        with torch.inference_mode():
            return self._image(session, image).input_size


class SpeculationError(RuntimeError):
    """A reply returned on its draft's word was not the model's: redo what used it, without speculation."""


class _FallBack(Exception):
    """The fast path cannot serve this backend; the plain one does."""


def _text_positions(row: _Row, start: int, n: int) -> torch.Tensor:
    return torch.arange(start, start + n).expand(row.prompt.positions.shape[0], -1)


def _same_request(row: _Row, wanted: _Row) -> bool:
    return (
        row.max_new_tokens == wanted.max_new_tokens
        and len(row.prompt) == len(wanted.prompt)
        and row.prompt.common(wanted.prompt.ids, wanted.prompt.tags, len(row.prompt)) == len(row.prompt)
    )


__all__ = [
    "FAST_MODEL_TYPES",
    "SPECULATION_FAILURES_ALLOWED",
    "TIE_TOLERANCE",
    "AnswerDraft",
    "BoxDraft",
    "Draft",
    "FastHFBackend",
    "SpeculationError",
]
