"""The training recipe: tokenizer, encoding through the chat template, a short run that resumes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from df_agent.backends.base import Conversation
from df_agent.data.focusshapes import generate
from df_agent.train.build import build_model, build_processor, build_tokenizer
from df_agent.train.config import AuxAttention, StageConfig, TrainConfig
from df_agent.train.lm import BOX_REQUEST, COMBINE_REQUEST, encode_example, lm_batch, make_example

TINY = {
    "vision_hidden": 32,
    "vision_layers": 1,
    "vision_heads": 2,
    "text_hidden": 32,
    "text_layers": 2,
    "text_heads": 2,
    "text_intermediate": 64,
}


@pytest.fixture(scope="module")
def processor():
    return build_processor(build_tokenizer())


@pytest.fixture(scope="module")
def data():
    return generate(seed=5, n_scenes=4)


def test_tokenizer_knows_every_prompt_word_and_box(processor, data):
    tok = processor.tokenizer
    _, records = data
    texts = [
        BOX_REQUEST.format(question="What number is on the red circle?"),
        COMBINE_REQUEST.format(question="Is there an orange star?")
        + "\nAnswer the question using a single word or phrase",
        *(r.question for r in records),
        *(r.answer for r in records),
        *(r.box_text() for r in records),
        "[0.00,0.01,0.99,1.00]",
    ]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, text
        assert tok.decode(ids).replace(" ", "") == text.replace(" ", "").replace("\n", "")
    assert len(tok("[0.12,0.34,0.56,0.78]", add_special_tokens=False)["input_ids"]) == 9


def test_prompt_is_prefix_and_labels_cover_reply_and_end(processor, data):
    scenes, records = data
    tok = processor.tokenizer
    from types import SimpleNamespace

    config = SimpleNamespace(model_type="llava")
    for task in ("macro", "region", "micro"):
        ex = make_example(records[0], scenes[0].image, task, random.Random(0), 0.1)
        enc = encode_example(processor, config, ex)
        prompt = processor.apply_chat_template(
            ex.conversation.to_messages(), tokenize=False, add_generation_prompt=True
        )
        prompt_ids = processor(text=prompt, images=ex.conversation.images, return_tensors="pt")["input_ids"][
            0
        ]
        ids, labels = enc["input_ids"][0], enc["labels"][0]
        assert torch.equal(ids[: len(prompt_ids)], prompt_ids)
        assert (labels[: len(prompt_ids)] == -100).all()
        reply_ids = tok(ex.reply, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert labels[len(prompt_ids) :].tolist() == reply_ids
        assert enc["pixel_values"].shape[0] == (2 if task == "micro" else 1)


def test_lm_batch_is_deterministic_and_targets_image_patches(processor):
    cfg = TrainConfig(stages=[StageConfig(name="s", steps=1, batch_size=6)])
    a = lm_batch(cfg, cfg.stages[0], processor, 3)
    b = lm_batch(cfg, cfg.stages[0], processor, 3)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert (a["input_ids"][a["key_targets"]] == image_id).all()


def test_short_run_writes_checkpoint_that_resumes(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from df_agent.train.trainer import train

    cfg = TrainConfig(
        model=TINY,
        num_workers=0,
        checkpoint_every=2,
        stages=[
            StageConfig(name="vision", kind="vision", steps=1, batch_size=2, warmup=1),
            StageConfig(
                name="lm",
                steps=3,
                batch_size=4,
                warmup=1,
                n_objects=(3, 4),
                vision_aux_scenes=1,
                length_groups=2,
                train=["vision_tower", "projector", "language_model"],
                aux_attention=AuxAttention(
                    layer=1, heads=[0], word_layer=0, word_queries="image", probe_layer=1
                ),
            ),
        ],
    )
    lines = []
    assert train(cfg, tmp_path, log=lines.append, stop_after=3) is None  # vision 1 + lm 2, then stop
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert (state["stage"], state["step"]) == (1, 2)
    assert state["probe"]["weight"].shape == (1, TINY["text_hidden"])  # the probe resumes too
    final = train(cfg, tmp_path, resume=True, log=lines.append)
    assert any("resumed at stage 1 step 2" in line for line in lines)
    history = (tmp_path / "history.jsonl").read_text()
    assert "NaN" not in history
    model = AutoModelForImageTextToText.from_pretrained(final)
    proc = AutoProcessor.from_pretrained(final)
    conv = Conversation().user("How many objects are there?", [generate(1, 1)[0][0].image])
    text = proc.apply_chat_template(conv.to_messages(), tokenize=False, add_generation_prompt=True)
    out = model(**proc(text=text, images=conv.images, return_tensors="pt"))
    assert torch.isfinite(out.logits).all()


def test_tiny_model_loss_is_finite(processor):
    from df_agent.train.lm import lm_loss

    model = build_model(processor.tokenizer, TINY)
    model.set_attn_implementation("eager")
    stage = StageConfig(name="s", steps=1, batch_size=3, aux_attention=AuxAttention(layer=1))
    batch = lm_batch(TrainConfig(stages=[stage]), stage, processor, 0)
    loss, parts = lm_loss(model, batch, stage)
    loss.backward()
    assert torch.isfinite(loss) and "attn" in parts


def test_question_comes_before_its_images(processor):
    """Each patch must be able to attend to the question (causal attention looks back only)."""
    conv = Conversation().user("What number is on the red circle?", [generate(1, 1)[0][0].image])
    text = processor.apply_chat_template(conv.to_messages(), tokenize=False, add_generation_prompt=True)
    assert text.index("circle?") < text.index("<image>") < text.index("ASSISTANT:")


def test_probe_and_patch_word_attention_are_supervised(processor):
    from df_agent.train.lm import lm_loss

    model = build_model(processor.tokenizer, TINY)
    model.set_attn_implementation("eager")
    aux = AuxAttention(layer=1, word_layer=0, word_queries="image", probe_layer=1)
    stage = StageConfig(name="s", steps=1, batch_size=6, aux_attention=aux, qtypes={"detail": 1.0})
    batch = lm_batch(TrainConfig(stages=[stage]), stage, processor, 0)
    assert batch["key_targets"].any() and (batch["key_targets"] <= batch["image_positions"]).all()
    probe = torch.nn.Linear(TINY["text_hidden"], 1)
    loss, parts = lm_loss(model, batch, stage, probe)
    loss.backward()
    assert {"attn", "words", "probe"} <= parts.keys() and torch.isfinite(loss)
    assert probe.weight.grad is not None and probe.weight.grad.abs().sum() > 0


def test_attend_digit_points_micro_digit_replies_at_the_glyph(processor):
    common = {"name": "s", "steps": 1, "batch_size": 8, "tasks": {"micro": 1.0}, "qtypes": {"detail": 1.0}}
    whole = StageConfig(**common)
    glyph = StageConfig(**common, attend_digit=True)
    a = lm_batch(TrainConfig(stages=[whole]), whole, processor, 0)
    b = lm_batch(TrainConfig(stages=[glyph]), glyph, processor, 0)
    assert torch.equal(a["input_ids"], b["input_ids"])  # the same conversations, other targets
    crop = torch.zeros_like(a["image_positions"])
    for row, positions in enumerate(a["image_positions"]):
        crop[row, positions.nonzero().flatten()[64:]] = True  # the second image of each row: the crop
    on_object, on_glyph = (a["key_targets"] & crop).sum(1), (b["key_targets"] & crop).sum(1)
    assert (on_glyph >= 1).all() and (on_glyph < on_object).all()


def test_train_time_bench_times_every_stage(tmp_path, capsys):
    """bench/train_time.py runs each stage through the trainer and sums steps x steady seconds per step."""
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "train_time", Path(__file__).parent.parent / "bench" / "train_time.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = TrainConfig(
        model=TINY,
        num_workers=0,
        stages=[
            StageConfig(name="vision", kind="vision", steps=400, batch_size=1, warmup=1, crops_per_scene=1),
            StageConfig(name="lm", steps=900, batch_size=2, warmup=1, n_objects=(3, 3)),
        ],
    )
    config = tmp_path / "cfg.json"
    config.write_text(cfg.model_dump_json())
    assert bench.main(["--config", str(config), "--steps", "75", "--warmup", "25"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    stages = figures["stages"]
    assert [stages[name]["steps"] for name in ("vision", "lm")] == [400, 900]
    assert all(stage["seconds_per_step"] > 0 for stage in stages.values())
    total = sum(stage["steps"] * stage["seconds_per_step"] for stage in stages.values()) / 60
    assert figures["estimated_minutes"] == pytest.approx(total, abs=0.05)
    history = tmp_path / "history.jsonl"
    history.write_text('{"step": 25, "time": 1.0}\n')
    with pytest.raises(ValueError, match="too few steps"):
        bench.steady_seconds_per_step(history, 25)


def test_length_groups_cut_sorted_rows_at_the_largest_jumps():
    from df_agent.train.lm import length_groups

    lengths = torch.tensor([5, 100, 6, 98, 50])
    assert [g.tolist() for g in length_groups(lengths, 1)] == [[0, 1, 2, 3, 4]]
    assert [g.tolist() for g in length_groups(lengths, 2)] == [[0, 2, 4], [3, 1]]
    assert [g.tolist() for g in length_groups(lengths, 3)] == [[0, 2], [4], [3, 1]]
    assert [g.tolist() for g in length_groups(torch.tensor([7, 7, 7]), 2)] == [[0, 1, 2]]


CONFIGS = Path(__file__).resolve().parents[1] / "df_agent" / "train" / "configs"


@pytest.mark.parametrize("name", sorted(path.name for path in CONFIGS.glob("*.yaml")))
def test_packaged_configs_validate_and_build_the_shipped_architecture(name):
    from df_agent.train.config import load_config

    cfg = load_config(CONFIGS / name)
    names = [stage.name for stage in cfg.stages]
    assert len(names) == len(set(names))  # batches are seeded by stage name
    assert [s.kind for s in cfg.stages[:2]] == ["vision", "vision"] and cfg.init == "scratch"
    assert cfg.model["text_hidden"] == 192 and all(s.steps > 0 for s in cfg.stages)


def test_bf16_precision_runs_the_forward_in_bfloat16_and_keeps_float32_weights(tmp_path, processor):
    from df_agent.train.lm import lm_loss
    from df_agent.train.trainer import train

    model = build_model(processor.tokenizer, TINY)
    model.set_attn_implementation("eager")
    aux = AuxAttention(layer=1, word_layer=0, word_queries="image", probe_layer=1)
    stage = StageConfig(name="s", steps=1, batch_size=4, aux_attention=aux)
    batch = lm_batch(TrainConfig(stages=[stage]), stage, processor, 0)
    probe = torch.nn.Linear(TINY["text_hidden"], 1)
    full, full_parts = lm_loss(model, batch, stage, probe)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half, half_parts = lm_loss(model, batch, stage, probe)
    assert half.dtype == torch.float32 and half != full  # a float32 loss from bfloat16 products
    for key in ("attn", "words", "probe"):
        assert torch.isclose(half_parts[key], full_parts[key], rtol=0.05), key

    cfg = TrainConfig(
        model=TINY,
        num_workers=0,
        precision="bf16",
        stages=[
            StageConfig(name="vision", kind="vision", steps=1, batch_size=2, warmup=1),
            stage.model_copy(update={"steps": 2, "warmup": 1, "vision_aux_scenes": 1}),
        ],
    )
    final = train(cfg, tmp_path, log=lambda line: None)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"]
    assert all(tensor.dtype == torch.float32 for tensor in state.values() if tensor.is_floating_point())
    assert "NaN" not in (tmp_path / "history.jsonl").read_text() and (final / "config.json").exists()
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp16", stages=[stage])


def test_length_groups_give_the_losses_and_gradients_of_one_pass(processor):
    """Rows run in groups of similar length: every loss is still its mean over the whole batch."""
    from df_agent.train.lm import lm_loss

    model = build_model(processor.tokenizer, TINY)
    model.set_attn_implementation("eager")
    aux = AuxAttention(layer=1, word_layer=0, word_queries="image", probe_layer=1)
    stage = StageConfig(name="s", steps=1, batch_size=8, aux_attention=aux)
    batch = lm_batch(TrainConfig(stages=[stage]), stage, processor, 0)
    assert batch["image_counts"].tolist().count(2) and batch["image_counts"].tolist().count(1)  # micro + not
    probe = torch.nn.Linear(TINY["text_hidden"], 1)
    results = []
    for groups in (1, 3):
        model.zero_grad(), probe.zero_grad()
        loss, parts = lm_loss(model, batch, stage.model_copy(update={"length_groups": groups}), probe)
        loss.backward()
        grads = [p.grad.clone() for p in [*model.parameters(), *probe.parameters()] if p.grad is not None]
        results.append((loss.detach(), parts, grads))
    (one, parts_one, grads_one), (grouped, parts_grouped, grads_grouped) = results
    assert torch.allclose(one, grouped, rtol=1e-5)
    assert parts_one.keys() == parts_grouped.keys() >= {"attn", "words", "probe", "macro", "region", "micro"}
    for key in parts_one:
        assert torch.allclose(parts_one[key], parts_grouped[key], rtol=1e-4, atol=1e-6), key
    assert len(grads_one) == len(grads_grouped)
    for a, b in zip(grads_one, grads_grouped, strict=True):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-6)


def test_vote_wording_trains_micro_turns_in_the_official_votes_context(processor):
    """The official vote scores answers in the micro turn with the short-answer hint added."""
    from df_agent.prompt_sets import load_prompts

    hint = load_prompts("dualfocus").score.split("{question}")[1].strip()
    stage = StageConfig(name="s", steps=1, batch_size=8, tasks={"micro": 1.0, "macro": 1.0})
    texts = {}
    for share in (0.0, 1.0):
        varied = stage.model_copy(update={"vote_wording": share})
        batch = lm_batch(TrainConfig(stages=[varied]), varied, processor, 0)
        texts[share] = [
            (task, processor.tokenizer.decode(ids[ids != processor.tokenizer.pad_token_id]))
            for task, ids in zip(batch["task"].tolist(), batch["input_ids"], strict=True)
        ]
    micro = 2  # TASKS index
    assert any(task == micro for task, _ in texts[1.0]) and any(task != micro for task, _ in texts[1.0])
    for task, text in texts[1.0]:
        assert (hint in text) == (task == micro), text
    assert not any(hint in text for _, text in texts[0.0])


def test_shape_weight_scales_only_the_per_patch_shape_loss(processor):
    from df_agent.train.vision import VisionHeads, patch_features, vision_batch

    model = build_model(processor.tokenizer, TINY)
    batch = vision_batch("shape-weight", 2, processor)
    with torch.no_grad():
        feats = patch_features(model, batch["pixel_values"])
    torch.manual_seed(0)
    plain = VisionHeads(feats.shape[-1])
    torch.manual_seed(0)
    heavy = VisionHeads(feats.shape[-1], shape_weight=4.0)
    (total, parts), (heavy_total, heavy_parts) = plain(feats, batch["labels"]), heavy(feats, batch["labels"])
    assert torch.equal(parts["shape"], heavy_parts["shape"]) and parts["shape"] > 0
    assert torch.allclose(heavy_total - total, 3 * parts["shape"])
    assert StageConfig(name="s", steps=1).shape_weight == 1.0


def test_training_check_runs_the_engine_and_keeps_its_keys() -> None:
    from df_agent.backends.hf import shipped_model_path
    from df_agent.train.evaluate import evaluate

    try:
        path = shipped_model_path()
    except FileNotFoundError:
        pytest.skip("the shipped model is not in df_agent/model/")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path)
    figures = evaluate(model, AutoProcessor.from_pretrained(path), n_scenes=4, seed=5)
    for qtype in ("detail", "global", "exist"):
        for key in ("macro", "micro_true", "dualfocus", "oracle"):
            assert 0.0 <= figures[f"{key}_{qtype}"] <= 1.0
    assert {"dualfocus_all", "oracle_all", "unparseable", "iou_detail"} <= set(figures)
    assert figures["oracle_all"] >= figures["dualfocus_all"]
    assert len(figures["examples"]) == 6 and {"q", "a", "macro", "box", "final"} <= set(
        figures["examples"][0]
    )
