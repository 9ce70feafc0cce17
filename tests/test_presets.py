"""Presets chosen by model name: prompt family, box convention and what the vote can use."""

from __future__ import annotations

import pytest
from PIL import Image

from df_agent.backends.presets import DEFAULT, PRESETS, preset_for, qwen_input_size
from df_agent.boxes import BoxConvention, format_box, parse_box
from df_agent.prompt_sets import families, load_prompts

C = BoxConvention

BY_NAME = [
    # name as a server, provider or Ollama tag spells it -> preset, family, convention, capabilities
    ("llava-hf/llava-1.5-7b-hf", "llava", "dualfocus", C.FRACTION, None),
    ("llava:7b", "llava", "dualfocus", C.FRACTION, None),
    ("llava:13b-v1.6", "llava", "dualfocus", C.FRACTION, None),
    ("Qwen/Qwen2-VL-7B-Instruct", "qwen2_vl", "qwen2_vl", C.QWEN_1000, None),
    ("qwen-vl-chat", "qwen2_vl", "qwen2_vl", C.QWEN_1000, None),
    ("Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl", "qwen2_vl", C.PIXELS, None),
    ("qwen2.5vl:7b", "qwen2_5_vl", "qwen2_vl", C.PIXELS, None),
    ("Qwen/Qwen3-VL-8B-Instruct", "qwen3_vl", "qwen2_vl", C.JSON_1000, None),
    ("qwen3-vl:8b", "qwen3_vl", "qwen2_vl", C.JSON_1000, None),
    ("gemini-2.5-flash", "gemini", "chat_gemini", C.GEMINI_1000, None),
    ("models/gemini-2.0-flash", "gemini", "chat_gemini", C.GEMINI_1000, None),
    ("gpt-4o-mini", "gpt", "chat", C.JSON_1000, "hosted"),
    ("gpt-4.1", "gpt", "chat", C.JSON_1000, "hosted"),
    ("gpt-5-mini", "gpt", "chat", C.JSON_1000, "hosted"),
    ("o4-mini", "gpt", "chat", C.JSON_1000, "hosted"),
    ("claude-sonnet-4-5", "claude", "chat", C.JSON_1000, "bare"),
    ("anthropic/claude-3-5-haiku", "claude", "chat", C.JSON_1000, "bare"),
    ("gemma3:12b", "open_chat", "chat", C.JSON_1000, None),
    ("llama3.2-vision:11b", "open_chat", "chat", C.JSON_1000, None),
    ("df-test", "dualfocus", "dualfocus", C.FRACTION, None),
    ("my-finetune", "dualfocus", "dualfocus", C.FRACTION, None),
    ("", "dualfocus", "dualfocus", C.FRACTION, None),
]


@pytest.mark.parametrize(("name", "preset", "family", "convention", "capabilities"), BY_NAME)
def test_preset_by_model_name(name, preset, family, convention, capabilities) -> None:
    chosen = preset_for(name)
    assert (chosen.name, chosen.prompt_family, chosen.box_convention, chosen.capabilities) == (
        preset,
        family,
        convention,
        capabilities,
    )


def test_overrides_replace_fields_and_none_keeps_them() -> None:
    chosen = preset_for("gpt-4o", prompt_family="dualfocus", box_convention="fraction", capabilities=None)
    assert (chosen.name, chosen.prompt_family, chosen.box_convention, chosen.capabilities) == (
        "gpt",
        "dualfocus",
        C.FRACTION,
        "hosted",
    )
    assert preset_for("gpt-4o", capabilities="bare").capabilities == "bare"
    with pytest.raises(ValueError):
        preset_for("gpt-4o", box_convention="sideways")


def test_every_preset_names_a_shipped_family_and_a_source() -> None:
    for preset in (*PRESETS, DEFAULT):
        assert preset.prompt_family in families()
        assert preset.source
        load_prompts(preset.prompt_family)


@pytest.mark.parametrize("family", ["chat", "chat_gemini"])
def test_chat_prompts_ask_for_the_box_their_preset_parses(family: str) -> None:
    prompts = load_prompts(family)
    request = prompts.locate.format(question="Where is the cat?")
    assert "Where is the cat?" in request
    convention = next(p.box_convention for p in PRESETS if p.prompt_family == family)
    key = "box_2d" if convention is C.GEMINI_1000 else "bbox_2d"
    assert f'"{key}"' in request  # the JSON key the parser reads
    # a reply written the way the request asks parses to the intended region
    reply = format_box(
        parse_box('[{"box_2d": [250, 100, 750, 500]}]', C.GEMINI_1000, (400, 200)), convention, (400, 200)
    )
    assert parse_box(reply, convention, (400, 200)).as_tuple() == pytest.approx((40, 50, 200, 150), abs=1)
    assert "{question}" not in request and "{first}" in prompts.judge and "{second}" in prompts.judge


def test_qwen_input_size_is_smart_resize() -> None:
    assert qwen_input_size(Image.new("RGB", (320, 240))) == (308, 252)
    assert qwen_input_size(Image.new("RGB", (10, 10))) == (56, 56)  # grown to min_pixels
    w, h = qwen_input_size(Image.new("RGB", (8000, 6000)))
    assert w % 28 == 0 and h % 28 == 0 and w * h <= 12_845_056 and abs(w / h - 4 / 3) < 0.02
