"""Build a small LLaVA model from scratch: word-level tokenizer, processor, config.

The tokenizer knows every word of the DualFocus prompts and of FocusShapes, and
every two-decimal coordinate "0.00".."1.00" as ONE token, so a box
"[0.12,0.34,0.56,0.78]" is 9 tokens and each coordinate is one classification.
Decoding joins tokens with spaces ("[ 0.12 , 0.34 , 0.56 , 0.78 ]"); the first four
numbers still parse as the box. The chat template is llava-hf style
with the text of a turn before its images, ``USER: {text}\\n<image> ASSISTANT: {reply}</s> USER: ...``
(several turns, several images per turn): each image patch can then attend to the
question, so finding the object a question names is a per-patch match the answer only
has to gather.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch

from df_agent.data.focusshapes import COLORS, COUNT_QUESTION, SHAPES

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
PRETOKENIZE_PATTERN = r"[01]\.\d\d|\w+|[^\w\s]"
COORD_TOKENS = tuple(f"{i / 100:.2f}" for i in range(101))

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] != 'system' -%}{{- message['role'].upper() + ': ' -}}{%- endif -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for c in message['content'] if c['type'] == 'text' -%}{{- c['text'] -}}{%- endfor -%}"
    "{%- for c in message['content'] if c['type'] == 'image' -%}{{- '\\n<image>' -}}{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{- '</s>' -}}{%- endif -%}"
    "{{- ' ' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

# Every text the model must read or write, word for word.
PROMPT_TEXTS = (
    "USER: ASSISTANT: SYSTEM:",
    "Please provide the bounding box coordinate of the region this question asks:",
    "Please combine the information from these two images and answer this question:",
    "Answer the question using a single word or phrase.",
    "What number is on the red circle? What color is the star?",
    "Is there a green square? Is there an orange star?",
    COUNT_QUESTION,
    "yes no Yes No [ ] , . ? : ; ' \" ( ) -",
    "the a an of in on is are there what which how many number color colour",
    "object objects shape shapes digit image images picture left right top bottom",
    " ".join(SHAPES),
    " ".join(COLORS),
    " ".join(str(i) for i in range(21)),
)


def _words(texts: Iterable[str]) -> list[str]:
    words: list[str] = []
    for text in texts:
        for word in re.findall(PRETOKENIZE_PATTERN, text):
            for form in (word, word.lower(), word.capitalize()):
                if form not in words:
                    words.append(form)
    return words


def build_tokenizer(extra_texts: Iterable[str] = ()):
    """A word-level `PreTrainedTokenizerFast` with the llava-style chat template.

    Args:
        extra_texts: More texts whose words must be in the vocabulary.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, *COORD_TOKENS, *_words([*PROMPT_TEXTS, *extra_texts])):
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
        ]
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    return tokenizer


def build_processor(tokenizer=None, image_size: int = 64, patch_size: int = 8):
    """`LlavaProcessor`: the tokenizer + a CLIP image processor resizing to ``image_size`` square."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    image_processor = CLIPImageProcessor(
        size={"height": image_size, "width": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=False,
        do_resize=True,
        resample=3,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(tokenizer, model_cfg: dict | None = None):
    """`LlavaConfig` with a CLIP vision tower and a Llama LM, sized by `model_cfg`.

    Keys (defaults in brackets): image_size [64], patch_size [8], vision_hidden [128],
    vision_layers [4], vision_heads [4], text_hidden [192], text_layers [4],
    text_heads [6], text_intermediate [512], max_positions [512], rope_theta [10000]
    (a large theta leaves more dimensions of each head free of position, for matching
    question words with image patches 20-150 positions away).
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    c = {
        "image_size": 64,
        "patch_size": 8,
        "vision_hidden": 128,
        "vision_layers": 4,
        "vision_heads": 4,
        "text_hidden": 192,
        "text_layers": 4,
        "text_heads": 6,
        "text_intermediate": 512,
        "max_positions": 512,
        "rope_theta": 10000.0,
        **(model_cfg or {}),
    }
    vision = CLIPVisionConfig(
        hidden_size=c["vision_hidden"],
        intermediate_size=4 * c["vision_hidden"],
        num_hidden_layers=c["vision_layers"],
        num_attention_heads=c["vision_heads"],
        image_size=c["image_size"],
        patch_size=c["patch_size"],
        projection_dim=c["vision_hidden"],
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=c["text_hidden"],
        intermediate_size=c["text_intermediate"],
        num_hidden_layers=c["text_layers"],
        num_attention_heads=c["text_heads"],
        num_key_value_heads=c["text_heads"],
        max_position_embeddings=c["max_positions"],
        rope_parameters={"rope_type": "default", "rope_theta": float(c["rope_theta"])},
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    n_image_tokens = (c["image_size"] // c["patch_size"]) ** 2
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=n_image_tokens,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


def build_model(tokenizer, model_cfg: dict | None = None, seed: int = 0):
    """A randomly initialised `LlavaForConditionalGeneration`.

    The coordinate tokens' embeddings start as Fourier features of their value, so
    neighbouring coordinates start close and the LM can write a coordinate as a
    smooth function of the position it read.
    """
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    config = build_config(tokenizer, model_cfg)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    emb = model.get_input_embeddings().weight
    ids = tokenizer.convert_tokens_to_ids(list(COORD_TOKENS))
    dim = emb.shape[1]
    with torch.no_grad():
        values = torch.linspace(0, 1, len(ids))
        freqs = torch.arange(1, dim // 4 + 1, dtype=torch.float32) * math.pi / 2
        feats = torch.cat([torch.cos(values[:, None] * freqs), torch.sin(values[:, None] * freqs)], dim=1)
        block = torch.zeros(len(ids), dim)
        block[:, : feats.shape[1]] = feats * emb.std() * 2
        emb[ids] = block + 0.3 * emb[ids]
    return model


__all__ = [
    "CHAT_TEMPLATE",
    "COORD_TOKENS",
    "build_config",
    "build_model",
    "build_processor",
    "build_tokenizer",
]
