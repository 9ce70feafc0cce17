"""The transformers backend: image-text-to-text models through their processor's chat template."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from functools import cached_property
from importlib import resources
from pathlib import Path

import torch
from PIL import Image

from df_agent.backends import caveats
from df_agent.backends.base import Abilities, Backend, Conversation, Generation, PromptMismatchError, Request
from df_agent.backends.checkpoints import quiet_loading, resolve_checkpoint
from df_agent.backends.hf_fast.backend import FastPath
from df_agent.backends.text_safety import TextGuard
from df_agent.boxes import BoxConvention

# model_type -> (box convention, prompt family); see docs/protocol.md.
FAMILIES: dict[str, tuple[BoxConvention, str]] = {
    "llava": (BoxConvention.FRACTION, "dualfocus"),
    "llava_next": (BoxConvention.FRACTION, "dualfocus"),
    "llava_onevision": (BoxConvention.FRACTION, "dualfocus"),
    "qwen2_vl": (BoxConvention.QWEN_1000, "qwen2_vl"),
    "qwen2_5_vl": (BoxConvention.PIXELS, "qwen2_vl"),
    "qwen3_vl": (BoxConvention.JSON_1000, "qwen2_vl"),
}


SHIPPED_MODEL_ID = "df-agent/focusshapes-small"


def shipped_model_path() -> Path:
    """The folder of the small model trained by this project and shipped inside the package."""
    path = Path(str(resources.files("df_agent") / "model"))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the shipped model is missing from {path}; reinstall df-agent")
    return path


def default_device() -> str:
    """cuda when a GPU is visible, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


class PlainHFBackend(Backend):
    """A transformers image-text-to-text model and its processor, each call computed from scratch.

    `HFBackend` adds the fast path inside sessions; this is the plain path it falls back to.

    Args:
        model: A loaded `AutoModelForImageTextToText` model.
        processor: Its `AutoProcessor`, with a chat template.
        model_id: The name recorded in results.
        box_convention: How the model writes boxes; default from `model.config.model_type`.
        prompt_family: The prompt set; default from `model.config.model_type`.
    """

    @property
    def abilities(self) -> Abilities:
        """Prompt log-probabilities (`score`) and generation log-probabilities; no session."""
        return Abilities(prompt_logprobs=True, generation_logprobs=True)

    def __init__(
        self,
        model: torch.nn.Module,
        processor: object,
        *,
        model_id: str,
        box_convention: BoxConvention | None = None,
        prompt_family: str | None = None,
    ) -> None:
        model_type = getattr(model.config, "model_type", "")
        known = FAMILIES.get(model_type)
        if known is None and (box_convention is None or prompt_family is None):
            raise ValueError(
                f"unknown model type {model_type!r}: pass box_convention and prompt_family "
                f"(known types: {', '.join(FAMILIES)})"
            )
        self.model = model.eval()
        self.processor = processor
        self.model_id = model_id
        self.box_convention = box_convention or known[0]  # type: ignore[index]
        self.prompt_family = prompt_family or known[1]  # type: ignore[index]
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path | None = None,
        *,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        model_id: str | None = None,
        **kwargs: object,
    ) -> HFBackend:
        """Load a checkpoint folder or hub id with `AutoModelForImageTextToText` and `AutoProcessor`.

        Without `path_or_id`, the shipped demonstration model (FocusShapes scenes only). `model_id`
        names the model in results and memory keys; default the path or hub id (`SHIPPED_MODEL_ID`
        for the shipped model). The source is checked first (`resolve_checkpoint`): fails fast.
        """
        if path_or_id is None:
            path_or_id, model_id = shipped_model_path(), model_id or SHIPPED_MODEL_ID
        model_id, source = model_id or str(path_or_id), resolve_checkpoint(path_or_id)  # fails fast
        from transformers import AutoModelForImageTextToText, AutoProcessor

        device = device or default_device()
        if dtype is None:
            dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        try:
            processor = AutoProcessor.from_pretrained(source)
            with quiet_loading():  # the weight-loading bar only when loading takes a while
                model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype).to(device)
        except OSError as err:
            raise OSError(f"could not load a model from {path_or_id!r}: {err}") from err
        return cls(model, processor, model_id=model_id, **kwargs)  # type: ignore[arg-type]

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @cached_property
    def text_guard(self) -> TextGuard:
        """What keeps text from becoming the template's control tokens (`df_agent.backends.text_safety`)."""
        return TextGuard.for_processor(self.processor)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- encoding ------------------------------------------------------------------------------

    def render(
        self, conversation: Conversation, *, add_generation_prompt: bool = False, continue_final: bool = False
    ) -> str:
        """The conversation as the chat template writes it (text with image placeholders).

        User text is guarded (`text_guard`): it never renders as a control token or role marker.
        """
        return self.processor.apply_chat_template(
            self.text_guard.messages(conversation),
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final,
        )

    def encode(self, texts: list[str], images: list[Image.Image], *, padding_side: str = "right") -> dict:
        """Tokenise rendered texts with their images (flat, in order) into model inputs on the device."""
        self.tokenizer.padding_side = padding_side
        batch = self.processor(text=texts, images=images or None, return_tensors="pt", padding=len(texts) > 1)
        return {k: v.to(self.device) if hasattr(v, "to") else v for k, v in batch.items()}

    def encode_reply(self, conversation: Conversation, replies: Sequence[str], *, end_of_turn: bool) -> tuple:
        """Inputs for `conversation` + each reply, and per row the (start, end) of the reply's tokens.

        The prompt boundary comes from the same processor call that sees the images, and the
        prompt's ids must be a prefix of every full row (else `PromptMismatchError`). With
        `end_of_turn` the template's end-of-turn tokens count as part of the reply (training);
        without it only the reply's own tokens do (scoring).
        """
        images = conversation.images
        prompt = self.render(conversation, add_generation_prompt=True)
        prompt_ids = self.encode([prompt], images)["input_ids"][0]
        fulls = [
            self.render(conversation.assistant(reply), continue_final=not end_of_turn) for reply in replies
        ]
        batch = self.encode(fulls, images * len(replies))
        spans = []
        for row, reply in enumerate(replies):
            ids = batch["input_ids"][row]
            length = int(batch["attention_mask"][row].sum())
            n = prompt_ids.shape[0]
            if length <= n or not torch.equal(ids[:n], prompt_ids):
                raise PromptMismatchError(
                    f"the chat template's prompt is not a prefix of prompt + reply for reply {reply!r}; "
                    "the reply cannot be scored separately"
                )
            spans.append((n, length))
        return batch, spans

    # -- the two verbs -------------------------------------------------------------------------

    def generate(self, conversation: Conversation, max_new_tokens: int = 128) -> str:
        """Greedy reply to a conversation that ends with a user turn."""
        return self.generate_many([Request(conversation, max_new_tokens)])[0].text

    def generate_many(self, requests: Sequence[Request]) -> list[Generation]:
        """Greedy replies, one `model.generate` each, with their tokens' log-probabilities.

        The log-probabilities are those of the chosen tokens under the model's logits (the end of
        turn excluded), so their mean is the reply's own mean NLL.
        """
        return [self._generate_one(r.conversation, r.max_new_tokens) for r in requests]

    def _generate_one(self, conversation: Conversation, max_new_tokens: int) -> Generation:
        if not conversation.turns or conversation.turns[-1].role != "user":
            raise ValueError("generate needs a conversation that ends with a user turn")
        text = self.render(conversation, add_generation_prompt=True)
        with self._lock, torch.inference_mode():
            inputs = self.encode([text], conversation.images)
            output = self.model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
                output_logits=True,
                return_dict_in_generate=True,
            )
        new_tokens = output.sequences[0, inputs["input_ids"].shape[1] :]
        logprobs = [
            float(torch.log_softmax(step[0].float(), dim=-1)[token])
            for step, token in zip(output.logits, new_tokens.tolist(), strict=False)
        ]
        eos = self.model.generation_config.eos_token_id
        end_ids = {eos} if isinstance(eos, int) else set(eos or [])
        if len(new_tokens) and int(new_tokens[-1]) in end_ids:
            logprobs = logprobs[:-1]
        return Generation(
            self.tokenizer.decode(new_tokens, skip_special_tokens=True).strip(), tuple(logprobs)
        )

    def score(self, conversation: Conversation, candidates: Sequence[str]) -> list[float]:
        """Mean negative log-likelihood of each candidate's tokens as the reply (lower is better).

        All candidates go through one batched forward pass; each row's score is computed
        from the logits over that candidate's tokens alone.
        """
        if not candidates:
            return []
        if any(not isinstance(c, str) or not c.strip() for c in candidates):
            raise ValueError("candidates must be non-empty strings")
        candidates = [self.text_guard.plain(c) for c in candidates]  # may be user text
        with self._lock, torch.inference_mode():
            batch, spans = self.encode_reply(conversation, candidates, end_of_turn=False)
            return _reply_nlls(self.model(**batch).logits, batch["input_ids"], spans)

    def score_many(self, items: Sequence[tuple[Conversation, Sequence[str]]]) -> list[list[float]]:
        """`score` for several items (rows of different images) in ONE batched forward pass.

        Each item's prompt boundary comes from a processor call that sees its images, and must be
        a prefix of each of its rows (else `PromptMismatchError`), as in `encode_reply`.
        """
        for _, candidates in items:
            if any(not isinstance(c, str) or not c.strip() for c in candidates):
                raise ValueError("candidates must be non-empty strings")
        # candidates may be user text: guarded as in `score`
        items = [(conversation, [self.text_guard.plain(c) for c in cands]) for conversation, cands in items]
        rows = [(i, c) for i, (_, candidates) in enumerate(items) for c in candidates]
        if not rows:
            return [[] for _ in items]
        with self._lock, torch.inference_mode():
            prompts = self.encode(
                [self.render(conversation, add_generation_prompt=True) for conversation, _ in items],
                [image for conversation, _ in items for image in conversation.images],
            )
            fulls = [self.render(items[i][0].assistant(c), continue_final=True) for i, c in rows]
            batch = self.encode(fulls, [image for i, _ in rows for image in items[i][0].images])
            spans = []
            for row, (i, reply) in enumerate(rows):
                n = int(prompts["attention_mask"][i].sum())
                ids, length = batch["input_ids"][row], int(batch["attention_mask"][row].sum())
                if length <= n or not torch.equal(ids[:n], prompts["input_ids"][i, :n]):
                    raise PromptMismatchError(
                        f"the chat template's prompt is not a prefix of prompt + reply for reply {reply!r}; "
                        "the reply cannot be scored separately"
                    )
                spans.append((n, length))
            scores = _reply_nlls(self.model(**batch).logits, batch["input_ids"], spans)
        out: list[list[float]] = [[] for _ in items]
        for (i, _), score in zip(rows, scores, strict=True):
            out[i].append(score)
        return out

    @property
    def context_length(self) -> int | None:
        """The language model's positions (`max_position_embeddings`)."""
        return getattr(self.model.config.get_text_config(), "max_position_embeddings", None)

    def count_tokens(self, text: str) -> int | None:
        """The tokenizer's count for `text` (no special tokens)."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def input_size(self, image: Image.Image) -> tuple[int, int]:
        """The (width, height) the image processor resizes `image` to."""
        image_processor = self.processor.image_processor
        features = image_processor(images=[image], return_tensors="pt")
        grid = features.get("image_grid_thw")
        if grid is not None:  # Qwen-style dynamic resolution: grid of patches
            patch = image_processor.patch_size
            _, rows, cols = (int(v) for v in grid[0])
            return cols * patch, rows * patch
        height, width = features["pixel_values"].shape[-2:]
        return int(width), int(height)

    def input_warnings(self, image: Image.Image, question: str) -> list[str]:
        """The shipped model's note, question words the tokenizer lacks, an image unlike FocusShapes."""
        shipped = self.model_id == SHIPPED_MODEL_ID
        return caveats.input_warnings(self.tokenizer, question, image, shipped=shipped)


class HFBackend(FastPath, PlainHFBackend):
    """A transformers image-text-to-text model, fast inside a `session()` (see `FastPath`).

    Outside a session every call is the plain one (`PlainHFBackend`); inside one, images are encoded
    once, prefixes are reused and `generate_many` decodes its requests side by side.

    Args:
        model, processor, model_id, box_convention, prompt_family: As for `PlainHFBackend`.
        fast: False turns the fast path off (``abilities.session`` is then False).
    """


def _reply_nlls(logits: torch.Tensor, ids: torch.Tensor, spans: Sequence[tuple[int, int]]) -> list[float]:
    """Each row's mean NLL over its tokens start..end-1 (token t is predicted at position t - 1)."""
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token_logprobs = logprobs.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return [-token_logprobs[row, start - 1 : end - 1].mean().item() for row, (start, end) in enumerate(spans)]


def encode_for_training(backend: PlainHFBackend, conversation: Conversation, reply: str) -> dict:
    """Model inputs with `labels`: -100 everywhere but the reply and its end-of-turn tokens."""
    batch, [(start, end)] = backend.encode_reply(conversation, [reply], end_of_turn=True)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[0, start:end] = batch["input_ids"][0, start:end]
    return {**batch, "labels": labels}


# The fast backend's former name: the fast path is part of `HFBackend` now.
FastHFBackend = HFBackend

__all__ = [
    "FAMILIES",
    "FastHFBackend",
    "HFBackend",
    "PlainHFBackend",
    "PromptMismatchError",
    "default_device",
    "encode_for_training",
    "shipped_model_path",
]
