"""Several regions: the locate step reads every box, the micro step shows [full, crop 1, ..., crop k]
(`DualFocus(max_regions=k)`), and the trace records each region; one box changes nothing."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from conftest import ScriptedBackend
from PIL import Image

from df_agent.backends.base import Abilities, Conversation, Generation, Request
from df_agent.backends.hf import HFBackend
from df_agent.boxes import Box, BoxConvention, zoom_box
from df_agent.engine import DualFocus
from df_agent.results import FocusResult, Location, result_differences

TWO_BOXES = "[0.10,0.10,0.30,0.30] [0.60,0.50,0.95,0.90]"
QUESTION = "What colour is the square?"


def micro_conversations(backend: ScriptedBackend) -> list[Conversation]:
    return [conversation for step, conversation in backend.generated if step == "micro"]


def test_two_boxes_give_two_regions_and_the_micro_turn_shows_both_crops(scene: Image.Image) -> None:
    backend = ScriptedBackend(box=TWO_BOXES, scores={"red": 2.0, "blue": 0.5})
    result = DualFocus(backend, max_regions=2).ask(scene, QUESTION)
    w, h = scene.size
    expected = [
        Box(x1=0.1 * w, y1=0.1 * h, x2=0.3 * w, y2=0.3 * h),
        Box(x1=0.6 * w, y1=0.5 * h, x2=0.95 * w, y2=0.9 * h),
    ]
    assert len(result.regions) == 2
    for region, box in zip(result.regions, expected, strict=True):
        assert region.box.as_tuple() == pytest.approx(box.as_tuple())
        assert region.crop_box == zoom_box(region.box, scene.size, margin=25, min_side=32)  # original pixels
        assert region.crop.tobytes() == scene.crop(region.crop_box.as_int_tuple()).tobytes()
    assert (result.box, result.crop_box) == (result.regions[0].box, result.regions[0].crop_box)
    [micro] = micro_conversations(backend)
    full, first, second = micro.images  # in order: full image, crop 1, crop 2
    assert full.tobytes() == scene.tobytes()
    assert [first.tobytes(), second.tobytes()] == [r.crop.tobytes() for r in result.regions]
    assert [t.role for t in micro.turns] == ["user", "assistant", "user"]
    assert micro.turns[1].text == TWO_BOXES  # the model's reply, verbatim
    # the vote scores both answers in the same three-image context
    [(context, candidates)] = backend.scored
    assert candidates == ["red", "blue"] and len(context.images) == 3
    assert [i.tobytes() for i in context.images] == [i.tobytes() for i in micro.images]
    assert (result.answer, result.path, result.scores) == ("blue", "micro", {"macro": 2.0, "micro": 0.5})
    dumped = result.model_dump(mode="json")["regions"]
    assert [sorted(r) for r in dumped] == [["box", "crop_box"], ["box", "crop_box"]]  # crops stay out of JSON


def test_by_default_only_the_first_of_several_boxes_is_shown(scene: Image.Image) -> None:
    backend = ScriptedBackend(box=TWO_BOXES)
    engine = DualFocus(backend)
    result = engine.ask(scene, QUESTION)
    assert len(result.regions) == 1 and result.regions[0].box == result.box
    [micro] = micro_conversations(backend)
    assert len(micro.images) == 2
    location = engine.locate(scene, QUESTION)  # but the locate step reads both
    assert len(location.boxes) == 2 and location.box == location.boxes[0] and location.dropped == []


def test_max_regions_takes_the_first_k_and_the_backend_caps_it(scene: Image.Image) -> None:
    three = TWO_BOXES + " [0.40,0.40,0.60,0.60]"
    backend = ScriptedBackend(box=three)
    result = DualFocus(backend, max_regions=2).ask(scene, QUESTION)
    assert len(result.regions) == 2 and len(micro_conversations(backend)[0].images) == 3

    class TwoImages(ScriptedBackend):  # e.g. a model trained on [full, crop] only
        @property
        def abilities(self) -> Abilities:
            return Abilities(prompt_logprobs=True, max_images=2)

    capped = TwoImages(box=three)
    engine = DualFocus(capped, max_regions=3)
    assert engine.region_limit == 1
    assert len(engine.ask(scene, QUESTION).regions) == 1 and len(micro_conversations(capped)[0].images) == 2
    with pytest.raises(ValueError, match="max_regions"):
        DualFocus(backend, max_regions=0)


@pytest.mark.parametrize("box", ["[0.25,0.25,0.50,0.50]", "[0.25,0.25,0.50,0.50] [0.1", "no box here"])
@pytest.mark.parametrize("mode", ["dualfocus", "micro"])
def test_one_box_changes_nothing(scene: Image.Image, box: str, mode: str) -> None:
    scores = {"red": 1.25, "blue": 0.75}
    results = []
    for max_regions in (1, 3):
        backend = ScriptedBackend(box=box, scores=scores)
        results.append(DualFocus(backend, max_regions=max_regions).ask(scene, QUESTION, mode=mode))
    assert result_differences(*results) == []
    assert len(results[0].regions) == (0 if box == "no box here" else 1)


def test_unreadable_boxes_among_several_are_dropped_and_the_trace_says_why(scene: Image.Image) -> None:
    backend = ScriptedBackend(box="[0.50,0.50,0.20,0.90] [0.25,0.25,0.50,0.50] [0.25,0.25,0.50,0.50]")
    location = DualFocus(backend, max_regions=2).locate(scene, QUESTION)
    assert location.box is not None and location.box.as_tuple() == (80, 60, 160, 120)
    assert location.boxes == [location.box]
    assert len(location.dropped) == 2
    assert location.dropped[0].startswith("box 1: ") and "inverted" in location.dropped[0]
    assert location.dropped[1] == "box 3: the same box as box 2"
    nothing = ScriptedBackend(box="[0.5,0.5,0.2,0.9] [2,2,3,3]")
    location = DualFocus(nothing, max_regions=2).locate(scene, QUESTION)
    assert location.box is None and location.boxes == []
    assert "box 1: " in location.failure and "box 2: " in location.failure


def test_location_keeps_box_first() -> None:
    a, b = Box(x1=0, y1=0, x2=10, y2=10), Box(x1=5, y1=5, x2=20, y2=20)
    assert Location(box_text="x", box=a).boxes == [a]  # one box: as before
    assert Location(box_text="x", box=None).boxes == []
    with pytest.raises(ValueError, match="first"):
        Location(box_text="x", box=b, boxes=[a, b])


def test_families_with_several_region_templates_word_the_turns_for_several_images(scene: Image.Image) -> None:
    class ChatScripted(ScriptedBackend):
        prompt_family = "chat"
        box_convention = BoxConvention.JSON_1000

    engine = DualFocus(ChatScripted(), max_regions=2)
    crops = [scene.crop((0, 0, 100, 100)), scene.crop((100, 100, 200, 200))]
    locate = engine.locate_conversation(scene, QUESTION).turns[0].text
    assert (
        locate
        == engine.prompts.locate_many.format(question=QUESTION)
        != engine.prompts.locate.format(question=QUESTION)
    )
    several = engine.micro_conversation(scene, crops, QUESTION, "[]").turns[-1].text
    assert several == engine.prompts.micro_many.format(question=QUESTION)
    one = engine.micro_conversation(scene, crops[:1], QUESTION, "[]").turns[-1].text
    assert one == engine.prompts.micro.format(question=QUESTION)  # one crop: the two-image wording
    scoring = engine.score_conversation(scene, crops, QUESTION, "[]")
    assert scoring.turns[-1].text == engine.prompts.score_many.format(question=QUESTION)
    assert len(engine.judge_conversation(scene, crops, QUESTION, ["a", "b"]).images) == 3
    # a family without them (the official wording) keeps its own
    official = DualFocus(ScriptedBackend(), max_regions=2)
    assert official.prompts.micro_many == official.prompts.micro
    assert official.prompts.locate_many == official.prompts.locate


# --- the real transformers path: a tiny random Qwen2-VL ------------------------------------------

QWEN_BOXES = "<|box_start|>(100,100),(300,300)<|box_end|><|box_start|>(600,450),(1000,1000)<|box_end|>"


class QwenWithScriptedBoxes(HFBackend):
    """The tiny Qwen2-VL, except that its box replies are scripted (its own are random); records requests."""

    def __init__(self, *args, box: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.box = box
        self.requests: list[Request] = []

    def generate_many(self, requests: Sequence[Request]) -> list[Generation]:
        self.requests.extend(requests)
        real = [r for r in requests if r.reply != "box"]
        answers = iter(super().generate_many(real) if real else [])
        return [Generation(self.box) if r.reply == "box" else next(answers) for r in requests]


def image_blocks(input_ids: torch.Tensor, processor) -> list[int]:
    """The number of image tokens between each <|vision_start|> and <|vision_end|>, in order."""
    start, end, pad = processor.tokenizer.convert_tokens_to_ids(
        ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
    )
    ids = input_ids.tolist()
    blocks, inside = [], None
    for token in ids:
        if token == start:
            inside = 0
        elif token == end:
            blocks.append(inside)
            inside = None
        elif inside is not None:
            assert token == pad
            inside += 1
    return blocks


def two_crop_run(tiny: HFBackend, scene: Image.Image, session: bool) -> FocusResult:
    """DualFocus(max_regions=2) on the tiny Qwen2-VL, two boxes in its box reply; checks the micro step."""
    backend = QwenWithScriptedBoxes(tiny.model, tiny.processor, model_id="tiny-qwen2-vl", box=QWEN_BOXES)
    engine = DualFocus(backend, max_regions=2, max_new_tokens=6, session=session)
    result = engine.ask(scene, QUESTION)
    assert [r.box.as_tuple() for r in result.regions] == [
        pytest.approx((32, 24, 96, 72)),
        pytest.approx((192, 108, 320, 240)),
    ]
    [micro] = [r.conversation for r in backend.requests if len(r.conversation.turns) == 3]
    assert [i.size for i in micro.images] == [scene.size] + [
        (r.crop_box.width, r.crop_box.height) for r in result.regions
    ]
    assert micro.images[0].tobytes() == scene.tobytes()
    assert [i.tobytes() for i in micro.images[1:]] == [r.crop.tobytes() for r in result.regions]
    assert micro.turns[0].text == engine.prompts.locate_many.format(question=QUESTION)
    assert micro.turns[-1].text == engine.prompts.micro_many.format(question=QUESTION)
    # the tokenised input holds each image's own tokens, in order: one {"type": "image"} per image
    processor = tiny.processor
    messages = [
        {
            "role": t.role,
            "content": [*({"type": "image", "image": i} for i in t.images), {"type": "text", "text": t.text}],
        }
        for t in micro.turns
    ]
    inputs = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=True, return_tensors="pt"
    )
    own = [
        processor.image_processor(images=[i], return_tensors="pt")["image_grid_thw"][0] for i in micro.images
    ]
    assert torch.equal(inputs["image_grid_thw"], torch.stack(own))
    merge = processor.image_processor.merge_size**2
    assert image_blocks(inputs["input_ids"][0], processor) == [int(g.prod()) // merge for g in own]
    # and the backend's own encoding of the conversation carries the same image tokens
    encoded = backend.encode([backend.render(micro, add_generation_prompt=True)], micro.images)
    assert torch.equal(encoded["image_grid_thw"].cpu(), inputs["image_grid_thw"])
    assert image_blocks(encoded["input_ids"][0].cpu(), processor) == [int(g.prod()) // merge for g in own]
    # the vote scored both (random, differing) answers in that three-image context
    assert result.vote == "official" and all(0 < s < float("inf") for s in result.scores.values())
    return result


def test_micro_step_with_two_crops_on_a_tiny_qwen2_vl(tiny_qwen_backend, scene: Image.Image) -> None:
    fast, plain = (two_crop_run(tiny_qwen_backend, scene, session) for session in (True, False))
    assert result_differences(fast, plain, atol=1e-4) == []  # the fast path takes three images too


def test_three_image_scores_agree_on_the_fast_and_plain_paths(tiny_qwen_backend, scene: Image.Image) -> None:
    engine = DualFocus(tiny_qwen_backend, max_regions=2)
    crops = [
        engine.zoom(scene, Box(x1=32, y1=24, x2=96, y2=72)).crop,
        engine.zoom(scene, Box(x1=192, y1=108, x2=320, y2=240)).crop,
    ]
    plain = engine.arbitrate(scene, crops, QUESTION, ["red", "blue square"], box_text=QWEN_BOXES)
    with tiny_qwen_backend.session(speculate=True):
        fast = engine.arbitrate(scene, crops, QUESTION, ["red", "blue square"], box_text=QWEN_BOXES)
    assert fast.scores == pytest.approx(plain.scores, abs=1e-4)
    one = engine.arbitrate(scene, crops[:1], QUESTION, ["red", "blue square"], box_text=QWEN_BOXES)
    assert one.scores != pytest.approx(plain.scores, abs=1e-6)  # the second crop is in the context


def test_search_mode_gives_every_region_in_the_root_image_pixels() -> None:
    from test_search import TileScorer, big_scene

    backend = TileScorer(box="[0.25,0.25,0.50,0.50] [0.00,0.00,0.10,0.10]")
    result = DualFocus(backend, margin=0, min_side=0, max_regions=2).ask(
        big_scene(), "What number is on the red square?", mode="search"
    )
    tile = result.search.tile
    assert tile is not None and len(result.regions) == 2
    first, second = result.regions
    assert (first.box, first.crop_box) == (result.box, result.crop_box)
    assert first.box == Box(x1=tile.x1 + 80, y1=tile.y1 + 80, x2=tile.x1 + 160, y2=tile.y1 + 160)
    assert second.box == second.crop_box == Box(x1=tile.x1, y1=tile.y1, x2=tile.x1 + 32, y2=tile.y1 + 32)
    assert second.crop.tobytes() == big_scene().crop(second.crop_box.as_int_tuple()).tobytes()


def test_every_family_words_the_several_region_steps_with_a_question_slot() -> None:
    from df_agent.prompt_sets import MANY_STEPS, families, load_prompts

    for family in families():
        prompts = load_prompts(family)
        for step, single in MANY_STEPS.items():
            assert "{question}" in getattr(prompts, step), (family, step)
            if family != "dualfocus":  # the families that ship their own say "images", not "two images"
                assert getattr(prompts, step) != getattr(prompts, single), (family, step)
                assert "two images" not in getattr(prompts, step)
