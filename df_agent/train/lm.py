"""Language-model stages: the three DualFocus tasks, their batches and their loss.

From each record (question, answer, box) come three supervised conversations:

- macro:  [image, question] -> answer
- region: [image, box request + question] -> the box as text ("[0.12,0.34,0.56,0.78]")
- micro:  the region conversation with the box as the assistant's reply, then
          [crop, combine request + question] -> answer; images [full, crop]

The crop follows the zoom rule (square, clip, +25 px, clip) around a jittered copy of
the box, so the model learns to read through its own imperfect boxes. Encoding goes
through the processor and chat template inference uses (`encode_for_training`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from PIL import Image

from df_agent.backends.base import Conversation
from df_agent.data.format import FocusRecord
from df_agent.prompt_sets import load_prompts
from df_agent.train.config import StageConfig, TrainConfig
from df_agent.train.vision import crop_region, jitter_box

# The engine's own DualFocus wordings (prompts/dualfocus/), so training and inference cannot drift apart.
BOX_REQUEST = load_prompts("dualfocus").locate
COMBINE_REQUEST = load_prompts("dualfocus").micro
VOTE_REQUEST = load_prompts("dualfocus").score  # the micro turn as the official vote words it
TASKS = ("macro", "region", "micro")


@dataclass
class Example:
    """One supervised conversation, and per image the target box for attention supervision."""

    task: str
    conversation: Conversation
    reply: str
    targets: list[tuple[float, float, float, float] | None] = field(default_factory=list)


def _box_text(box, size) -> str:
    w, h = size
    x1, y1, x2, y2 = box
    clip = lambda v: min(max(v, 0.0), 1.0)  # noqa: E731
    return f"[{clip(x1 / w):.2f},{clip(y1 / h):.2f},{clip(x2 / w):.2f},{clip(y2 / h):.2f}]"


def make_example(
    record: FocusRecord,
    image: Image.Image,
    task: str,
    rng: random.Random,
    jitter: float,
    answer_box: tuple[float, float, float, float] | None = None,
    micro_request: str = COMBINE_REQUEST,
) -> Example:
    """The conversation of one DualFocus task for a record.

    `answer_box` (pixels), if given, is where the answer is read in the crop (a digit's
    glyph rather than the whole object): the micro reply's attention target there.
    `micro_request` words the micro turn (`VOTE_REQUEST`: as the official vote scores it).
    """
    size = (record.width, record.height)
    whole = tuple(record.box) == (0.0, 0.0, float(record.width), float(record.height))
    target = None if whole else tuple(record.box)
    if task == "macro":
        return Example(task, Conversation().user(record.question, [image]), record.answer, [target])
    region_turn = Conversation().user(BOX_REQUEST.format(question=record.question), [image])
    if task == "region":
        return Example(task, region_turn, record.box_text(), [target])
    box = tuple(record.box) if whole else jitter_box(record.box, rng, jitter)
    region = crop_region(box, size)
    crop = image.crop(region)
    crop_target = None
    read = answer_box if answer_box is not None else target
    if read is not None:
        x1, y1, _, _ = region
        crop_target = (read[0] - x1, read[1] - y1, read[2] - x1, read[3] - y1)
    conv = region_turn.assistant(_box_text(box, size)).user(
        micro_request.format(question=record.question), [crop]
    )
    return Example(task, conv, record.answer, [target, crop_target])


class _EncodeOnly(torch.nn.Module):
    """Stands in for the model inside `PlainHFBackend` when only its encoding is needed."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)


_BACKENDS: dict[int, object] = {}


def encode_example(processor, config, example: Example) -> dict:
    """Input ids, pixel values and labels (reply + end-of-turn tokens) of one example."""
    from df_agent.backends.hf import PlainHFBackend, encode_for_training

    backend = _BACKENDS.get(id(processor))
    if backend is None:
        backend = PlainHFBackend(_EncodeOnly(config), processor, model_id="training")
        _BACKENDS[id(processor)] = backend
    return encode_for_training(backend, example.conversation, example.reply)


def _patch_mask(box, image_size, grid: int) -> torch.Tensor:
    """Patches (row-major) of a square-resized image that the box covers at least 30% of, or its centre."""
    w, h = image_size
    x1, y1, x2, y2 = box
    mask = torch.zeros(grid * grid, dtype=torch.bool)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    for r in range(grid):
        for c in range(grid):
            px1, px2 = c * w / grid, (c + 1) * w / grid
            py1, py2 = r * h / grid, (r + 1) * h / grid
            ix = max(0.0, min(x2, px2) - max(x1, px1))
            iy = max(0.0, min(y2, py2) - max(y1, py1))
            inside = px1 <= cx < px2 and py1 <= cy < py2
            mask[r * grid + c] = inside or ix * iy >= 0.3 * (px2 - px1) * (py2 - py1)
    return mask


def collate(
    encoded: list[dict], examples: list[Example], pad_id: int, image_token_id: int, grid: int, word_ids=None
) -> dict:
    """Right-pad a list of encoded examples into one batch, with attention-target masks."""
    length = max(e["input_ids"].shape[1] for e in encoded)
    n = len(encoded)
    input_ids = torch.full((n, length), pad_id)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    labels = torch.full((n, length), -100)
    key_targets = torch.zeros((n, length), dtype=torch.bool)
    for row, (enc, ex) in enumerate(zip(encoded, examples, strict=True)):
        ids = enc["input_ids"][0]
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(ids)] = enc["labels"][0]
        image_positions = (ids == image_token_id).nonzero().flatten()
        per_image = grid * grid
        for k, (image, target) in enumerate(zip(ex.conversation.images, ex.targets, strict=False)):
            if target is None or len(image_positions) < (k + 1) * per_image:
                continue
            mask = _patch_mask(target, image.size, grid)
            key_targets[row, image_positions[k * per_image : (k + 1) * per_image][mask]] = True
    prompt = (labels == -100) & (attention_mask == 1)
    word_targets = torch.isin(input_ids, torch.tensor(sorted(word_ids or []), dtype=torch.long)) & prompt
    return {
        "image_positions": input_ids == image_token_id,
        "word_targets": word_targets,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": torch.cat([e["pixel_values"] for e in encoded]),
        "labels": labels,
        "key_targets": key_targets,
        "task": torch.tensor([TASKS.index(ex.task) for ex in examples]),
        "image_counts": torch.tensor([len(e["pixel_values"]) for e in encoded]),
    }


def _focusshapes_record(rng: random.Random, scene, qtypes: dict[str, float]):
    """A record of a random question type, and the object it names (None: none, or not there)."""
    from df_agent.data import focusshapes as fs

    kinds, weights = zip(*qtypes.items(), strict=True)
    kind = rng.choices(kinds, weights)[0]
    shapes = [o.shape for o in scene.objects]
    unique = [o for o in scene.objects if shapes.count(o.shape) == 1]
    if kind == "color" and unique:
        obj = rng.choice(unique)
        return fs.color_record(scene, obj), obj
    if kind in ("color", "count"):
        return fs.count_record(scene), None
    if kind == "exist":
        record = fs.exist_record(scene, rng, rng.random() < 0.5)
        named = [o for o in scene.objects if record.question.endswith(f" {o.name}?")]
        return record, (named[0] if named else None)
    obj = rng.choice(scene.objects)
    return fs.detail_record(scene, obj), obj


_RECORDS: dict[str, list] = {}


def lm_batch(cfg: TrainConfig, stage: StageConfig, processor, step: int, config=None) -> dict:
    """Batch `step` of an LM stage: a pure function of (seed, stage name, step)."""
    rng = random.Random(f"lm-batch:{cfg.seed}:{stage.name}:{step}")
    tasks, task_weights = zip(*stage.tasks.items(), strict=True)
    examples = []
    for k in range(stage.batch_size):
        named = None
        if cfg.data == "focusshapes":
            from df_agent.data.focusshapes import render_scene

            scene = render_scene(f"train:{cfg.seed}:{stage.name}:{step}:{k}", n_objects=stage.n_objects)
            qtypes = stage.qtypes or {"detail": 1.0, "color": 0.5, "count": 0.5, "exist": 1.0}
            (record, named), image = _focusshapes_record(rng, scene, qtypes), scene.image
        else:
            from pathlib import Path

            from df_agent.data.format import read_records

            if cfg.data not in _RECORDS:
                _RECORDS[cfg.data] = list(read_records(cfg.data))
            record = rng.choice(_RECORDS[cfg.data])
            image = Image.open(Path(cfg.data).parent / record.image).convert("RGB")
        task = rng.choices(tasks, task_weights)[0]
        answer_box = named.digit_box if stage.attend_digit and named and record.qtype == "detail" else None
        vote_worded = task == "micro" and stage.vote_wording > 0 and rng.random() < stage.vote_wording
        request = VOTE_REQUEST if vote_worded else COMBINE_REQUEST
        example = make_example(record, image, task, rng, stage.box_jitter, answer_box, request)
        if record.qtype == "exist" and named is not None:
            example.targets[0] = named.box  # attend to the object whose existence is asked
        examples.append(example)
    config = config if config is not None else SimpleNamespace(model_type="llava")
    encoded = [encode_example(processor, config, ex) for ex in examples]
    tokenizer = processor.tokenizer
    grid = (
        processor.image_processor.size["height"] // processor.patch_size
        if hasattr(processor, "patch_size")
        else 1
    )
    from df_agent.data.focusshapes import COLORS, SHAPES

    word_ids = {i for i in tokenizer.convert_tokens_to_ids([*COLORS, *SHAPES]) if i != tokenizer.unk_token_id}
    image_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    return collate(encoded, examples, tokenizer.pad_token_id, image_id, grid, word_ids)


def lm_loss(model, batch: dict, stage: StageConfig, probe=None) -> tuple[torch.Tensor, dict]:
    """Cross-entropy on the reply tokens, plus the optional attention and probe supervision.

    With ``stage.length_groups`` > 1 the rows go through the model in groups of similar length
    (less padding, see `length_groups`); each loss is still its mean over the whole batch.
    """
    aux = stage.aux_attention
    groups = length_groups(batch["attention_mask"].sum(1), stage.length_groups)
    whole = len(groups) == 1  # the batch as it is: no copy
    results = [
        (rows, *_loss_terms(model, batch if whole else _rows(batch, rows), stage, probe)) for rows in groups
    ]
    weights = {"attn": aux.weight, "words": aux.weight, "probe": aux.probe_weight} if aux else {}
    loss, parts = None, {}
    for name in ("tokens", "attn", "words", "probe"):
        found = [terms[name] for _, terms, _ in results if name in terms]
        if not found:
            continue
        if len(found) == 1:
            term = found[0][0]
        else:  # the mean over the whole batch, from each group's mean and count
            term = sum(mean * count for mean, count in found) / sum(count for _, count in found)
        if name == "tokens":
            loss = term
        else:
            loss = loss + weights[name] * term
            parts[name] = term.detach()
    per_row = torch.zeros(batch["task"].shape[0])
    for rows, _, row_losses in results:
        per_row[rows] = row_losses
    for index, task in enumerate(TASKS):
        rows = batch["task"] == index
        if rows.any():
            parts[task] = per_row[rows].mean()
    return loss, parts


def length_groups(lengths: torch.Tensor, n: int) -> list[torch.Tensor]:
    """Row indices in at most `n` groups of similar length: the rows sorted by length, cut at the
    n - 1 largest jumps. One group keeps the batch's own order."""
    if n <= 1 or lengths.shape[0] < 2:
        return [torch.arange(lengths.shape[0])]
    order = lengths.argsort(stable=True)
    jumps = lengths[order].diff()
    cuts = sorted(int(i) + 1 for i in jumps.argsort(descending=True, stable=True)[: n - 1] if jumps[i] > 0)
    return [group for group in order.tensor_split(cuts) if group.numel()]


def _rows(batch: dict, rows: torch.Tensor) -> dict:
    """The batch cut to `rows`, and to their longest length; their images with them."""
    length = int(batch["attention_mask"][rows].sum(1).max())
    starts = batch["image_counts"].cumsum(0) - batch["image_counts"]
    images = torch.cat(
        [torch.arange(int(starts[r]), int(starts[r] + batch["image_counts"][r])) for r in rows.tolist()]
    )
    part = {k: v[rows, :length] for k, v in batch.items() if torch.is_tensor(v) and v.dim() == 2}
    part.update(
        task=batch["task"][rows],
        image_counts=batch["image_counts"][rows],
        pixel_values=batch["pixel_values"][images],
    )
    return part


def _loss_terms(model, batch: dict, stage: StageConfig, probe=None) -> tuple[dict, torch.Tensor]:
    """Each loss of one forward pass as (its mean, how many terms it averages), and each row's
    mean reply-token loss (for the log)."""
    aux = stage.aux_attention
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
        output_attentions=aux is not None,
        output_hidden_states=probe is not None,
    )
    logits = out.logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    token_loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(labels.shape)
    valid = labels != -100
    n_valid = valid.sum()
    terms = {"tokens": (token_loss.sum() / n_valid.clamp(min=1), int(n_valid))}
    with torch.no_grad():
        per_row = (token_loss * valid).sum(1) / valid.sum(1).clamp(min=1)
    if aux is not None and aux.weight > 0:
        replies = torch.zeros_like(batch["labels"], dtype=torch.bool)
        replies[:, :-1] = valid  # position t predicts token t + 1
        keys = batch["key_targets"]
        if keys.any():
            terms["attn"] = _attention_nll(out.attentions[aux.layer][:, aux.heads], replies, keys)
        words = batch["word_targets"]
        if aux.word_layer is not None and words.any():
            if aux.word_queries == "image":
                queries = batch["image_positions"] & _after_first_word(words)
            else:
                queries = replies
            terms["words"] = _attention_nll(out.attentions[aux.word_layer][:, aux.word_heads], queries, words)
    if probe is not None:
        patches = batch["image_positions"]
        logits = probe(out.hidden_states[aux.probe_layer][patches]).squeeze(-1)
        target = batch["key_targets"][patches].float()
        terms["probe"] = (
            torch.nn.functional.binary_cross_entropy_with_logits(logits, target),
            int(target.numel()),
        )
    return terms, per_row


def _attention_nll(attn: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean -log(attention mass on `keys`) over the `queries` of rows that have keys, and how many.

    attn: (B, H, T, T); queries, keys: (B, T) booleans.
    """
    attn = attn.float()  # bfloat16 under autocast: the mass and its log in float32
    mass = (attn * keys[:, None, None, :].to(attn.dtype)).sum(-1)  # (B, H, T)
    nll = -torch.log(mass + 1e-6)
    selected = (queries & keys.any(1)[:, None])[:, None, :].expand_as(nll)
    chosen = nll[selected]
    return chosen.mean(), chosen.numel()


def _after_first_word(words: torch.Tensor) -> torch.Tensor:
    """Positions after the first target word of their row (only they can attend to one)."""
    return words.long().cumsum(1) > 0


__all__ = [
    "BOX_REQUEST",
    "COMBINE_REQUEST",
    "VOTE_REQUEST",
    "Example",
    "collate",
    "encode_example",
    "length_groups",
    "lm_batch",
    "lm_loss",
    "make_example",
]
