"""The transformers backend, fast: one vision pass per image and one growing key/value cache per question.

Inside a `session()` (one DualFocus question), `FastPath` (the fast part of `HFBackend`) keeps a
*prefix tree* of everything it computed in a single key/value cache: the image prefix that the macro
question and the box request share, the box turn that the micro turn continues, the micro prefix that
the scoring pass continues. Each forward pass starts where the longest computed prefix ends; several
branches (the macro answer and the box, two candidates) go through one pass side by side under a tree
attention mask, with the rotary positions each would have alone; each image is encoded once.

Decoding is greedy and checks as it goes: a `Draft` proposes tokens (the brackets and commas a box's
grammar fixes, a box or an answer seen before); the model scores them in the same pass and only those
it would have chosen itself are kept. So answers are the plain greedy answers and scores the plain
scores, up to floating-point rounding (fp32: about 1e-6), and a choice between two tokens closer than
rounding could tell apart (`TIE_TOLERANCE`) is left to the plain path. In a `session(speculate=True)`
a reply whose draft says how it ends is returned before the model confirms the end, which rides on
the next pass (`SpeculationError`, a `GuessRejected`, if the model disagreed). Models, attention
kernels or generation settings this path does not handle fall back to the plain `PlainHFBackend`
methods, as does every call made outside a session.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cached_property

import torch
from PIL import Image

from df_agent.backends.base import (
    Abilities,
    Conversation,
    Generation,
    GuessRejected,
    PromptMismatchError,
    Request,
)
from df_agent.backends.hf_fast.drafts import AnswerDraft, BoxDraft, Draft
from df_agent.backends.hf_fast.tree import Branch, EncodedImage, Pass, Row, Session, TokenSequence

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
_SESSION: ContextVar[Session | None] = ContextVar("df_agent_fast_session", default=None)


class FastPath:
    """The fast path of `df_agent.backends.hf.HFBackend`: same `generate` and `score` results, less work.

    A mixin over `PlainHFBackend` (which its `super()` calls reach). Use `session()` around the calls
    of one question (`DualFocus.ask` does): images are encoded once, and each forward pass continues
    the longest prefix already computed in the session; calls outside a session are the plain ones.
    `generate_many` decodes its requests side by side in the same forward passes (the macro answer and
    the box request), a ``reply="box"`` request under `box_draft`, the others under an `AnswerDraft`.
    `fast` says whether this model takes the fast path at all (else `abilities.session` is False).
    `from_backend` shares an existing backend's model and processor.
    """

    def __init__(self, *args: object, fast: bool = True, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self._checked = False
        self._speculations = [0, 0]  # endings guessed, endings wrong
        self._answers = AnswerDraft(min(self.end_ids)) if self.end_ids else None
        self.fast = fast and self._fast_supported()

    @classmethod
    def from_backend(cls, backend, *, fast: bool = True):
        """A backend of this class over the same model and processor as `backend` (nothing is copied)."""
        return cls(
            backend.model,
            backend.processor,
            model_id=backend.model_id,
            box_convention=backend.box_convention,
            prompt_family=backend.prompt_family,
            fast=fast,
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
        session = Session(super().device, speculate and wrong <= SPECULATION_FAILURES_ALLOWED + guessed // 20)
        session.owner = self
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
        session = self._active()
        return super().device if session is None else session.device

    @property
    def tokens_computed(self) -> int:
        """Tokens run through the language model so far in the current session (0 outside one)."""
        session = self._active()
        return 0 if session is None else session.size

    def _active(self) -> Session | None:
        """The session this backend opened and the caller is in, if any."""
        session = _SESSION.get()
        return session if session is not None and session.owner is self else None

    # -- encoding ------------------------------------------------------------------------------

    def _image(self, session: Session, image: Image.Image) -> EncodedImage:
        """The image's features, computed once per session.

        An image object seen before in the session is found by identity; a new object is compared
        by pixels only with seen images of the same mode and size (the crop is never compared).
        """
        for seen, entry in session.images:
            if seen is image:
                return entry
        same_shape = [(s, e) for s, e in session.images if (s.size, s.mode) == (image.size, image.mode)]
        pixels = image.tobytes() if same_shape else b""
        entry = next((e for s, e in same_shape if s.tobytes() == pixels), None)
        if entry is None:
            entry = self._encode_image(image, tag=len({id(e) for _, e in session.images}) + 1)
        session.images.append((image, entry))
        return entry

    def _encode_image(self, image: Image.Image, tag: int) -> EncodedImage:
        inputs = self.processor.image_processor(images=[image], return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device)
        grid = inputs.get("image_grid_thw")
        with self._lock:
            if grid is None:
                out = self.model.get_image_features(pixel_values=pixel_values)
                height, width = pixel_values.shape[-2:]
                return EncodedImage(tag, out.pooler_output[0], None, (int(width), int(height)))
            grid = grid.to(self.device)
            out = self.model.get_image_features(pixel_values=pixel_values, image_grid_thw=grid)
        patch = self.processor.image_processor.patch_size
        return EncodedImage(
            tag, out.pooler_output[0], grid, (int(grid[0, 2]) * patch, int(grid[0, 1]) * patch)
        )

    def _sequence(self, session: Session, text: str, images: Sequence[Image.Image]) -> TokenSequence:
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
        sequence = TokenSequence(ids, tags, positions, seen)
        if not self._checked:
            self._check_against_processor(sequence, text, images)
        session.sequences[key] = sequence
        return sequence

    def _check_against_processor(
        self, sequence: TokenSequence, text: str, images: Sequence[Image.Image]
    ) -> None:
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

    def _embed(self, sequence: TokenSequence, start: int, end: int | None = None) -> torch.Tensor:
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

    def _forward(self, session: Session, step: Pass) -> torch.Tensor:
        """Run one pass: its tokens join the tree; returns their hidden states (row = slot - base).

        Replies still to be confirmed (see `session`) are confirmed in this pass: `_new_pass` queued
        their closing tokens first; `SpeculationError` if the model would not have written them.
        """
        hidden = self._run_pass(session, step)
        for row, slots in step.confirming:
            self._confirm(session, row, self._logprobs(hidden[slots - step.base]))
        return hidden

    def _new_pass(self, session: Session) -> Pass:
        """A pass that starts with the closing tokens of the replies still to be confirmed."""
        step = Pass(session)
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

    def _speculate(self, session: Session, row: Row) -> None:
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

    def _confirm(self, session: Session, row: Row, logprobs: torch.Tensor) -> None:
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

    def _run_pass(self, session: Session, step: Pass) -> torch.Tensor:
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
        self, session: Session, step: Pass, sequences: list[TokenSequence], caps: list[int]
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

    def _row(self, session: Session, request: Request) -> Row:
        conversation = request.conversation
        if not conversation.turns or conversation.turns[-1].role != "user":
            raise ValueError("generate needs a conversation that ends with a user turn")
        text = self.render(conversation, add_generation_prompt=True)
        draft = self.box_draft if request.reply == "box" else None
        return Row(
            self._sequence(session, text, conversation.images),
            request.max_new_tokens,
            draft if draft is not None else self._answers,
        )

    def generate(self, conversation: Conversation, max_new_tokens: int = 128) -> str:
        """Greedy reply to a conversation that ends with a user turn (the plain path's reply)."""
        return self.generate_many([Request(conversation, max_new_tokens)])[0].text

    def generate_many(self, requests: Sequence[Request]) -> list[Generation]:
        """Greedy replies to the requests, decoded side by side in the same forward passes.

        Each `Generation` carries its tokens' log-probabilities (the end of turn excluded); a reply
        returned on a guess (see `session`) whose last tokens are not confirmed yet carries None.
        A reply the fast path cannot decide (a tie within rounding) is the plain path's.
        """
        session = self._active()
        if session is None or not self.fast:
            return super().generate_many(requests)
        try:
            with torch.inference_mode():
                rows = [self._row(session, request) for request in requests]
                session.rows.extend(rows)
                while not all(row.done for row in rows):
                    self._step(session, [r for r in session.rows if not r.done])
                for row in rows:
                    session.rows.remove(row)
        except _FallBack:
            return super().generate_many(requests)
        plain = super().generate_many
        return [
            plain([request])[0] if row.tied else self._generation(row)
            for row, request in zip(rows, requests, strict=True)
        ]

    def _generation(self, row: Row) -> Generation:
        tokens = row.generated
        ended = bool(tokens) and tokens[-1] in self.end_ids
        unconfirmed = bool(row.closing) and row.closing[:-1] and len(row.logprobs) < len(tokens)
        logprobs = None if unconfirmed else tuple(row.logprobs[: len(tokens) - ended])
        return Generation(self.tokenizer.decode(tokens, skip_special_tokens=True).strip(), logprobs)

    def _step(self, session: Session, rows: list[Row]) -> None:
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
        self, session: Session, row: Row, drafts: list[int], draft_slots: list[int], logprobs: torch.Tensor
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

    def _keep(self, session: Session, row: Row) -> None:
        """Record a finished generation as a branch of the tree, with its tokens' log-probabilities."""
        n = len(row.prompt)
        generated = torch.tensor(row.generated, dtype=torch.long)
        row.branch = Branch(
            ids=torch.cat([row.prompt.ids, generated]),
            tags=torch.cat([row.prompt.tags, torch.zeros_like(generated)]),
            slots=torch.tensor(row.slots),
            logprobs={n + k: lp for k, lp in enumerate(row.logprobs)},
        )
        session.branches.append(row.branch)

    # -- scoring -------------------------------------------------------------------------------

    @property
    def abilities(self) -> Abilities:
        """Prompt and generation log-probabilities; a session when the model takes the fast path."""
        return Abilities(prompt_logprobs=True, generation_logprobs=True, session=self.fast)

    def score(self, conversation: Conversation, candidates: Sequence[str]) -> list[float]:
        """Mean negative log-likelihood of each candidate's tokens as the reply (the plain path's scores)."""
        session = self._active()
        if session is None or not self.fast:
            return super().score(conversation, candidates)
        if not candidates:
            return []
        if any(not isinstance(c, str) or not c.strip() for c in candidates):
            raise ValueError("candidates must be non-empty strings")
        candidates = [self.text_guard.plain(c) for c in candidates]  # as the plain path: may be user text
        try:
            with torch.inference_mode():
                return self._score(session, conversation, candidates)
        except _FallBack:
            return super().score(conversation, candidates)

    def _score(self, session: Session, conversation: Conversation, candidates: Sequence[str]) -> list[float]:
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
                    Branch(row.ids, row.tags, slots, {n + k: float(v) for k, v in enumerate(token_logprobs)})
                )
        return scores  # type: ignore[return-value]

    def _recorded(self, session: Session, row: TokenSequence, start: int) -> float | None:
        """The score of row[start:] from log-probabilities recorded earlier in the session, if any."""
        for branch in session.branches:
            if all(i in branch.logprobs for i in range(start, len(row))) and row.common(
                branch.ids, branch.tags, len(row)
            ) == len(row):
                return -sum(branch.logprobs[i] for i in range(start, len(row))) / (len(row) - start)
        return None

    def input_size(self, image: Image.Image) -> tuple[int, int]:
        """The (width, height) the image processor resizes `image` to."""
        session = self._active()
        if session is None or not self.fast:
            return super().input_size(image)
        with torch.inference_mode():
            return self._image(session, image).input_size


class SpeculationError(GuessRejected):
    """A reply returned on its draft's word was not the model's: redo what used it, without speculation."""


class _FallBack(Exception):
    """The fast path cannot serve this backend; the plain one does."""


def _text_positions(row: Row, start: int, n: int) -> torch.Tensor:
    return torch.arange(start, start + n).expand(row.prompt.positions.shape[0], -1)


__all__ = [
    "FAST_MODEL_TYPES",
    "SPECULATION_FAILURES_ALLOWED",
    "TIE_TOLERANCE",
    "AnswerDraft",
    "BoxDraft",
    "Draft",
    "FastPath",
    "SpeculationError",
]
