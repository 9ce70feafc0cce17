"""Stage "vision": pretrain the vision tower alone with direct, per-patch labels.

Reading a 3-pixel digit through the language loss alone is far too slow for a tiny
tower trained from scratch (docs/shipped-model-experiments.md). Here every patch of a view gets labels:
the colour, the shape and the box of the object that covers it, the object count
of the scene (full views), and, in crops, the digit on the patches covering its glyph.
Linear heads on the features LLaVA feeds its projector (last layer, patch tokens)
read them out; the heads are thrown away afterwards.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image
from torch import nn

from df_agent.boxes import Box, zoom_box
from df_agent.data.focusshapes import COLORS, SHAPES, Scene, render_scene

N_DIGIT = 11  # 0..9, 10 = no digit
N_COUNT = 8


def jitter_box(box, rng: random.Random, amount: float) -> tuple[float, float, float, float]:
    """Shift and rescale a box by up to `amount` of its size (how a model's own boxes err)."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    cx = (x1 + x2) / 2 + rng.uniform(-amount, amount) * w
    cy = (y1 + y2) / 2 + rng.uniform(-amount, amount) * h
    w *= 1 + rng.uniform(-amount, amount)
    h *= 1 + rng.uniform(-amount, amount)
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


def crop_region(box, size: tuple[int, int], margin: int = 25, min_side: int = 0) -> tuple[int, int, int, int]:
    """The DualFocus zoom region for a pixel box (square, clip, +margin, clip)."""
    w, h = size
    x1, y1, x2, y2 = box
    x1, x2 = sorted((min(max(x1, 0), w), min(max(x2, 0), w)))
    y1, y2 = sorted((min(max(y1, 0), h), min(max(y2, 0), h)))
    if x2 - x1 < 1 or y2 - y1 < 1:
        x2, y2 = min(x1 + 1, w), min(y1 + 1, h)
        x1, y1 = x2 - 1, y2 - 1
    z = zoom_box(Box(x1=x1, y1=y1, x2=x2, y2=y2), size, margin=margin, min_side=min_side)
    return (int(z.x1), int(z.y1), int(z.x2), int(z.y2))


def patch_labels(scene: Scene, region: tuple[int, int, int, int], grid: int, with_digits: bool) -> dict:
    """Per-patch labels of the view of `scene` cut at `region` and resized to a square grid."""
    x1, y1, x2, y2 = region
    res = grid * 8
    omap = np.asarray(Image.fromarray(scene.object_map[y1:y2, x1:x2]).resize((res, res), Image.NEAREST))
    dmap = np.asarray(
        Image.fromarray(scene.digit_map[y1:y2, x1:x2].astype(np.uint8)).resize((res, res), Image.NEAREST)
    )
    cells = omap.reshape(grid, 8, grid, 8).transpose(0, 2, 1, 3).reshape(grid * grid, 64)
    dcells = dmap.reshape(grid, 8, grid, 8).transpose(0, 2, 1, 3).reshape(grid * grid, 64)
    n = len(scene.objects)
    counts = np.stack([(cells == k + 1).sum(1) for k in range(n)], 1) if n else np.zeros((grid * grid, 1))
    owner = np.where(counts.max(1) >= 13, counts.argmax(1) + 1, 0)
    colors, shapes, digits = [], [], []
    boxes = np.zeros((grid * grid, 4), np.float32)
    color_ids, shape_ids = list(COLORS), list(SHAPES)
    rw, rh = x2 - x1, y2 - y1
    for p, o in enumerate(owner):
        if o == 0:
            colors.append(0), shapes.append(0), digits.append(N_DIGIT - 1)
            continue
        obj = scene.objects[o - 1]
        colors.append(color_ids.index(obj.color) + 1)
        shapes.append(shape_ids.index(obj.shape) + 1)
        bx1, by1, bx2, by2 = obj.box
        boxes[p] = ((bx1 - x1) / rw, (by1 - y1) / rh, (bx2 - x1) / rw, (by2 - y1) / rh)
        on_glyph = with_digits and (dcells[p] > 0).sum() >= 3
        digits.append(obj.digit if on_glyph else (N_DIGIT - 1 if with_digits else -100))
    return {
        "color": torch.tensor(colors),
        "shape": torch.tensor(shapes),
        "digit": torch.tensor(digits),
        "box": torch.from_numpy(boxes),
        "box_mask": torch.from_numpy(owner > 0),
        "count": torch.full((grid * grid,), min(n, N_COUNT - 1) if not with_digits else -100),
    }


class VisionHeads(nn.Module):
    """Linear read-outs of per-patch features: the vision stages' losses, and the per-patch labels an
    LM stage keeps on while the tower trains (`vision_aux_scenes`). Thrown away after each stage."""

    def __init__(self, dim: int, digit_weight: float = 2.0, shape_weight: float = 1.0):
        super().__init__()
        self.digit_weight = digit_weight
        self.shape_weight = shape_weight
        self.color = nn.Linear(dim, len(COLORS) + 1)
        self.shape = nn.Linear(dim, len(SHAPES) + 1)
        self.digit = nn.Linear(dim, N_DIGIT)
        self.box = nn.Linear(dim, 4)
        self.count = nn.Linear(dim, N_COUNT)

    @classmethod
    def for_stage(cls, model, stage) -> VisionHeads:
        """Heads for `model`'s tower, weighted as `stage` says."""
        return cls(model.config.vision_config.hidden_size, stage.digit_weight, stage.shape_weight)

    def forward(self, feats: torch.Tensor, labels: dict) -> tuple[torch.Tensor, dict]:
        ce = nn.functional.cross_entropy
        out = {}
        out["color"] = ce(self.color(feats).flatten(0, 1), labels["color"].flatten())
        out["shape"] = ce(self.shape(feats).flatten(0, 1), labels["shape"].flatten())
        digit_logits = self.digit(feats).flatten(0, 1)
        digit_labels = labels["digit"].flatten()
        weights = torch.ones(N_DIGIT)
        weights[N_DIGIT - 1] = 0.2  # most patches carry no digit
        out["digit"] = ce(digit_logits, digit_labels, weight=weights, ignore_index=-100)
        mask = labels["box_mask"]
        pred = torch.sigmoid(self.box(feats))
        out["box"] = (pred - labels["box"]).abs().sum(-1)[mask].mean() * 4 if mask.any() else feats.sum() * 0
        count_labels = labels["count"].flatten()
        has_count = (count_labels >= 0).any()
        out["count"] = (
            ce(self.count(feats).flatten(0, 1), count_labels, ignore_index=-100)
            if has_count
            else feats.sum() * 0
        )
        total = (
            out["color"]
            + self.shape_weight * out["shape"]
            + self.digit_weight * out["digit"]
            + out["box"]
            + 0.5 * out["count"]
        )
        with torch.no_grad():
            sel = digit_labels != N_DIGIT - 1
            sel &= digit_labels >= 0
            out["digit_acc"] = (
                (digit_logits.argmax(-1)[sel] == digit_labels[sel]).float().mean()
                if sel.any()
                else torch.tensor(0.0)
            )
        return total, out


def vision_batch(
    seed: str,
    n_scenes: int,
    processor,
    n_objects=(3, 6),
    jitter: float = 0.25,
    crops_per_scene: int = 2,
    full_view_every: int = 1,
) -> dict:
    """One batch of the vision stage: per scene, maybe the full view, then crops (true, then jittered)."""
    rng = random.Random(f"vision-batch:{seed}")
    grid = processor.image_processor.size["height"] // processor.patch_size
    images, labels = [], []
    for k in range(n_scenes):
        scene = render_scene(f"{seed}:{k}", n_objects=n_objects)
        size = scene.size
        if k % full_view_every == 0:
            images.append(scene.image)
            labels.append(patch_labels(scene, (0, 0, *size), grid, with_digits=False))
        for c in range(crops_per_scene):
            amount = 0.05 if c == 0 else jitter
            obj = rng.choice(scene.objects)
            region = crop_region(jitter_box(obj.box, rng, amount), size)
            images.append(scene.image.crop(region))
            labels.append(patch_labels(scene, region, grid, with_digits=True))
    pixel_values = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    stacked = {key: torch.stack([lab[key] for lab in labels]) for key in labels[0]}
    return {"pixel_values": pixel_values, "labels": stacked}


def patch_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The features LLaVA projects: hidden states of `vision_feature_layer`, without the CLS token."""
    tower = model.model.vision_tower
    out = tower(pixel_values, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


__all__ = ["VisionHeads", "crop_region", "jitter_box", "patch_features", "patch_labels", "vision_batch"]
