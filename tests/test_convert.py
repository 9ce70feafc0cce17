"""Checkpoint conversion on a tiny checkpoint written in the original LLaVA layout by the test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_models import tiny_tokenizer

from df_agent import DualFocus
from df_agent.backends.base import Conversation
from df_agent.backends.hf import HFBackend
from df_agent.cli import main
from df_agent.convert import ConversionError, convert_checkpoint

# The documented name mapping (README "Official DualFocus checkpoints"), written out independently.
DOCUMENTED = [
    ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower."),
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."),
    ("lm_head.", "lm_head."),
]
BUFFERS = ["model.layers.0.self_attn.rotary_emb.inv_freq"]
TOWER_BUFFER = "model.vision_tower.vision_tower.vision_model.embeddings.position_ids"
SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def documented_name(key: str) -> str:
    source, target = next((s, t) for s, t in DOCUMENTED if key.startswith(s))
    return target + key[len(source) :]


def write_clip(folder: Path) -> Path:
    """A tiny CLIP vision tower with its image processor, as a local stand-in for the hub one."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(1)
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        image_size=32, patch_size=8, projection_dim=32,
    )  # fmt: skip
    CLIPVisionModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder
    )
    return folder


def llama_like_tokenizer():
    """A tiny tokenizer that, like Llama's, adds its BOS token ``<s>`` to every text itself."""
    from tokenizers import processors

    tokenizer = tiny_tokenizer(["<pad>", "</s>", "<unk>", "<s>"], None)
    bos = tokenizer.convert_tokens_to_ids("<s>")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    tokenizer.bos_token = "<s>"
    assert tokenizer("hello")["input_ids"][0] == bos
    return tokenizer


def write_original(folder: Path, clip: Path, *, with_tower: bool, fmt: str) -> dict[str, torch.Tensor]:
    """A tiny LLaVA-1.5 checkpoint as LLaVA's own code saves it; returns its tensors."""
    from transformers import CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    tokenizer = llama_like_tokenizer()
    torch.manual_seed(2)
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )  # fmt: skip
    tensors = dict(LlamaForCausalLM(text).state_dict())
    tensors |= {
        "model.mm_projector.0.weight": torch.randn(32, 32),
        "model.mm_projector.0.bias": torch.randn(32),
        "model.mm_projector.2.weight": torch.randn(32, 32),
        "model.mm_projector.2.bias": torch.randn(32),
        BUFFERS[0]: 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16)),
    }
    if with_tower:
        tower = CLIPVisionModel.from_pretrained(clip).state_dict()
        tensors |= {"model.vision_tower.vision_tower.vision_model." + k: v.clone() for k, v in tower.items()}
        tensors[TOWER_BUFFER] = torch.arange(17).unsqueeze(0)
    tensors = {
        k: v.half() if v.is_floating_point() and "inv_freq" not in k else v for k, v in tensors.items()
    }
    folder.mkdir(parents=True)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors")
    else:
        torch.save(tensors, folder / "pytorch_model.bin")
    config = {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "hidden_act": "silu",
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 2, "max_position_embeddings": 512, "max_length": 4096, "rms_norm_eps": 1e-5,
        "rope_scaling": None, "tie_word_embeddings": False, "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "torch_dtype": "float16", "transformers_version": "4.31.0", "use_cache": True,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": 32,
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "image_aspect_ratio": "pad", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
        "mm_patch_merge_type": "flat", "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False,
        "unfreeze_mm_vision_tower": False, "use_mm_proj": True,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(folder)
    return tensors


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module", params=["tower-in-safetensors", "tower-from-folder-bin"])
def converted(request: pytest.FixtureRequest, clip: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    with_tower = request.param == "tower-in-safetensors"
    root = tmp_path_factory.mktemp(request.param)
    source = write_original(
        root / "original", clip, with_tower=with_tower, fmt="safetensors" if with_tower else "bin"
    )
    result = convert_checkpoint(root / "original", root / "converted", vision_tower=clip)
    return source, result


def test_convert_maps_every_source_tensor_and_leaves_nothing_unmapped(converted: tuple, clip: Path) -> None:
    from transformers import AutoModelForImageTextToText, CLIPVisionModel, LlavaForConditionalGeneration

    source, result = converted
    model = AutoModelForImageTextToText.from_pretrained(result.output)
    assert isinstance(model, LlavaForConditionalGeneration) and model.dtype == torch.float16
    state = model.state_dict()
    buffers = [k for k in source if k in BUFFERS or k == TOWER_BUFFER]
    assert sorted(result.skipped) == sorted(buffers)
    assert set(result.mapping) | set(result.skipped) == set(source)  # nothing left unmapped
    vocab = source["model.embed_tokens.weight"].shape[0]
    for key, tensor in source.items():
        if key in buffers:
            continue
        name = documented_name(key)
        assert result.mapping[key] == name
        assert torch.equal(state[name][: tensor.shape[0]], tensor), key
    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        assert state[name].shape[0] == vocab + 1 == result.vocab_size  # the <image> row
    if result.from_vision_tower:  # the source had no tower: its weights come from the CLIP folder
        tower = CLIPVisionModel.from_pretrained(clip).state_dict()
        assert len(result.from_vision_tower) == len(tower)
        for key, tensor in tower.items():
            assert torch.equal(state["model.vision_tower." + key], tensor.half()), key
    parameters = {k for k, _ in model.named_parameters()}
    assert parameters == set(result.mapping.values()) | set(result.from_vision_tower)


def test_convert_writes_the_llava_config_processor_and_chat_template(converted: tuple) -> None:
    from transformers import AutoConfig, AutoProcessor

    _, result = converted
    config = AutoConfig.from_pretrained(result.output)
    processor = AutoProcessor.from_pretrained(result.output)
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-2, "default")
    assert (
        config.image_token_index
        == processor.tokenizer.convert_tokens_to_ids("<image>")
        == result.vocab_size - 1
    )
    assert result.added_tokens == ["<image>"]
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And now?"}]},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    expected = (
        f"<s>{SYSTEM} USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: <image>\nAnd now? ASSISTANT:"
    )
    assert text == expected
    bos = processor.tokenizer.bos_token_id
    for ids in (  # one BOS, from the template: as transformers and vLLM's chat endpoint both encode it
        processor(text=text, images=[Image.new("RGB", (32, 32))] * 2)["input_ids"][0],
        processor.tokenizer(text, add_special_tokens=False)["input_ids"],
    ):
        assert ids[0] == bos and ids.count(bos) == 1
    wide = Image.new("RGB", (64, 32), (220, 30, 30))  # pad to square with the mean colour, as LLaVA's "pad"
    pixels = processor.image_processor(images=[wide], return_tensors="pt")["pixel_values"][0]
    assert pixels.shape == (3, 32, 32)
    assert pixels[:, :6].abs().max() < 0.02 and pixels[0, 16].mean() > 1.0
    ids = processor(text="USER: <image>\nWhat?", images=[wide], return_tensors="pt")["input_ids"][0]
    assert int((ids == config.image_token_index).sum()) == 16  # (32 / 8)^2 patches, the CLS token dropped


def test_converted_model_runs_dualfocus_ask_end_to_end(converted: tuple, scene: Image.Image) -> None:
    _, result = converted
    backend = HFBackend.from_pretrained(result.output, device="cpu")
    answer = DualFocus(backend, max_new_tokens=8).ask(scene, "What colour is the square?")
    assert answer.model_id == str(result.output) and answer.macro_answer is not None
    scores = backend.score(Conversation().user("What colour is the square?", [scene]), ["red", "blue"])
    assert len(scores) == 2 and all(s > 0 for s in scores)


def test_convert_checkpoint_command(clip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_original(tmp_path / "src", clip, with_tower=False, fmt="safetensors")
    assert (
        main(
            ["convert-checkpoint", str(tmp_path / "src"), str(tmp_path / "dst"), "--vision-tower", str(clip)]
        )
        == 0
    )
    assert "tensors mapped" in capsys.readouterr().out
    assert (tmp_path / "dst" / "config.json").is_file()
    # again into the same folder: refused, with the reason
    assert (
        main(
            ["convert-checkpoint", str(tmp_path / "src"), str(tmp_path / "dst"), "--vision-tower", str(clip)]
        )
        == 2
    )
    assert "not empty" in capsys.readouterr().err


def test_convert_without_a_local_vision_tower_says_to_pass_one(
    clip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_original(tmp_path / "src", clip, with_tower=False, fmt="safetensors")
    assert main(["convert-checkpoint", str(tmp_path / "src"), str(tmp_path / "dst")]) == 2
    error = capsys.readouterr().err
    assert "openai/clip-vit-large-patch14-336" in error and "--vision-tower PATH" in error


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"extra_key": "model.image_newline"}, "unknown key 'model.image_newline'"),
        ({"mm_projector_type": "linear"}, "mm_projector_type='linear' is not supported"),
        ({"image_aspect_ratio": "anyres"}, "image_aspect_ratio='anyres' is not supported"),
        ({"mm_hidden_size": 1024}, "mm_hidden_size=1024"),
    ],
)
def test_convert_refuses_what_it_cannot_convert(
    clip: Path, tmp_path: Path, change: dict, message: str
) -> None:
    source = tmp_path / "src"
    tensors = write_original(source, clip, with_tower=False, fmt="bin")
    if "extra_key" in change:
        torch.save({**tensors, change["extra_key"]: torch.zeros(32)}, source / "pytorch_model.bin")
    else:
        config = json.loads((source / "config.json").read_text())
        (source / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ConversionError, match=message.replace("(", r"\(").replace("[", r"\[")):
        convert_checkpoint(source, tmp_path / "dst", vision_tower=clip)


def test_convert_needs_a_checkpoint_folder(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match=r"no config\.json"):
        convert_checkpoint(tmp_path, tmp_path / "out")
