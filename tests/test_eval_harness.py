"""The benchmark runner on a scripted backend: figures, resume, limit, workers, files; and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ScriptedBackend
from PIL import Image, ImageDraw

from df_agent import Box, DualFocus
from df_agent.backends.base import Conversation
from df_agent.cli import main
from df_agent.eval import focusshapes, jsonl, pope, vstar
from df_agent.eval.harness import PLOTTED, Benchmark, EvalItemError, evaluate, figure, read_rows, run, table
from df_agent.eval.items import EvalItem, exact_match

TARGET = Box(x1=80, y1=60, x2=160, y2=120)  # what "[0.25,0.25,0.50,0.50]" reads as on a 320x240 image
# question -> (gold, macro answer, box text, micro answer, winner of the official vote)
SCRIPT = {
    "q1": ("red", "red", "[0.25,0.25,0.50,0.50]", "blue", "red"),  # vote keeps the right macro answer
    "q2": ("blue", "red", "[0.25,0.25,0.50,0.50]", "blue", "blue"),  # vote fixes it: wrong -> right
    "q3": ("green", "green", "[0.25,0.25,0.50,0.50]", "pink", "pink"),  # vote breaks it: right -> wrong
    "q4": ("cat", "cat", "[0.25,0.25,0.50,0.50]", "Cat.", None),  # the two agree: no vote
    "q5": ("dog", "fish", "I cannot tell", "n/a", None),  # no box: the macro answer stands
}


class QuestionBackend(ScriptedBackend):
    """Replies and scores per question: the official vote as SCRIPT says, own_context always macro,
    average always micro."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str] = []

    @staticmethod
    def question_of(conversation: Conversation) -> str:
        return next(q for q in SCRIPT if q in conversation.turns[-1].text)

    def generate(self, conversation: Conversation, max_new_tokens: int = 128) -> str:
        step, q = self.step_of(conversation), self.question_of(conversation)
        self.generated.append((step, conversation))
        if step == "macro":
            self.asked.append(q)
        _, macro, box, micro, _ = SCRIPT[q]
        return {"macro": macro, "locate": box, "micro": micro}[step]

    def score(self, conversation: Conversation, candidates) -> list[float]:
        self.scored.append((conversation, list(candidates)))
        q = self.question_of(conversation)
        _, macro, _, micro, official = SCRIPT[q]
        text = conversation.turns[-1].text
        if text.endswith("single word or phrase"):  # the official scoring context
            best = official
        elif text.startswith("Please combine") or len(candidates) == 1:  # own_context: each in its own
            best = macro
        else:  # the macro context, average: a strong preference for micro outweighs the official one
            return [0.1 if c == micro else 2.5 for c in candidates]
        return [0.5 if c == best else 1.5 for c in candidates]


@pytest.fixture
def picture() -> Image.Image:
    image = Image.new("RGB", (320, 240), (235, 235, 230))
    ImageDraw.Draw(image).rectangle((80, 60, 160, 120), fill=(220, 30, 30))
    return image


def scripted_benchmark(picture: Image.Image) -> Benchmark:
    items = [
        EvalItem(
            id=q,
            image=picture,
            question=f"What is {q}?",
            answers=[gold],
            category="a" if q in ("q1", "q2") else "b",
            target_box=Box(x1=80, y1=60, x2=120, y2=120) if q == "q2" else TARGET,
        )
        for q, (gold, *_) in SCRIPT.items()
    ]
    return Benchmark(name="scripted", items=items, judge=exact_match, compare_arbitration=True)


def test_one_pass_gives_every_path_the_oracle_the_votes_and_the_boxes(picture, tmp_path: Path) -> None:
    backend = QuestionBackend()
    report = evaluate(
        DualFocus(backend, min_side=0), scripted_benchmark(picture), tmp_path / "r.json", progress=False
    )
    # one DualFocus pass per question: three generations where a box was read, two where none was
    assert [step for step, _ in backend.generated].count("macro") == 5
    assert [step for step, _ in backend.generated].count("micro") == 4
    every = report["all"]
    assert every["n"] == 5
    assert every["macro"] == pytest.approx(3 / 5)  # q1 q3 q4
    assert every["micro"] == pytest.approx(2 / 5)  # q2 q4 ("Cat." matches "cat"); q5 falls back to macro
    assert every["dualfocus"] == pytest.approx(3 / 5)  # q1 q2 q4
    assert every["oracle"] == pytest.approx(4 / 5)
    assert every["arbitration"] == pytest.approx({"official": 3 / 5, "own_context": 3 / 5, "average": 2 / 5})
    assert every["picked"] == {"macro": 3, "micro": 2}
    assert every["votes"] == {"n": 3, "macro": 1, "micro": 2}
    assert every["vote_changes"] == {"wrong_to_right": 1, "right_to_wrong": 1}
    assert every["box_parse_failure_rate"] == pytest.approx(1 / 5)
    assert every["mean_iou"] == pytest.approx((1 + 0.5 + 1 + 1 + 0) / 5)
    assert every["seconds_per_question"] > 0
    assert report["categories"] == ["a", "b"]
    assert (report["a"]["n"], report["a"]["macro"], report["a"]["dualfocus"]) == (2, 0.5, 1.0)
    assert report["b"]["dualfocus"] == pytest.approx(1 / 3) and report["b"]["oracle"] == pytest.approx(2 / 3)
    assert report["box_parse_failure_rate"] == pytest.approx(0.2)
    # the files: report, one row per question, and the plot
    assert json.loads((tmp_path / "r.json").read_text()) == report
    rows, damaged = read_rows(tmp_path / "r.rows.jsonl")
    assert [row.id for row in rows] == list(SCRIPT) and not damaged
    assert rows[4].box_failed and rows[4].result.fallback.startswith("no box")
    assert rows[1].predictions["dualfocus"] == "blue" and rows[1].result.scores is not None
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_other_arbitration_methods_rescore_without_generating_again(picture, tmp_path: Path) -> None:
    backend = QuestionBackend()
    run(DualFocus(backend), scripted_benchmark(picture), tmp_path / "rows.jsonl", progress=False)
    generations = len(backend.generated)
    assert generations == 5 + 5 + 4  # macro and locate for each, micro where a box was read
    # 3 votes ran (official), and each was re-scored by own_context (2 calls) and average (2 calls)
    assert len(backend.scored) == 3 * (1 + 2 + 2)


def test_the_plot_shows_macro_only_and_dualfocus_per_category(picture, tmp_path: Path) -> None:
    report = evaluate(
        DualFocus(QuestionBackend()), scripted_benchmark(picture), tmp_path / "r.json", progress=False
    )
    fig = figure(report)
    axes = fig.axes[0]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]  # outside the axes, clear of the bars
    assert sorted(legend) == sorted(["macro-only", "micro-only", "DualFocus", "best-of-two oracle"])
    heights = [bar.get_height() for container in axes.containers for bar in container]
    groups = ["a", "b", "all"]
    expected = [report[g][key] for key in ("macro", "micro", "dualfocus", "oracle") for g in groups]
    assert heights == pytest.approx(expected)
    assert [t.get_text().split("\n")[0] for t in axes.get_xticklabels()] == groups


def test_limit_then_resume_evaluates_each_question_once(picture, tmp_path: Path) -> None:
    rows_path = tmp_path / "rows.jsonl"
    first = QuestionBackend()
    rows = run(DualFocus(first), scripted_benchmark(picture), rows_path, limit=2, progress=False)
    assert [row.id for row in rows] == ["q1", "q2"] and first.asked == ["q1", "q2"]
    with pytest.raises(FileExistsError, match="--resume"):
        run(DualFocus(QuestionBackend()), scripted_benchmark(picture), rows_path, progress=False)
    with rows_path.open("a") as f:  # a crash in the middle of writing a row
        f.write('{"id": "q3", "category": "b", "gold": ["gr')
    second = QuestionBackend()
    rows = run(DualFocus(second), scripted_benchmark(picture), rows_path, resume=True, progress=False)
    assert second.asked == ["q3", "q4", "q5"]
    assert [row.id for row in rows] == list(SCRIPT)
    kept, damaged = read_rows(rows_path)
    assert [row.id for row in kept] == list(SCRIPT) and not damaged
    third = QuestionBackend()
    run(DualFocus(third), scripted_benchmark(picture), rows_path, overwrite=True, limit=1, progress=False)
    assert third.asked == ["q1"] and len(read_rows(rows_path)[0]) == 1


def test_workers_give_the_same_rows(picture, tmp_path: Path) -> None:
    one = run(DualFocus(QuestionBackend()), scripted_benchmark(picture), tmp_path / "1.jsonl", progress=False)
    four = run(
        DualFocus(QuestionBackend()),
        scripted_benchmark(picture),
        tmp_path / "4.jsonl",
        workers=4,
        progress=False,
    )
    assert [(r.id, r.predictions, r.correct) for r in one] == [(r.id, r.predictions, r.correct) for r in four]
    assert len((tmp_path / "4.jsonl").read_text().splitlines()) == 5


def test_a_broken_question_is_named_and_earlier_rows_are_kept(picture, tmp_path: Path) -> None:
    bench = scripted_benchmark(picture)
    bench.items[2] = bench.items[2].model_copy(update={"image": str(tmp_path / "missing.png")})
    with pytest.raises(EvalItemError, match=r"question 'q3': image file .*missing.png' not found"):
        run(DualFocus(QuestionBackend()), bench, tmp_path / "rows.jsonl", progress=False)
    assert [row.id for row in read_rows(tmp_path / "rows.jsonl")[0]] == ["q1", "q2"]


def test_focusshapes_report_has_the_issue_keys(tmp_path: Path) -> None:
    backend = ScriptedBackend(
        macro="3", box="[0.10,0.10,0.40,0.40]", micro="yes", scores={"3": 2.0, "yes": 1.0}
    )
    report = evaluate(DualFocus(backend), focusshapes.benchmark(11, 4), tmp_path / "fs.json", progress=False)
    for key in ("detail", "global", "exist", "all"):
        assert {"n", "dualfocus", "macro", "micro", "oracle"} <= set(report[key])
        assert set(report[key]["arbitration"]) == {"official", "own_context", "average"}
        assert all(0 <= report[key][m] <= 1 for m in ("dualfocus", "macro", "micro", "oracle"))
    assert report["all"]["n"] == 12 and report["detail"]["n"] == report["exist"]["n"] == 4
    assert 0 <= report["box_parse_failure_rate"] <= 1
    assert 0 < report["mean_iou_detail"] <= 1  # a fixed box overlaps some of the objects
    # every exist answer is "yes" from the micro path: right on exactly the balanced half
    assert report["exist"]["micro"] == 0.5
    rows, _ = read_rows(tmp_path / "fs.rows.jsonl")
    assert rows[0].image == "images/11-00000.png"


def test_focusshapes_lookalikes_say_which_object_the_model_took_for_the_one_asked(tmp_path: Path) -> None:
    from df_agent.data.focusshapes import generate

    backend = ScriptedBackend(macro="3", box="[0.10,0.10,0.40,0.40]", micro="yes", scores={"3": 2.0})
    report = evaluate(DualFocus(backend), focusshapes.benchmark(11, 20), tmp_path / "fs.json", progress=False)
    found = report["lookalikes"]
    assert sum(found["detail_box_on"].values()) == 20
    # "3" or "yes" on every question: wrong on all ten absent objects, never a colour in the scene
    assert sum(group["n"] for group in found["exist_no"].values()) == 10
    assert all(group["dualfocus"] == 0.0 for group in found["exist_no"].values())
    assert set(found["color_answer"]) == {"no_object"}

    scenes, records = generate(11, 20)
    scene_of = {f"images/{scene.id}.png": scene for scene in scenes}
    record_of = {record.id: record for record in records}
    rows, _ = read_rows(tmp_path / "fs.rows.jsonl")

    def named(row):
        return next(o for o in scene_of[row.image].objects if f"the {o.name}?" in record_of[row.id].question)

    def twins(row):
        return [o for o in scene_of[row.image].objects if o.color == named(row).color and o is not named(row)]

    row = next(r for r in rows if r.category == "detail" and twins(r))
    boxes = [Box(x1=o.box[0], y1=o.box[1], x2=o.box[2], y2=o.box[3]) for o in (named(row), twins(row)[0])]
    boxes += [Box(x1=0, y1=0, x2=2, y2=2), None]
    cases = [row.model_copy(update={"result": row.result.model_copy(update={"box": box})}) for box in boxes]
    assert focusshapes.lookalikes(cases, scene_of)["detail_box_on"] == {
        "target": 1, "same_color": 1, "background": 1, "no_box": 1
    }  # fmt: skip


def test_jsonl_benchmark_reads_relative_images_options_and_boxes(tmp_path: Path, picture) -> None:
    picture.save(tmp_path / "p.png")
    lines = [
        {
            "image": "p.png",
            "question": "Colour?",
            "answer": "Red",
            "qtype": "global",
            "box": [80, 60, 160, 120],
        },
        {"id": "mc", "image": "p.png", "question": "Which?", "answer": "blue", "options": ["red", "blue"]},
    ]
    (tmp_path / "qs.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    first, second = jsonl.read_jsonl(tmp_path / "qs.jsonl")
    assert (first.id, first.image, first.category, first.target_box) == (
        "qs-1",
        str(tmp_path / "p.png"),
        "global",
        TARGET,
    )
    assert exact_match("red.", first) == 1.0 and exact_match("dark red", first) == 0.0
    assert exact_match("B", second) == 1.0 and exact_match("A", second) == 0.0
    (tmp_path / "bad.jsonl").write_text('{"image": "p.png", "answer": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not a valid question line: question: Field required"):
        jsonl.read_jsonl(tmp_path / "bad.jsonl")


def test_multiple_choice_paths_are_judged_as_letters(tmp_path: Path, picture) -> None:
    item = EvalItem(id="mc", image=picture, question="Which colour?", answers=["A"], options=["red", "blue"])
    backend = ScriptedBackend(macro="A. red", micro="(B)", scores={"red": 0.2, "blue": 0.9})
    bench = Benchmark("mc", [item], exact_match, compare_arbitration=True)
    [row] = run(DualFocus(backend), bench, tmp_path / "r.jsonl", progress=False)
    assert row.predictions == {
        "macro": "A", "micro": "B", "dualfocus": "A",
        "arbitration.official": "A", "arbitration.own_context": "A", "arbitration.average": "A",
    }  # fmt: skip
    assert backend.scored[0][1] == ["red", "blue"]  # the vote ran on the options' texts


def test_pope_reports_its_metrics_per_split(tmp_path: Path, picture) -> None:
    picture.save(tmp_path / "COCO_1.jpg")
    for split, label in (("random", "yes"), ("popular", "no")):
        line = {"question_id": 1, "image": "COCO_1.jpg", "text": "Is there a dog?", "label": label}
        (tmp_path / f"coco_pope_{split}.json").write_text(json.dumps(line) + "\n")
    files = [tmp_path / "coco_pope_random.json", tmp_path / "coco_pope_popular.json"]
    backend = ScriptedBackend(macro="No, there is not.", micro="Yes.", scores={"Yes.": 0.1})
    report = evaluate(
        DualFocus(backend), pope.benchmark(files, tmp_path), tmp_path / "pope.json", progress=False
    )
    assert report["categories"] == ["random", "popular"]
    assert report["pope"]["random"]["dualfocus"]["accuracy"] == 1.0  # the vote says yes: right on random
    assert report["pope"]["random"]["macro"]["accuracy"] == 0.0
    assert report["pope"]["popular"]["macro"]["accuracy"] == 1.0
    assert report["pope"]["popular"]["dualfocus"]["yes_ratio"] == 1.0


def write_vstar(root: Path, picture: Image.Image) -> None:
    for category, name in (("direct_attributes", "sa_1"), ("relative_position", "sa_2")):
        (root / category).mkdir(parents=True)
        picture.save(root / category / f"{name}.jpg")
        annotation = {
            "target_object": ["cup"], "bbox": [[80, 60, 40, 30], [100, 100, 60, 20]],
            "question": f"What colour is the cup in {name}?", "options": ["red", "blue", "green", "white"],
        }  # fmt: skip
        (root / category / f"{name}.json").write_text(json.dumps(annotation))


def test_vstar_reads_the_annotations_and_shuffles_options_reproducibly(tmp_path: Path, picture) -> None:
    write_vstar(tmp_path, picture)
    items = vstar.read_bench(tmp_path)
    assert [i.category for i in items] == list(vstar.CATEGORIES)
    for item in items:
        assert sorted(item.options) == ["blue", "green", "red", "white"]
        assert item.options["ABCD".index(item.answers[0])] == "red"  # the first option is the right one
        assert item.target_box == Box(x1=80, y1=60, x2=160, y2=120)  # union of the [x, y, w, h] boxes
    assert [i.options for i in vstar.read_bench(tmp_path)] == [i.options for i in items]
    (tmp_path / "relative_position" / "sa_2.json").write_text("{}")
    with pytest.raises(ValueError, match=r"sa_2.json: not a V\* annotation"):
        vstar.read_bench(tmp_path)


def test_vstar_scores_options_by_loss_in_each_context_from_the_same_pass(tmp_path: Path, picture) -> None:
    write_vstar(tmp_path, picture)

    def loss(conversation: Conversation, candidate: str) -> float:
        text = conversation.turns[-1].text
        if text.endswith("single word or phrase"):  # the [full, crop] scoring context: prefers "red"
            return {"red": 0.1, "blue": 0.4}.get(candidate, 2.0)
        return {"blue": 0.2, "red": 0.3}.get(candidate, 2.0)  # the whole image: prefers "blue"

    backend = ScriptedBackend(macro="A", micro="A", scores=loss)
    report = evaluate(DualFocus(backend), vstar.benchmark(tmp_path), tmp_path / "v.json", progress=False)
    assert report["all"]["loss"] == {"macro": 0.0, "micro": 1.0, "dualfocus": 1.0}
    macro_context = [conv for conv, cands in backend.scored if len(cands) == 4 and len(conv.turns) == 1]
    assert len(macro_context) == 2 and "Answer with the option" not in macro_context[0].turns[0].text
    assert report["settings"]["official_scoring"] == "loss"
    header, *_, every = table(report).splitlines()
    assert header.split()[-3:] == ["loss:macro", "loss:micro", "loss:dualfocus"]  # whole names
    assert every.split()[-3:] == ["0.000", "1.000", "1.000"]


PLOTTED_RGB = {key: tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5)) for key, _, colour in PLOTTED}


def shipped_model_exists() -> bool:
    from df_agent.backends.hf import shipped_model_path

    try:
        shipped_model_path()
    except FileNotFoundError:
        return False
    return True


@pytest.mark.slow
def test_cli_eval_focusshapes_writes_the_json_and_a_plot_of_both_modes(
    tmp_path: Path, tiny_llava_path, capsys
) -> None:
    # On the shipped model when it is there; a tiny random model (short answers) until then.
    model = [] if shipped_model_exists() else ["--model", str(tiny_llava_path), "--max-new-tokens", "4"]
    out = tmp_path / "fs.json"
    code = main(
        ["eval", "focusshapes", "--n", "100", "--json", str(out), "--device", "cpu", "--quiet", *model]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert report["all"]["n"] == 300 and report["settings"]["seed"] == 987654
    for key in ("detail", "global", "exist", "all"):
        assert {"n", "dualfocus", "macro", "micro", "oracle"} <= set(report[key])
    assert {"box_parse_failure_rate", "mean_iou_detail"} <= set(report)
    plot = Path(report["files"]["plot"])
    assert plot == tmp_path / "fs.png" and plot.read_bytes()[:4] == b"\x89PNG"
    with Image.open(plot) as png:  # both modes' colours are drawn (bars, and the legend's patches)
        colours = {colour for _, colour in png.convert("RGB").getcolors(maxcolors=1 << 20)}
    assert {PLOTTED_RGB["macro"], PLOTTED_RGB["dualfocus"]} <= colours
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split()[:6] == ["category", "n", "macro", "micro", "DF", "oracle"]
    assert "mean_iou_detail" in printed


def test_cli_eval_jsonl_with_resume(tmp_path: Path, tiny_llava_path, picture, capsys) -> None:
    picture.save(tmp_path / "p.png")
    lines = [{"image": "p.png", "question": f"What is {q}?", "answer": "red"} for q in ("this", "that")]
    (tmp_path / "qs.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    common = ["--model", str(tiny_llava_path), "--max-new-tokens", "2", "--device", "cpu", "--quiet"]
    out = tmp_path / "r.json"
    assert (
        main(
            [
                "eval",
                "jsonl",
                "--questions",
                str(tmp_path / "qs.jsonl"),
                "--json",
                str(out),
                "--limit",
                "1",
                *common,
            ]
        )
        == 0
    )
    assert json.loads(out.read_text())["n"] == 1
    assert (
        main(["eval", "jsonl", "--questions", str(tmp_path / "qs.jsonl"), "--json", str(out), *common]) == 2
    )
    assert "--resume" in capsys.readouterr().err
    assert (
        main(
            [
                "eval",
                "jsonl",
                "--questions",
                str(tmp_path / "qs.jsonl"),
                "--json",
                str(out),
                "--resume",
                *common,
            ]
        )
        == 0
    )
    assert json.loads(out.read_text())["n"] == 2
    assert len((tmp_path / "r.rows.jsonl").read_text().splitlines()) == 2


def test_cli_eval_a_served_model_with_concurrent_workers(tmp_path: Path, tiny_llava_backend, picture) -> None:
    from openai_server import VLLMTestServer

    picture.save(tmp_path / "p.png")
    lines = [{"image": "p.png", "question": f"What is shape {k}?", "answer": "red"} for k in range(4)]
    (tmp_path / "qs.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    out = tmp_path / "served.json"
    with VLLMTestServer(tiny_llava_backend) as server:
        argv = ["eval", "jsonl", "--questions", str(tmp_path / "qs.jsonl"), "--json", str(out), "--quiet"]
        argv += [
            "--server",
            server.url,
            "--served-model",
            "df-test",
            "--workers",
            "3",
            "--max-new-tokens",
            "2",
        ]
        assert main(argv) == 0
        chats = [r for r in server.records if r.path.endswith("/chat/completions")]
    report = json.loads(out.read_text())
    assert report["model"] == "df-test" and report["n"] == 4
    assert len(chats) >= 4 * 2  # at least a macro answer and a box request per question
    assert (
        main(
            [
                "eval",
                "jsonl",
                "--questions",
                str(tmp_path / "qs.jsonl"),
                "--server",
                "http://x",
                "--model",
                "m",
            ]
        )
        == 2
    )


def test_cli_eval_through_langchain_finds_the_served_model_and_fails_clearly_on_a_wrong_one(
    tmp_path: Path, tiny_llava_backend, picture, capsys
) -> None:
    from openai_server import OpenAITestServer

    picture.save(tmp_path / "p.png")
    lines = [{"image": "p.png", "question": f"What is shape {k}?", "answer": "red"} for k in range(2)]
    (tmp_path / "qs.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    out = tmp_path / "served.json"
    argv = ["eval", "jsonl", "--questions", str(tmp_path / "qs.jsonl"), "--json", str(out), "--quiet"]
    argv += ["--server-client", "langchain", "--capabilities", "hosted", "--max-new-tokens", "2"]
    with OpenAITestServer(tiny_llava_backend, profile="hosted") as server:
        assert main([*argv, "--server", server.url]) == 0  # no --served-model: the first listed
        chats = [r.body for r in server.records if r.path.endswith("/chat/completions")]
        assert {body["model"] for body in chats} == {"df-test"} and len(chats) >= 2 * 2
        assert json.loads(out.read_text())["n"] == 2
        capsys.readouterr()
        wrong = [*argv, "--server", server.url, "--served-model", "nope", "--overwrite"]
        assert main(wrong) != 0
    err = capsys.readouterr().err
    assert "nope" in err and "does not exist" in err and "Traceback" not in err


def test_cli_eval_pope_prints_the_official_metrics_per_split(
    tmp_path: Path, tiny_llava_path, picture, capsys
) -> None:
    picture.save(tmp_path / "COCO_1.jpg")
    questions = tmp_path / "coco_pope_random.json"
    line = {"question_id": 1, "image": "COCO_1.jpg", "text": "Is there a dog in the image?", "label": "no"}
    questions.write_text(json.dumps(line) + "\n")
    argv = [
        "eval",
        "pope",
        "--questions",
        str(questions),
        "--images",
        str(tmp_path),
        "--json",
        str(tmp_path / "p.json"),
    ]
    argv += ["--model", str(tiny_llava_path), "--device", "cpu", "--max-new-tokens", "2", "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "pope random       dualfocus  accuracy " in printed and " yes_ratio " in printed
    assert '"questions": ["' in printed  # the settings line
