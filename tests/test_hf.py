"""The transformers backend on tiny random LLaVA and Qwen2-VL models built from configs."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from df_agent import BoxConvention, DualFocus, FocusResult
from df_agent.backends.base import Conversation
from df_agent.backends.hf import HFBackend, encode_for_training

BACKENDS = ["tiny_llava_backend", "tiny_qwen_backend"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> HFBackend:
    return request.getfixturevalue(request.param)


def micro_context(scene: Image.Image) -> Conversation:
    crop = scene.crop((55, 25, 185, 155))
    return (
        Conversation()
        .user(
            "Please provide the bounding box coordinate of the region this question asks: What colour?",
            [scene],
        )
        .assistant("[0.25,0.25,0.50,0.50]")
        .user(
            "Please combine the information from these two images and answer this question: What colour?",
            [crop],
        )
    )


def reference_nll(backend: HFBackend, conversation: Conversation, candidate: str) -> float:
    """One candidate alone, scored by the model's own loss over labels that mask all but its tokens."""
    prompt = backend.render(conversation, add_generation_prompt=True)
    full = backend.render(conversation.assistant(candidate), continue_final=True)
    n_prompt = backend.encode([prompt], conversation.images)["input_ids"].shape[1]
    inputs = backend.encode([full], conversation.images)
    labels = inputs["input_ids"].clone()
    labels[:, :n_prompt] = -100
    with torch.no_grad():
        return backend.model(**inputs, labels=labels).loss.item()


def test_score_equals_candidate_by_candidate_reference(backend: HFBackend, scene: Image.Image) -> None:
    conversation = micro_context(scene)
    candidates = ["red", "a blue square", "7"]
    batched = backend.score(conversation, candidates)
    reference = [reference_nll(backend, conversation, c) for c in candidates]
    single = [backend.score(conversation, [c])[0] for c in candidates]
    assert batched == pytest.approx(reference, abs=1e-5)
    assert batched == pytest.approx(single, abs=1e-5)
    assert len(set(batched)) == 3  # different candidates, different scores


def test_score_rejects_empty_candidates(backend: HFBackend, scene: Image.Image) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        backend.score(micro_context(scene), ["red", "  "])


def test_generate_is_greedy_and_deterministic(backend: HFBackend, scene: Image.Image) -> None:
    conversation = Conversation().user("What colour?", [scene])
    first = backend.generate(conversation, max_new_tokens=6)
    assert isinstance(first, str)
    assert backend.generate(conversation, max_new_tokens=6) == first


def test_generate_needs_a_user_turn_last(backend: HFBackend, scene: Image.Image) -> None:
    with pytest.raises(ValueError, match="user turn"):
        backend.generate(Conversation().user("q", [scene]).assistant("a"))


def test_processor_sees_two_images_full_then_crop(
    backend: HFBackend, scene: Image.Image, monkeypatch
) -> None:
    seen: list[list[Image.Image]] = []
    original = backend.encode

    def spy(texts, images, **kwargs):
        seen.append(list(images))
        return original(texts, images, **kwargs)

    monkeypatch.setattr(backend, "encode", spy)
    engine = DualFocus(backend, min_side=0)
    box = engine.locate(scene, "What colour?").box or engine.zoom(scene, _quarter_box(scene)).box
    zoomed = engine.zoom(scene, box)
    seen.clear()
    engine.micro(scene, zoomed.crop, "What colour?", box_text="[0.25,0.25,0.50,0.50]")
    [images] = seen
    assert len(images) == 2
    assert images[0].tobytes() == scene.tobytes()
    assert images[1].tobytes() == zoomed.crop.tobytes()


def _quarter_box(scene: Image.Image):
    from df_agent.boxes import Box

    return Box(x1=0, y1=0, x2=scene.width / 2, y2=scene.height / 2)


def test_ask_end_to_end(backend: HFBackend, scene: Image.Image) -> None:
    engine = DualFocus(backend, max_new_tokens=8)
    result = engine.ask(scene, "What colour is the square?")
    assert isinstance(result, FocusResult)
    assert result.model_id == backend.model_id and result.macro_answer is not None
    if result.box is None:  # a random model rarely writes a box: the macro answer stands, no vote
        assert result.fallback and result.fallback.startswith("no box") and result.scores is None
        assert result.answer == result.macro_answer
    else:
        assert result.micro_answer is not None
    # the remaining steps, with a given region, on the real model
    zoomed = engine.zoom(scene, _quarter_box(scene))
    micro = engine.micro(scene, zoomed.crop, "What colour?", box_text="[0.00,0.00,0.50,0.50]")
    vote = engine.arbitrate(
        scene, zoomed.crop, "What colour?", ["red", "blue"], box_text="[0.00,0.00,0.50,0.50]"
    )
    assert isinstance(micro, str) and vote.winner in (0, 1) and all(s > 0 for s in vote.scores)


def test_families_declare_their_box_convention(tiny_llava_backend, tiny_qwen_backend) -> None:
    assert (tiny_llava_backend.box_convention, tiny_llava_backend.prompt_family) == (
        BoxConvention.FRACTION, "dualfocus",
    )  # fmt: skip
    assert (tiny_qwen_backend.box_convention, tiny_qwen_backend.prompt_family) == (
        BoxConvention.QWEN_1000, "qwen2_vl",
    )  # fmt: skip


def test_input_size_follows_the_image_processor(tiny_llava_backend, tiny_qwen_backend, scene) -> None:
    assert tiny_llava_backend.input_size(scene) == (32, 32)
    width, height = tiny_qwen_backend.input_size(scene)
    assert width % 8 == 0 and height % 8 == 0 and width > height  # aspect kept, multiples of patch*merge


def test_from_pretrained_builds_engine_and_backend(tiny_llava_path, scene) -> None:
    engine = DualFocus.from_pretrained(tiny_llava_path, device="cpu", min_side=48)
    assert engine.min_side == 48 and engine.backend.device.type == "cpu"
    assert engine.backend.model.dtype == torch.float32
    assert engine.ask(scene, "What colour?", mode="macro").path == "macro"


def test_from_pretrained_missing_folder_says_so(tmp_path) -> None:
    with pytest.raises(OSError, match=r"folder not found|could not load a model"):
        DualFocus.from_pretrained(tmp_path / "absent", device="cpu")


def test_unknown_model_type_needs_declarations(tiny_llava_backend) -> None:
    class Renamed(torch.nn.Module):
        config = type("C", (), {"model_type": "mystery"})()

    with pytest.raises(ValueError, match="box_convention and prompt_family"):
        HFBackend(Renamed(), tiny_llava_backend.processor, model_id="x")


def test_training_labels_cover_the_reply_and_end_of_turn(tiny_llava_backend, scene) -> None:
    conversation = Conversation().user("What colour?", [scene])
    batch = encode_for_training(tiny_llava_backend, conversation, "red")
    labelled = batch["labels"][0][batch["labels"][0] != -100]
    text = tiny_llava_backend.tokenizer.decode(labelled)
    assert text.replace(" ", "") == "red</s>"
    loss = tiny_llava_backend.model(**batch).loss
    assert torch.isfinite(loss)
