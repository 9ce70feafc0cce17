"""FocusShapes-HR: the preset, the benchmark's search pass, its report and its CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ScriptedBackend
from PIL import Image

from df_agent.cli import main
from df_agent.data.focusshapes import PRESETS, generate, render_scene
from df_agent.engine import DualFocus
from df_agent.eval import focusshapes
from df_agent.eval.harness import evaluate, read_rows, table


def test_the_hr_preset_draws_usual_objects_on_large_canvases() -> None:
    scenes, records = generate(5, 3, preset="hr")
    for scene in scenes:
        assert scene.size == (1280, 1280) and 4 <= len(scene.objects) <= 8
        for obj in scene.objects:
            x1, y1, x2, y2 = obj.box
            assert 30 <= x2 - x1 <= 64 and 30 <= y2 - y1 <= 64
    assert len(records) == 9 and {r.width for r in records} == {1280}
    # the default preset is the renderer's defaults; options override a preset
    assert render_scene("x").image.tobytes() == render_scene("x", **PRESETS["default"]).image.tobytes()
    small, _ = generate(5, 1, preset="hr", size=640)
    assert small[0].size == (640, 640)
    with pytest.raises(ValueError, match="hr"):
        generate(5, 1, preset="huge")


def test_the_hr_benchmark_asks_each_question_again_in_search_mode(tmp_path: Path) -> None:
    backend = ScriptedBackend(macro="3", box="[0.10,0.10,0.40,0.40]", micro="7", scores={"3": 2.0, "7": 1.0})
    benchmark = focusshapes.benchmark_hr(11, 2)
    assert benchmark.name == "focusshapes-hr" and benchmark.settings["size"] == 1280
    report = evaluate(DualFocus(backend), benchmark, tmp_path / "hr.json", progress=False)
    rows, _ = read_rows(tmp_path / "hr.rows.jsonl")
    assert len(rows) == 6
    for row in rows:
        search = row.passes["search"]
        assert search.mode == "search" and row.predictions["mode.search"] == (search.answer or "")
        if row.category == "detail":  # the scripted scores rank some tile first
            assert search.search.tile is not None and len(search.search.tiles) == 25
            assert search.model_calls == 1 + 4
        assert row.result.mode == "dualfocus"
    for key in ("detail", "global", "exist", "all"):
        assert 0 <= report[key]["mode"]["search"] <= 1
        calls = report[key]["model_calls_per_question"]
        assert calls["macro"] == 1.0
        rows_of = [r for r in rows if key == "all" or r.category == key]
        assert calls["search"] == pytest.approx(
            sum(r.passes["search"].model_calls for r in rows_of) / len(rows_of)
        )
        assert calls["dualfocus"] == pytest.approx(sum(r.result.model_calls for r in rows_of) / len(rows_of))
    assert "mode:search" in table(report).splitlines()[0]
    with Image.open(tmp_path / "hr.png") as png:  # the search pass is a bar of its own colour
        colours = {colour for _, colour in png.convert("RGB").getcolors(maxcolors=1 << 20)}
    assert (0x3A, 0x9D, 0x5D) in colours


def test_cli_eval_focusshapes_hr_prints_the_model_calls(tmp_path: Path, tiny_llava_path, capsys) -> None:
    out = tmp_path / "hr.json"
    args = ["eval", "focusshapes-hr", "--n", "1", "--seed", "3", "--json", str(out), "--quiet"]
    model = ["--model", str(tiny_llava_path), "--device", "cpu", "--max-new-tokens", "4"]
    assert main([*args, *model, "--tile-side", "400", "--overlap", "100"]) == 0
    report = json.loads(out.read_text())
    assert report["benchmark"] == "focusshapes-hr" and report["all"]["n"] == 3
    assert report["settings"]["preset"] == "hr"
    rows, _ = read_rows(tmp_path / "hr.rows.jsonl")
    tiled = [r.passes["search"].search for r in rows if r.passes["search"].search.tiles]
    assert tiled and all(len(s.tiles) == 16 for s in tiled)  # 400 px tiles, overlap >= 100: 4 x 4
    printed = capsys.readouterr().out
    assert "model_calls_per_question all" in printed and "mode:search" in printed
