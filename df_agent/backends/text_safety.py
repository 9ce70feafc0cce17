"""Text from outside the model encodes as plain text, never as a chat template's control tokens.

A question, an option or a candidate answer is pasted into the chat template as it is, and the
tokenizer then matches its special tokens anywhere in the rendered text: a question with ``<image>``
counts as a second image placeholder, ``</s>`` ends the turn, ``ASSISTANT:`` starts a forged
reply. A `TextGuard` breaks every such string in untrusted text by inserting a zero-width space
(U+200B) before its last character: the text reads the same, the template's own control tokens are
the only ones in the conversation, and the tokenizer encodes the broken string as ordinary tokens
(byte-level tokenizers as the character's bytes, word-level ones as their unknown token).

Two strengths:

- `TextGuard.plain` (user turns, candidates scored as replies) breaks control strings and the
  template's role markers (``USER:``, ``ASSISTANT:``...), whitespace before their colon included.
- `TextGuard.literal` (assistant turns: the model's own replies echoed back, such as its box text)
  breaks control strings only, and keeps the grounding tokens a box is written with
  (`GROUNDING_TOKENS`, e.g. Qwen2-VL's ``<|box_start|>``). A reply is decoded without its special
  tokens, so a control string in it is text the model wrote piece by piece; role markers it wrote
  stay as it wrote them.

The backends apply it where they render text, so every caller is covered: transformers backends
with `TextGuard.for_processor` (every special or added token of the tokenizer, the processor's
image token, the role markers its chat template writes, and the common strings below); remote
backends (OpenAI-compatible servers, LangChain chat models), whose server renders the template,
with `REMOTE_GUARD`: the control strings of the common templates (`COMMON_CONTROL_STRINGS`, any
``<|name|>`` token) and `COMMON_ROLE_MARKERS`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

BREAK = "\u200b"  # zero-width space: invisible, not whitespace, in no control token
# Control strings of the common chat templates and vision models (LLaVA, Llama 2/3, Mistral, Qwen,
# Gemma, Phi, Pixtral, Idefics...); any ``<|name|>`` token is matched by `PIPE_TOKEN` as well.
COMMON_CONTROL_STRINGS: tuple[str, ...] = (
    "<image>", "<video>", "<s>", "</s>", "<unk>", "<pad>", "<bos>", "<eos>", "<mask>",
    "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "[IMG]", "[IMG_BREAK]", "[IMG_END]",
    "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[AVAILABLE_TOOLS]", "[TOOL_CALLS]",
    "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>",
    "<fake_token_around_image>", "<end_of_utterance>", "<global-img>", "<row_1_col_1>",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|image_pad|>", "<|video_pad|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|box_start|>", "<|box_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|quad_start|>", "<|quad_end|>",
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|image|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>",
)  # fmt: skip
COMMON_ROLE_MARKERS: tuple[str, ...] = ("USER:", "ASSISTANT:", "SYSTEM:")
# The tokens a grounding model writes its boxes with (Qwen-VL, Qwen2-VL): kept in the model's own replies,
# and in the box text `df_agent.boxes.format_box` writes for it, where they carry the box.
GROUNDING_TOKENS: tuple[str, ...] = (
    "<|box_start|>", "<|box_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|quad_start|>",
    "<|quad_end|>", "<box>", "</box>", "<ref>", "</ref>",
)  # fmt: skip
PIPE_TOKEN = r"<\|[^<>|\s]{1,64}\|>"
_SENTINELS = ("dfguardqone", "dfguardatwo", "dfguardqthree")


def _marker_pattern(marker: str) -> str:
    """A role marker as a pattern that also matches whitespace between its words and punctuation."""
    return r"\s*".join(re.escape(part) for part in re.findall(r"\w+|[^\w\s]", marker))


@dataclass(frozen=True)
class TextGuard:
    """The strings that must not reach a chat template whole, and the two ways to break them.

    Attributes:
        control_strings: Strings a tokenizer or template reads as control tokens (special tokens,
            image placeholders); matched exactly.
        role_markers: Plain-text role markers the template writes (``USER:``); matched with any
            whitespace before their punctuation.
    """

    control_strings: frozenset[str] = frozenset(COMMON_CONTROL_STRINGS)
    role_markers: tuple[str, ...] = COMMON_ROLE_MARKERS
    _literal: re.Pattern = field(init=False, repr=False, compare=False)
    _plain: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        strings = sorted(
            (s for s in self.control_strings if len(s) > 1 and BREAK not in s), key=len, reverse=True
        )
        controls = [PIPE_TOKEN, *(re.escape(s) for s in strings)]
        markers = [_marker_pattern(m) for m in sorted(set(self.role_markers), key=len, reverse=True)]
        kept = "|".join(re.escape(token) for token in GROUNDING_TOKENS)
        object.__setattr__(self, "_literal", re.compile(f"(?!{kept})(?:{'|'.join(controls)})"))
        object.__setattr__(self, "_plain", re.compile("|".join(controls + [m for m in markers if m])))

    def plain(self, text: str) -> str:
        """Untrusted text (a question, an option, a candidate): control strings and role markers broken."""
        return _break(self._plain, text)

    def literal(self, text: str) -> str:
        """The model's own text echoed back: control strings broken, grounding tokens kept, the rest as is."""
        return _break(self._literal, text)

    def turn_text(self, role: str, text: str) -> str:
        """A turn's text as it may be rendered: `literal` for assistant turns, `plain` for the rest."""
        return self.literal(text) if role == "assistant" else self.plain(text)

    def messages(self, conversation) -> list[dict]:
        """`Conversation.to_messages()` with every turn's text guarded (see `turn_text`)."""
        messages = conversation.to_messages()
        for message in messages:
            for block in message["content"]:
                if block["type"] == "text":
                    block["text"] = self.turn_text(message["role"], block["text"])
        return messages

    @classmethod
    def for_processor(cls, processor: object) -> TextGuard:
        """The guard of a transformers processor (or tokenizer) and its chat template.

        Control strings: the common ones, the tokenizer's special tokens, its added tokens that are
        not plain words, and the processor's image and video tokens. Role markers: the common ones
        and the last word before each message in the chat template, where it has punctuation
        (``USER:``, ``[INST]``), found by rendering a three-turn conversation.
        """
        tokenizer = getattr(processor, "tokenizer", processor)
        strings = set(COMMON_CONTROL_STRINGS) | set(getattr(tokenizer, "all_special_tokens", ()))
        for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
            content = str(getattr(token, "content", token))
            if getattr(token, "special", False) or re.search(r"[^\w\s]", content):
                strings.add(content)
        for name in ("image_token", "video_token"):
            value = getattr(processor, name, None)
            if isinstance(value, str):
                strings.add(value)
        strings = {s for s in strings if s.strip()}
        markers = dict.fromkeys((*COMMON_ROLE_MARKERS, *template_role_markers(processor, strings)))
        return cls(frozenset(strings), tuple(markers))


def template_role_markers(processor: object, control_strings: Iterable[str] = ()) -> list[str]:
    """The plain-text role markers a chat template writes before each message (none if it cannot render)."""
    first, second, third = _SENTINELS
    conversation = [
        {"role": "user", "content": [{"type": "text", "text": first}]},
        {"role": "assistant", "content": [{"type": "text", "text": second}]},
        {"role": "user", "content": [{"type": "text", "text": third}]},
    ]
    try:
        rendered = processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that needs other messages: only the common markers apply
        return []
    if not isinstance(rendered, str):
        return []
    controls = sorted(control_strings, key=len, reverse=True)
    markers = []
    for piece in re.split("|".join(_SENTINELS), rendered):
        for control in controls:
            piece = piece.replace(control, " ")
        words = piece.split()
        if words and re.search(r"\w", words[-1]) and re.search(r"[^\w\s]", words[-1]):
            markers.append(words[-1])
    return list(dict.fromkeys(markers))


def _break(pattern: re.Pattern, text: str) -> str:
    """Insert `BREAK` before the last character of every match until none is left."""
    for _ in range(len(text)):  # each pass breaks every match it finds and creates none
        broken = pattern.sub(lambda m: m.group()[:-1] + BREAK + m.group()[-1], text)
        if broken == text:
            return text
        text = broken
    return text


REMOTE_GUARD = TextGuard()

__all__ = [
    "BREAK",
    "COMMON_CONTROL_STRINGS",
    "COMMON_ROLE_MARKERS",
    "PIPE_TOKEN",
    "REMOTE_GUARD",
    "TextGuard",
    "template_role_markers",
]
