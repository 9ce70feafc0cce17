"""The training loop: stages, seeded batches, checkpoints and resume.

Every batch is a pure function of (seed, stage name, step), so a run resumed from a
checkpoint sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset
from tqdm import tqdm

from df_agent.train.config import StageConfig, TrainConfig

CHECKPOINT = "checkpoint.pt"


class _StageBatches(IterableDataset):
    """Batches ``start .. stage.steps-1`` of a stage, made in a worker process."""

    def __init__(self, make_batch, start: int, steps: int):
        self.make_batch, self.start, self.steps = make_batch, start, steps

    def __iter__(self):
        torch.set_num_threads(1)
        for step in range(self.start, self.steps):
            yield self.make_batch(step)


def _lr(stage: StageConfig, step: int) -> float:
    if step < stage.warmup:
        return stage.lr * (step + 1) / stage.warmup
    total = stage.schedule_steps or stage.steps
    progress = min(1.0, (step - stage.warmup) / max(1, total - stage.warmup))
    return stage.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def _set_trainable(model, parts: list[str], vision_lr_scale: float = 1.0) -> list[dict]:
    """Freeze everything but `parts`; returns optimizer parameter groups (with an "lr_scale")."""
    names = {
        "vision_tower": model.model.vision_tower,
        "projector": model.model.multi_modal_projector,
        "language_model": model.model.language_model,
    }
    for p in model.parameters():
        p.requires_grad_(False)
    groups = []
    for part in parts:
        params = list(names[part].parameters())
        if part == "language_model" and not any(model.lm_head.weight is p for p in params):
            params.append(model.lm_head.weight)
        for p in params:
            p.requires_grad_(True)
        groups.append({"params": params, "lr_scale": vision_lr_scale if part == "vision_tower" else 1.0})
    return groups


def load_start(cfg: TrainConfig):
    """Processor and model at the start of training: built from scratch or loaded."""
    if cfg.init == "scratch":
        from df_agent.train.build import build_model, build_processor, build_tokenizer

        tokenizer = build_tokenizer()
        processor = build_processor(
            tokenizer, cfg.model.get("image_size", 64), cfg.model.get("patch_size", 8)
        )
        model = build_model(tokenizer, cfg.model, seed=cfg.seed)
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(cfg.init)
        model = AutoModelForImageTextToText.from_pretrained(cfg.init, dtype=torch.float32)
    return processor, model


def _save_checkpoint(out: Path, state: dict) -> None:
    tmp = out / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out / CHECKPOINT)


def train(
    cfg: TrainConfig, out_dir: str | Path, resume: bool = False, log=print, stop_after: int | None = None
) -> Path | None:
    """Run (or resume) every stage of `cfg`; returns the folder of the final model.

    Args:
        cfg: The configuration.
        out_dir: Where checkpoints, the log and the final model (``final/``) go.
        resume: Continue from ``out_dir/checkpoint.pt`` if it exists.
        log: Called with one line of text per event.
        stop_after: Stop (with a checkpoint) after this many optimizer steps in this call;
            returns None then. For time-boxed runs and tests.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.num_threads)
    processor, model = load_start(cfg)
    if cfg.stages and any(s.aux_attention for s in cfg.stages):
        model.set_attn_implementation("eager")  # attention weights are supervised
    start_stage, start_step, state = 0, 0, None
    if resume and (out / CHECKPOINT).exists():
        state = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        start_stage, start_step = state["stage"], state["step"]
        log(f"resumed at stage {start_stage} step {start_step}")
    (out / "config.json").write_text(cfg.model_dump_json(indent=2))
    history = out / "history.jsonl"
    done = 0
    for index in range(start_stage, len(cfg.stages)):
        stage = cfg.stages[index]
        first = start_step if index == start_stage else 0
        resumed = state if (state is not None and index == start_stage and 0 < first < stage.steps) else None
        budget = None if stop_after is None else stop_after - done
        done += _run_stage(cfg, index, stage, processor, model, out, first, resumed, history, log, budget)
        state = None
        if stop_after is not None and done >= stop_after and (first + budget < stage.steps):
            log(f"stopped after {done} steps")
            return None
        _save_checkpoint(out, {"stage": index + 1, "step": 0, "model": model.state_dict()})
    final = out / "final"
    model.save_pretrained(final)
    processor.save_pretrained(final)
    log(f"saved {final}")
    return final


def _vision_batch(cfg: TrainConfig, stage: StageConfig, processor, step: int, n_scenes: int) -> dict:
    """Per-patch-labelled views of step `step` of a stage (the vision stage, or an LM stage's aux)."""
    from df_agent.train.vision import vision_batch

    return vision_batch(
        f"{cfg.seed}:{stage.name}:{step}",
        n_scenes,
        processor,
        stage.n_objects,
        crops_per_scene=stage.crops_per_scene,
        full_view_every=stage.full_view_every,
    )


def _run_stage(cfg, index, stage, processor, model, out, first, resumed, history, log, budget=None) -> int:
    heads = probe = None
    if stage.kind == "vision":
        from df_agent.train.vision import VisionHeads, patch_features

        heads = VisionHeads.for_stage(model, stage)
        groups = [
            *_set_trainable(model, ["vision_tower"]),
            {"params": list(heads.parameters()), "lr_scale": 1.0},
        ]

        def make_batch(step):
            return _vision_batch(cfg, stage, processor, step, stage.batch_size)

    else:
        from df_agent.train.lm import lm_batch, lm_loss

        groups = _set_trainable(model, stage.train, stage.vision_lr_scale)
        aux = stage.aux_attention
        if aux is not None and aux.probe_layer is not None:
            probe = torch.nn.Linear(model.config.text_config.hidden_size, 1)
            groups.append({"params": list(probe.parameters()), "lr_scale": 1.0})
        if stage.vision_aux_scenes:  # keep the per-patch labels on while the tower trains
            from df_agent.train.vision import VisionHeads, patch_features

            heads = VisionHeads.for_stage(model, stage)
            groups.append({"params": list(heads.parameters()), "lr_scale": 1.0})

        def make_batch(step):
            batch = lm_batch(cfg, stage, processor, step)
            if stage.vision_aux_scenes:
                batch["vision"] = _vision_batch(cfg, stage, processor, step, stage.vision_aux_scenes)
            return batch

    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=stage.lr, weight_decay=cfg.weight_decay)
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
        if heads is not None and resumed.get("heads"):
            heads.load_state_dict(resumed["heads"])
        if probe is not None and resumed.get("probe"):
            probe.load_state_dict(resumed["probe"])
    model.train()
    last = stage.steps if budget is None else min(stage.steps, first + budget)
    loader = DataLoader(
        _StageBatches(make_batch, first, last),
        batch_size=None,
        num_workers=cfg.num_workers,
        prefetch_factor=4 if cfg.num_workers else None,
    )
    bar = tqdm(total=stage.steps, initial=first, desc=f"stage {index} {stage.name}", mininterval=5)
    t0, running = time.time(), {}
    for step, batch in zip(range(first, last), loader, strict=False):
        for group in optimizer.param_groups:
            group["lr"] = _lr(stage, step) * group["lr_scale"]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            if stage.kind == "vision":
                loss, parts = heads(patch_features(model, batch["pixel_values"]), batch["labels"])
            else:
                loss, parts = lm_loss(model, batch, stage, probe)
                if heads is not None:
                    vision = batch["vision"]
                    vloss, vparts = heads(patch_features(model, vision["pixel_values"]), vision["labels"])
                    loss = loss + vloss
                    parts["digit_acc"] = vparts["digit_acc"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        for key, value in {"loss": loss, **parts}.items():
            value = float(value.detach()) if torch.is_tensor(value) else float(value)
            running[key] = 0.9 * running.get(key, value) + 0.1 * value
        bar.update(1)
        if (step + 1) % 25 == 0 or step + 1 == last:
            bar.set_postfix(
                {
                    k: f"{v:.3f}"
                    for k, v in running.items()
                    if k in ("loss", "digit_acc", "region", "attn", "probe")
                }
            )
            with history.open("a") as f:
                f.write(
                    json.dumps(
                        {
                            "stage": stage.name,
                            "step": step + 1,
                            "time": round(time.time() - t0, 1),
                            **{k: round(v, 4) for k, v in running.items()},
                        }
                    )
                    + "\n"
                )
        if ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == last) and step + 1 < stage.steps:
            _save_checkpoint(
                out,
                {
                    "stage": index,
                    "step": step + 1,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "heads": heads.state_dict() if heads is not None else None,
                    "probe": probe.state_dict() if probe is not None else None,
                },
            )
    bar.close()
    if last < stage.steps:
        return last - first
    log(
        f"stage {stage.name} done in {time.time() - t0:.0f} s: "
        + ", ".join(f"{k} {v:.3f}" for k, v in running.items())
    )
    return last - first


__all__ = ["export_checkpoint", "load_start", "train"]


def export_checkpoint(cfg: TrainConfig, checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Save the model of a training checkpoint as a `save_pretrained` folder (with its processor)."""
    processor, model = load_start(cfg)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return Path(out_dir)
