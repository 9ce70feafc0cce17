"""Presets for the vision-chat models people run: prompt family, box convention, what the vote can use.

A preset is chosen by a regular expression on the model's name (case-insensitive, first match
wins), so ``OpenAIBackend(url, "qwen2.5vl:7b")`` or ``ChatModelBackend(ChatOpenAI(model="gpt-4o"))``
ask for boxes the way that model writes them. Every field can be overridden by the backend's
arguments. A name no preset matches gets `DEFAULT`, the DualFocus / LLaVA convention of the
shipped model.

| preset | matches (examples) | prompt family | box convention | vote |
|---|---|---|---|---|
| ``llava`` | ``llava-1.5-7b``, ``llava:7b``, ``bakllava`` | dualfocus | fraction | server |
| ``qwen3_vl`` | ``Qwen3-VL-8B``, ``qwen3-vl:8b`` | qwen2_vl | json_1000 | server |
| ``qwen2_5_vl`` | ``Qwen2.5-VL-7B``, ``qwen2.5vl:7b`` | qwen2_vl | pixels (``smart_resize``) | server |
| ``qwen2_vl`` | ``Qwen2-VL-7B``, ``qwen-vl-chat`` | qwen2_vl | qwen_1000 | server |
| ``gemini`` | ``gemini-2.5-flash`` | chat_gemini | gemini_1000 | detected |
| ``gpt`` | ``gpt-4o-mini``, ``gpt-4.1``, ``gpt-5``, ``o4-mini`` | chat | json_1000 | hosted |
| ``claude`` | ``claude-sonnet-4-5`` | chat | json_1000 | bare |
| ``open_chat`` | ``gemma3:12b``, ``llama3.2-vision``, ``minicpm-v`` | chat | json_1000 | server |

Each preset's ``source`` says, in our words, where its convention comes from: LLaVA-1.5's grounding
data and DualFocus's training (fractions, 2 decimals); the Qwen-VL / Qwen2-VL papers (0..1000 in
box tokens); the Qwen2.5-VL report and cookbooks (JSON ``bbox_2d`` in pixels of the resized input:
sides multiples of 28, at most 12,845,056 pixels); the Qwen3-VL model card and Qwen-Agent's zoom
tool (JSON ``bbox_2d``, 0..1000); Google's Gemini object-detection guide (``box_2d`` as
``[ymin, xmin, ymax, xmax]``, 0..1000). GPT-4o-class, Claude-class and the other open chat models
document no box format we could follow, so the ``chat`` prompts ask them for JSON ``bbox_2d`` in
0..1000, a format they write reliably.

"vote" is what the preset says about log-probabilities: "hosted" (generation log-probabilities:
the own-context vote), "bare" (none: the engine's declared policy), "detected"/"server" (the
backend finds out from the server, since vLLM, Ollama and llama.cpp differ).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

from PIL import Image

from df_agent.boxes import BoxConvention

Capabilities = Literal["vllm", "hosted", "bare"]
InputSizeFn = Callable[[Image.Image], tuple[int, int]]
# a remote model's input size: fixed, a function of the image, or None (the image's own size)
InputSize = tuple[int, int] | InputSizeFn


def resolve_input_size(setting: InputSize | None, image: Image.Image) -> tuple[int, int]:
    """The (width, height) a model reads `image` at, by a backend's `input_size` setting."""
    if setting is None:
        return image.size
    return setting(image) if callable(setting) else setting


def qwen_input_size(
    image: Image.Image, *, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 12_845_056
) -> tuple[int, int]:
    """The (width, height) Qwen2.5-VL's processor resizes `image` to (its ``smart_resize``).

    Both sides become multiples of `factor` (patch 14 x merge 2), the area kept between
    `min_pixels` and `max_pixels` with the aspect ratio nearly unchanged. Servers that change the
    processor's pixel limits (e.g. ``--mm-processor-kwargs``) need their own `input_size`.
    """
    width, height = image.size
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return w, h


@dataclass(frozen=True)
class Preset:
    """How to talk to one family of models.

    Attributes:
        name: The preset's name.
        pattern: A regular expression searched in the lower-cased model name.
        prompt_family: The prompt set in ``prompts/``.
        box_convention: How the model writes boxes.
        capabilities: What its provider is documented to return ("hosted": generation
            log-probabilities; "bare": none); None: ask the server (`OpenAIBackend` detects it).
        input_size: The model's resized input size, for pixel conventions; None: the image's own.
        source: Where the convention comes from, in our words.
    """

    name: str
    pattern: str
    prompt_family: str
    box_convention: BoxConvention
    capabilities: Capabilities | None = None
    input_size: InputSizeFn | None = None
    source: str = ""


DEFAULT = Preset(
    "dualfocus", "", "dualfocus", BoxConvention.FRACTION,
    source="DualFocus / LLaVA-1.5: fractions of the original image (the shipped model's convention)",
)  # fmt: skip

PRESETS: tuple[Preset, ...] = (
    Preset(
        "llava", r"llava|dualfocus|df-agent", "dualfocus", BoxConvention.FRACTION,
        source="LLaVA-1.5 grounding data and DualFocus training: [x1,y1,x2,y2] as fractions, 2 decimals",
    ),
    Preset(
        "qwen3_vl", r"qwen-?3[-_.]?vl", "qwen2_vl", BoxConvention.JSON_1000,
        source="Qwen3-VL model card, Qwen-Agent zoom tool: JSON bbox_2d relative 0..1000",
    ),
    Preset(
        "qwen2_5_vl", r"qwen-?2\.?5[-_.]?vl", "qwen2_vl", BoxConvention.PIXELS, input_size=qwen_input_size,
        source="Qwen2.5-VL report and cookbooks: JSON bbox_2d in pixels of the smart_resize'd input",
    ),
    Preset(
        "qwen2_vl", r"qwen-?2?[-_.]?vl", "qwen2_vl", BoxConvention.QWEN_1000,
        source="Qwen-VL / Qwen2-VL papers: (x1,y1),(x2,y2) integers 0..1000 in box tokens",
    ),
    Preset(
        "gemini", r"gemini", "chat_gemini", BoxConvention.GEMINI_1000,
        source="Gemini API object-detection guide: box_2d as [ymin, xmin, ymax, xmax], 0..1000",
    ),
    Preset(
        "gpt", r"gpt-?4o|gpt-?4\.1|gpt-?5|chatgpt|(?:^|/)o[1345](?:-|$)", "chat", BoxConvention.JSON_1000,
        capabilities="hosted",
        source="no native box format documented: JSON bbox_2d 0..1000 asked; chat logprobs documented",
    ),
    Preset(
        "claude", r"claude", "chat", BoxConvention.JSON_1000, capabilities="bare",
        source="no native box format documented: JSON bbox_2d 0..1000 asked; no log-probabilities",
    ),
    Preset(
        "open_chat", r"gemma-?3|llama-?3\.2-vision|llama-?4|pixtral|mistral-small|minicpm-v|internvl",
        "chat", BoxConvention.JSON_1000,
        source="general chat models without a grounding format we follow: JSON bbox_2d 0..1000 asked",
    ),
)  # fmt: skip


def preset_for(model: str, **overrides: object) -> Preset:
    """The preset for a model name (first match in `PRESETS`, else `DEFAULT`), with `overrides`.

    Args:
        model: A model name as a server or provider spells it (``"gpt-4o-mini"``, ``"llava:7b"``).
        **overrides: Fields to replace (``prompt_family=``, ``box_convention=``, ...); None values
            are ignored, so a backend can pass its optional arguments straight through.
    """
    name = (model or "").lower()
    preset = next((p for p in PRESETS if re.search(p.pattern, name)), DEFAULT)
    given = {k: v for k, v in overrides.items() if v is not None}
    if "box_convention" in given:
        given["box_convention"] = BoxConvention(given["box_convention"])
    return replace(preset, **given) if given else preset


__all__ = [
    "DEFAULT",
    "PRESETS",
    "Capabilities",
    "InputSize",
    "InputSizeFn",
    "Preset",
    "preset_for",
    "qwen_input_size",
    "resolve_input_size",
]
