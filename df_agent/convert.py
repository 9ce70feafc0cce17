"""Convert an original-format LLaVA / DualFocus checkpoint into a transformers llava checkpoint.

The official DualFocus checkpoints (DualFocus-LLaVA-1.5-7B/13B) are saved by LLaVA's own code:
a flat Llama config with ``mm_*`` fields, LLaVA's key names, a tokenizer without an image token,
and a vision tower named by hub id (``mm_vision_tower``) rather than stored. The result loads with
`AutoModelForImageTextToText` and `AutoProcessor` (and serves with vLLM), with the llava_v1 chat
template and LLaVA's pad-to-square image preprocessing.

Name mapping (source prefix -> transformers 5 prefix); any other source key is an error, except
the recomputed buffers in `SKIPPED_SUFFIXES`:

=============================================== =========================================
``model.vision_tower.vision_tower.vision_model.`` ``model.vision_tower.``
``model.mm_projector.0.``                        ``model.multi_modal_projector.linear_1.``
``model.mm_projector.2.``                        ``model.multi_modal_projector.linear_2.``
``model.embed_tokens.``                          ``model.language_model.embed_tokens.``
``model.layers.``                                ``model.language_model.layers.``
``model.norm.``                                  ``model.language_model.norm.``
``lm_head.``                                     ``lm_head.``
=============================================== =========================================

The vision tower's weights come from the source when it holds them, else from the CLIP folder
given as ``--vision-tower`` (or the ``mm_vision_tower`` id, when it can be loaded). The ``<image>``
token is added to the tokenizer; the embedding and output rows of added tokens are the mean of
the source rows, every other row is the source's, unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

CONV_SYSTEMS = {
    "llava_v1": "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "vicuna_v1": "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
}
# LLaVA's SeparatorStyle.TWO: "<s>{system} USER: <image>\n{question} ASSISTANT: {answer}</s>USER: ...".
# The template writes the BOS token itself (the tokenizer no longer adds it), so transformers and
# vLLM's chat endpoint (which adds no special tokens) see the same single BOS.
CHAT_TEMPLATE = (
    "{%- macro text(content) -%}{%- if content is string -%}{{- content -}}{%- else -%}"
    "{%- for part in content if part['type'] == 'text' -%}{{- part['text'] -}}{%- endfor -%}"
    "{%- endif -%}{%- endmacro -%}"
    "{{- bos_token if bos_token else '' -}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}{{- text(messages[0]['content']) + ' ' -}}"
    "{%- set messages = messages[1:] -%}{%- else -%}{{- '@SYSTEM@ ' -}}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{- 'USER: ' -}}"
    "{%- if message['content'] is not string -%}"
    "{%- for part in message['content'] if part['type'] in ('image', 'image_url') -%}{{- '<image>\\n' -}}"
    "{%- endfor -%}{%- endif -%}"
    "{{- text(message['content']) + ' ' -}}"
    "{%- else -%}{{- 'ASSISTANT: ' + text(message['content']) + eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)
KEY_RULES: tuple[tuple[str, str], ...] = (
    ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower."),
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."),
    ("lm_head.", "lm_head."),
)
# Buffers some checkpoints store that transformers recomputes.
SKIPPED_SUFFIXES = (".rotary_emb.inv_freq", "embeddings.position_ids")
SELECT_STRATEGY = {"patch": "default", "cls_patch": "full"}
IMAGE_TOKEN = "<image>"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class ConversionError(ValueError):
    """The source is not a checkpoint this converter can turn into a transformers llava model."""


@dataclass
class Conversion:
    """What `convert_checkpoint` did.

    Attributes:
        output: The folder written.
        mapping: Source key -> converted key, for every source tensor that was kept.
        skipped: Source keys dropped because transformers recomputes them (buffers).
        from_vision_tower: Converted keys whose tensors came from the separate vision tower.
        added_tokens: Tokens added to the tokenizer (``<image>``, and a pad token if none).
        vocab_size: The converted vocabulary size (rows of the embedding and output matrices).
    """

    output: Path
    mapping: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    from_vision_tower: list[str] = field(default_factory=list)
    added_tokens: list[str] = field(default_factory=list)
    vocab_size: int = 0


def map_key(key: str) -> str | None:
    """The transformers name of an original LLaVA key; None for a recomputed buffer.

    Raises:
        ConversionError: If the key matches no rule (an unsupported checkpoint layout).
    """
    if key.endswith(SKIPPED_SUFFIXES):
        return None
    for source, target in KEY_RULES:
        if key.startswith(source):
            return target + key[len(source) :]
    raise ConversionError(f"unknown key {key!r} in the source checkpoint (see df_agent.convert.KEY_RULES)")


def chat_template(conv_mode: str = "llava_v1") -> str:
    """The Jinja chat template of LLaVA's conversation mode `conv_mode` (llava_v1 or vicuna_v1)."""
    if conv_mode not in CONV_SYSTEMS:
        raise ConversionError(f"conv_mode must be one of {sorted(CONV_SYSTEMS)}, not {conv_mode!r}")
    return CHAT_TEMPLATE.replace("@SYSTEM@", CONV_SYSTEMS[conv_mode].replace("'", "\\'"))


def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder: ``*.safetensors`` or ``pytorch_model*.bin`` shards."""
    from safetensors.torch import load_file

    safetensors = sorted(folder.glob("*.safetensors"))
    bins = sorted(p for p in folder.glob("pytorch_model*.bin"))
    if not safetensors and not bins:
        if (folder / "mm_projector.bin").is_file():
            raise ConversionError(
                f"{folder} holds only a projector (mm_projector.bin); convert a full checkpoint"
            )
        raise ConversionError(f"no weights in {folder} (*.safetensors or pytorch_model*.bin)")
    tensors: dict[str, torch.Tensor] = {}
    for path in safetensors or bins:
        part = (
            load_file(path)
            if path.suffix == ".safetensors"
            else torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        )
        tensors.update(part)
    return tensors


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ConversionError(f"{folder} is not a checkpoint folder: no config.json")
    config = json.loads(path.read_text(encoding="utf-8"))
    if "mm_vision_tower" not in config and "mm_projector_type" not in config:
        raise ConversionError(f"{path} is not an original-format LLaVA config (no mm_vision_tower)")
    checks = {
        "mm_projector_type": (config.get("mm_projector_type", "linear"), {"mlp2x_gelu"}),
        "mm_vision_select_feature": (config.get("mm_vision_select_feature", "patch"), set(SELECT_STRATEGY)),
        "image_aspect_ratio": (config.get("image_aspect_ratio", "square"), {"pad", "square"}),
        "mm_patch_merge_type": (config.get("mm_patch_merge_type", "flat"), {"flat"}),
        "mm_use_im_start_end": (config.get("mm_use_im_start_end", False), {False}),
    }
    for name, (value, supported) in checks.items():
        if value not in supported:
            raise ConversionError(
                f"{name}={value!r} is not supported (supported: {sorted(map(str, supported))})"
            )
    return config


def _vision_tower(name: str, dtype: torch.dtype, need_weights: bool) -> tuple:
    """(CLIP vision config, CLIP image processor settings, state dict or None) of a local folder or id."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    try:
        config = CLIPVisionConfig.from_pretrained(name)
        processor = CLIPImageProcessor.from_pretrained(name).to_dict()
        weights = CLIPVisionModel.from_pretrained(name, dtype=dtype).state_dict() if need_weights else None
    except (OSError, ValueError) as err:
        raise ConversionError(
            f"the vision tower {name!r} could not be loaded ({str(err).splitlines()[0]}); pass "
            "--vision-tower PATH to a local copy of it (a CLIP folder with config.json, "
            "preprocessor_config.json and the weights)"
        ) from err
    return config, processor, weights


def _tokenizer(folder: Path, conv_mode: str) -> tuple:
    from transformers import AddedToken, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as err:
        raise ConversionError(f"could not load the tokenizer from {folder}: {err}") from err
    added = []
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
        added.append(IMAGE_TOKEN)
    if tokenizer.bos_token is not None:
        tokenizer.add_bos_token = False  # the chat template writes it
        if tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]:
            raise ConversionError(
                f"could not stop the tokenizer of {folder} from adding its BOS token itself"
            )
    if tokenizer.pad_token is None:  # LLaVA v1 pads with unk
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
            added.append("<pad>")
    tokenizer.chat_template = chat_template(conv_mode)
    return tokenizer, added


def _grow(matrix: torch.Tensor, rows: int) -> torch.Tensor:
    """`matrix` with rows appended up to `rows`, each the mean of the existing rows."""
    extra = rows - matrix.shape[0]
    if extra <= 0:
        return matrix
    mean = matrix.float().mean(dim=0, keepdim=True).to(matrix.dtype)
    return torch.cat([matrix, mean.expand(extra, -1)])


def convert_checkpoint(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    vision_tower: str | os.PathLike | None = None,
    conv_mode: str = "llava_v1",
    dtype: str = "auto",
) -> Conversion:
    """Convert the original-format LLaVA checkpoint folder `source` into `output`.

    Args:
        source: A folder saved by LLaVA's code (config with ``mm_*`` fields, LLaVA key names).
        output: A new (or empty) folder for the transformers checkpoint.
        vision_tower: A local CLIP folder for the tower's config, image processor and (when the
            source does not hold them) weights; default the source's ``mm_vision_tower``.
        conv_mode: The chat template: "llava_v1" (LLaVA's default) or "vicuna_v1".
        dtype: "auto" (the source's), "float16", "bfloat16" or "float32".

    Returns:
        What was converted, and how (see `Conversion`).

    Raises:
        ConversionError: If the source is not a supported checkpoint, a key is unknown, the
            vision tower cannot be loaded or does not fit, or `output` is not empty.
    """
    source, output = Path(source), Path(output)
    if output.exists() and any(output.iterdir()):
        raise ConversionError(f"the output folder {output} is not empty")
    if dtype != "auto" and dtype not in DTYPES:
        raise ConversionError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, not {dtype!r}")
    config = _read_config(source)
    result = Conversion(output=output)
    tensors = _renamed(load_state_dict(source), result)
    floating = [t.dtype for t in tensors.values() if t.is_floating_point()]
    out_dtype = DTYPES[dtype] if dtype != "auto" else max(set(floating), key=floating.count)

    tower = vision_tower or config.get("mm_vision_tower")
    if not tower:
        raise ConversionError(
            "the checkpoint names no vision tower (mm_vision_tower); pass --vision-tower PATH"
        )
    has_tower = any(key.startswith("model.vision_tower.") for key in tensors)
    vision_config, image_settings, tower_weights = _vision_tower(str(tower), out_dtype, not has_tower)
    for key, tensor in (tower_weights or {}).items():
        if not key.endswith(SKIPPED_SUFFIXES):
            target = "model.vision_tower." + key.removeprefix("vision_model.")
            tensors[target] = tensor
            result.from_vision_tower.append(target)
    if config.get("mm_hidden_size", vision_config.hidden_size) != vision_config.hidden_size:
        raise ConversionError(
            f"the vision tower {str(tower)!r} has hidden size {vision_config.hidden_size}, but the "
            f"checkpoint's projector expects mm_hidden_size={config['mm_hidden_size']}"
        )

    tokenizer, result.added_tokens = _tokenizer(source, conv_mode)
    result.vocab_size = max(tensors["model.language_model.embed_tokens.weight"].shape[0], len(tokenizer))
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        if key in tensors:
            tensors[key] = _grow(tensors[key], result.vocab_size)
    model = _model(_llava_config(config, vision_config, tokenizer, result.vocab_size, out_dtype), tensors)
    processor = _processor(config, vision_config, image_settings, tokenizer)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    processor.save_pretrained(output)
    return result


def _renamed(tensors: dict[str, torch.Tensor], result: Conversion) -> dict[str, torch.Tensor]:
    """The tensors under their transformers names; fills `result.mapping` and `result.skipped`."""
    renamed = {}
    for key, tensor in tensors.items():
        target = map_key(key)
        if target is None:
            result.skipped.append(key)
        else:
            result.mapping[key] = target
            renamed[target] = tensor
    return renamed


def _llava_config(config: dict, vision_config, tokenizer, vocab_size: int, dtype: torch.dtype):
    """The `LlavaConfig`: the Llama fields of the flat original config, the CLIP tower's config."""
    from transformers import LlamaConfig, LlavaConfig

    not_copied = {"architectures", "model_type", "transformers_version", "_name_or_path", "dtype"}
    not_copied |= {"vocab_size", "pad_token_id", "rope_parameters"}
    fields = {key: value for key, value in config.items() if key in set(LlamaConfig().to_dict()) - not_copied}
    rope = {"rope_type": "default", "rope_theta": config.get("rope_theta", 10000.0)}
    if config.get("rope_scaling"):  # the legacy form: {"type": "linear", "factor": 2.0}
        scaling = dict(config["rope_scaling"])
        rope |= {"rope_type": scaling.pop("rope_type", scaling.pop("type", "default")), **scaling}
    text_config = LlamaConfig(
        **fields, rope_parameters=rope, vocab_size=vocab_size, pad_token_id=tokenizer.pad_token_id
    )
    strategy = SELECT_STRATEGY[config.get("mm_vision_select_feature", "patch")]
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    llava_config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=config.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        image_seq_length=patches + (strategy == "full"),
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    llava_config.dtype = dtype
    return llava_config


def _model(llava_config, tensors: dict[str, torch.Tensor]):
    """A `LlavaForConditionalGeneration` holding exactly `tensors` (built on the meta device)."""
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    dtype = llava_config.dtype
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(llava_config)
    state = {key: t.to(dtype) if t.is_floating_point() else t for key, t in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if llava_config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ConversionError(
            f"the converted tensors do not fit the llava model: missing {sorted(set(missing) - tied)[:8]}, "
            f"unexpected {sorted(unexpected)[:8]}"
        )
    if tied:
        model.tie_weights()
    text = llava_config.text_config
    model.generation_config = GenerationConfig(
        bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id
    )
    return model


def _processor(config: dict, vision_config, image_settings: dict, tokenizer):
    """LLaVA's preprocessing: the CLIP processor's settings, padded to a square when ``pad``."""
    from transformers import LlavaImageProcessor, LlavaProcessor

    kept = ("size", "crop_size", "image_mean", "image_std", "resample", "do_center_crop")
    image_processor = LlavaImageProcessor(
        do_pad=config.get("image_aspect_ratio") == "pad",
        **{key: image_settings[key] for key in kept if key in image_settings},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=SELECT_STRATEGY[config.get("mm_vision_select_feature", "patch")],
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``df-agent convert-checkpoint`` arguments."""
    parser.add_argument("source", metavar="SRC", help="original-format LLaVA / DualFocus checkpoint folder")
    parser.add_argument("output", metavar="DST", help="new folder for the transformers checkpoint")
    parser.add_argument(
        "--vision-tower",
        metavar="PATH",
        help="local CLIP folder (default: the checkpoint's mm_vision_tower, which may need the hub)",
    )
    parser.add_argument("--conv-mode", choices=sorted(CONV_SYSTEMS), default="llava_v1", help="chat template")
    parser.add_argument(
        "--dtype", choices=["auto", *DTYPES], default="auto", help="weights dtype (auto: the source's)"
    )


def run(args: argparse.Namespace) -> int:
    """Convert, then print what was done."""
    result = convert_checkpoint(
        args.source, args.output, vision_tower=args.vision_tower, conv_mode=args.conv_mode, dtype=args.dtype
    )
    print(
        f"wrote {result.output}: {len(result.mapping)} tensors mapped, "
        f"{len(result.from_vision_tower)} from the vision tower, {len(result.skipped)} buffers skipped, "
        f"added tokens {result.added_tokens}, vocabulary {result.vocab_size}"
    )
    return 0


__all__ = [
    "CHAT_TEMPLATE",
    "CONV_SYSTEMS",
    "KEY_RULES",
    "SKIPPED_SUFFIXES",
    "Conversion",
    "ConversionError",
    "add_arguments",
    "chat_template",
    "convert_checkpoint",
    "load_state_dict",
    "map_key",
    "run",
]
