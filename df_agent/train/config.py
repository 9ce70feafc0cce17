"""The training configuration: a YAML/JSON file validated by pydantic."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field


class AuxAttention(BaseModel):
    """Direct supervision of one attention head: its mass on the target region's image patches.

    Only for models built from scratch whose image is one square grid of patches.
    """

    layer: int = 1
    heads: list[int] = Field(default_factory=lambda: [0])
    weight: float = 1.0
    word_layer: int | None = Field(
        default=None,
        description="Also supervise this layer's heads to attend to the question's object words.",
    )
    word_heads: list[int] = Field(default_factory=lambda: [0])
    word_queries: Literal["reply", "image"] = Field(
        default="reply",
        description="Whose attention goes to the words: the reply's positions or the image patches'.",
    )
    probe_layer: int | None = Field(
        default=None,
        description=(
            "Train a linear probe on this hidden state (0 = embeddings) to mark, at every image "
            "patch, whether it shows the object the question names (thrown away afterwards)."
        ),
    )
    probe_weight: float = 1.0


class StageConfig(BaseModel):
    """One training stage."""

    name: str
    kind: Literal["vision", "lm"] = "lm"
    steps: int = Field(gt=0)
    lr: float = 1e-3
    warmup: int = 50
    schedule_steps: int | None = Field(
        default=None, description="Length of the cosine schedule (default: steps); longer = stop early on it."
    )
    batch_size: int = 32
    tasks: dict[str, float] = Field(
        default_factory=lambda: {"macro": 1.0, "region": 1.0, "micro": 1.0},
        description="Sampling weights of the DualFocus tasks (macro, region, micro).",
    )
    qtypes: dict[str, float] | None = Field(
        default=None,
        description="FocusShapes only: sampling weights of detail, color, count, exist questions.",
    )
    n_objects: tuple[int, int] = (3, 6)
    train: list[str] = Field(
        default_factory=lambda: ["projector", "language_model"],
        description=(
            "Parts trained in this stage: vision_tower, projector, language_model (the rest is frozen)."
        ),
    )
    vision_lr_scale: float = Field(
        default=0.1, description="Learning-rate factor of the vision tower when trained."
    )
    box_jitter: float = 0.15
    aux_attention: AuxAttention | None = None
    attend_digit: bool = Field(
        default=False,
        description="FocusShapes: micro replies to digit questions attend to the digit's glyph in the crop.",
    )
    crops_per_scene: int = Field(
        default=2, description="Vision stages: crops per scene (true, then jittered)."
    )
    full_view_every: int = Field(default=1, description="Vision stages: the full view of every n-th scene.")
    vision_aux_scenes: int = Field(
        default=0, description="LM stages: scenes per step of per-patch vision labels."
    )
    digit_weight: float = Field(default=2.0, description="Vision stages: weight of the per-patch digit loss.")
    shape_weight: float = Field(
        default=1.0,
        description="Vision stages and LM stages' vision labels: weight of the per-patch shape loss.",
    )
    vote_wording: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description=(
            "LM stages: the share of micro examples worded as the official vote scores them (the "
            "question with the short-answer hint), so the vote's context is one the model has seen."
        ),
    )
    length_groups: int = Field(
        default=1,
        ge=1,
        description=(
            "LM stages: run each batch as up to this many forward passes of rows of similar length "
            "(less padding: macro and box rows are half as long as micro rows); the same losses."
        ),
    )


class TrainConfig(BaseModel):
    """A whole training run."""

    seed: int = 0
    init: str = Field(default="scratch", description='"scratch" (build a small model) or a checkpoint path.')
    model: dict = Field(
        default_factory=dict, description="Sizes for a scratch model (see build.build_config)."
    )
    data: str = Field(
        default="focusshapes", description='"focusshapes" (generated on the fly) or a JSONL path.'
    )
    num_threads: int = 2
    num_workers: int = 1
    checkpoint_every: int = 200
    weight_decay: float = 0.01
    precision: Literal["fp32", "bf16"] = Field(
        default="fp32",
        description=(
            "bf16: the forward passes run under bfloat16 autocast (weights, gradients and the "
            "optimizer stay float32). Faster on CPUs with native bfloat16 (AVX512-BF16, AMX): about 40% "
            "less compute per step on the project's 2-core machine; it may be slower without."
        ),
    )
    grad_clip: float = 1.0
    stages: list[StageConfig]


def load_config(path: str | Path) -> TrainConfig:
    """Read a training configuration from YAML or JSON."""
    text = Path(path).read_text(encoding="utf-8")
    data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    return TrainConfig.model_validate(data)


__all__ = ["AuxAttention", "StageConfig", "TrainConfig", "load_config"]
