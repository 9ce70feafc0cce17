"""The shared benchmark runner: macro-only and DualFocus side by side from one pass.

Each question is asked once with ``engine.ask(mode="dualfocus")``. The macro answer is a by-product of
DualFocus, so macro-only accuracy costs nothing extra; the micro-only answer is the micro candidate (the
macro answer where no box could be read, as ``mode="micro"`` does). A result row per question is
appended to a JSONL file as soon as it is known, so a crash loses nothing and ``resume=True`` carries
on where the file stops. The report says, per category and overall: the accuracy of each path and of
the best-of-two oracle, how often each path became the answer and who won the votes that ran, what the
vote changed against macro-only (wrong -> right, right -> wrong), how often no box could be read, the
mean IoU of the predicted boxes where targets are known, and the seconds per question.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image
from pydantic import BaseModel, Field, ValidationError
from tqdm.auto import tqdm  # a widget in notebooks (one bar, no text lines), text in a terminal

from df_agent.boxes import crop
from df_agent.engine import ARBITRATION_METHODS, DualFocus, option_letter
from df_agent.eval.items import EvalItem
from df_agent.images import load_image
from df_agent.prompt_sets import OPTION_LETTERS
from df_agent.results import FocusResult, Mode

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PATHS = ("macro", "micro", "dualfocus")
# Summary entries that hold counts, not the accuracies of further systems.
_COUNTS = frozenset({"picked", "votes", "vote_changes", "model_calls_per_question"})
# (report key, legend label, colour) of the bars of the plot.
PLOTTED = (
    ("macro", "macro-only", "#8c96a5"),
    ("micro", "micro-only", "#e0a040"),
    ("dualfocus", "DualFocus", "#2a6fdb"),
)
# Colours of the further passes' bars (`Benchmark.modes`), in order.
_PASS_COLOURS = ("#3a9d5d", "#a05ad0", "#d05a5a")
# Keys of the report that are not categories.
RESERVED = frozenset({"benchmark", "model", "arbitration", "settings", "n", "categories", "all", "files"})

Judge = Callable[[str, EvalItem], float]
Extra = Callable[[DualFocus, Image.Image, EvalItem, FocusResult], dict[str, str]]
Summarizer = Callable[[Sequence["ResultRow"]], dict[str, Any]]


class EvalItemError(ValueError):
    """A benchmark question could not be evaluated; the message names the question."""


@dataclass
class Benchmark:
    """A list of questions and how to score answers to them.

    Attributes:
        name: The benchmark's name, recorded in the report.
        items: The questions, in a fixed order (``--limit`` takes the first ones).
        judge: The score of one answer in 0..1 (1.0 right, 0.0 wrong; TextVQA is fractional).
        extra: Answers of further systems for one question, keyed ``"group.name"`` (for example
            V*'s ``"loss.macro"``), computed from the pass's result without generating again.
        compare_arbitration: Also report the accuracy of each arbitration method of the engine,
            re-voting on the stored candidates (as ``"arbitration.<method>"``).
        summarize: Extra top-level report entries computed from the rows.
        settings: What the report should record about how the questions were built.
        modes: Further engine passes per question, one ``engine.ask(mode=...)`` each (for example
            ``("search",)``); each pass's answer is the system ``"mode.<mode>"`` and its result is
            kept in the row's `passes`.
    """

    name: str
    items: list[EvalItem]
    judge: Judge
    extra: Extra | None = None
    compare_arbitration: bool = False
    summarize: Summarizer | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    modes: tuple[Mode, ...] = ()


class ResultRow(BaseModel):
    """One evaluated question: every system's answer and score, and the DualFocus trace."""

    id: str
    category: str
    image: str
    gold: list[str] = Field(description="The accepted answers.")
    predictions: dict[str, str] = Field(description="Answer of each system: macro, micro, dualfocus, ...")
    correct: dict[str, float] = Field(description="Score of each system's answer, in 0..1.")
    voted: bool = Field(description="Whether the perplexity vote ran.")
    box_failed: bool = Field(description="Whether the box request was answered with no readable box.")
    iou: float | None = Field(default=None, description="IoU of the predicted box with the target.")
    seconds: float = Field(description="Seconds of the DualFocus pass.")
    macro_seconds: float = Field(description="Seconds of its macro step: the cost of macro-only.")
    extra_seconds: float = Field(default=0.0, description="Seconds of the extra systems' scoring.")
    result: FocusResult
    passes: dict[str, FocusResult] = Field(
        default_factory=dict, description="The further passes' results by mode (`Benchmark.modes`)."
    )


def evaluate_item(engine: DualFocus, benchmark: Benchmark, item: EvalItem) -> ResultRow:
    """Ask one question with DualFocus and score every path of it.

    Raises:
        EvalItemError: If the image cannot be loaded or the engine fails, naming the question.
    """
    try:
        image = load_image(item.image)
        result = engine.ask(image, item.question, options=item.options, mode="dualfocus", use_memory=False)
        start = time.perf_counter()
        predictions = _path_answers(result, item)
        if benchmark.compare_arbitration and engine.backend.abilities.prompt_logprobs:  # they score
            predictions |= arbitration_answers(engine, image, item, result)
        if benchmark.extra is not None:
            predictions |= benchmark.extra(engine, image, item, result)
        passes = {
            mode: engine.ask(image, item.question, options=item.options, mode=mode, use_memory=False)
            for mode in benchmark.modes
        }
        predictions |= {f"mode.{mode}": _as_answer(passed.answer, item) for mode, passed in passes.items()}
        extra_seconds = time.perf_counter() - start
    except (OSError, ValueError) as err:  # bad data: a missing or broken image, a malformed question
        raise EvalItemError(f"question {item.id!r}: {err}") from err
    except Exception as err:  # a programming or model error: keep its traceback, name the question
        err.add_note(f"while evaluating question {item.id!r} of {benchmark.name}")
        raise
    correct = {system: float(benchmark.judge(answer, item)) for system, answer in predictions.items()}
    box_failed = result.box_text is not None and result.box is None
    iou = None
    if item.target_box is not None and result.box_text is not None:
        iou = 0.0 if result.box is None else result.box.iou(item.target_box)
    return ResultRow(
        id=item.id,
        category=item.category,
        image=item.image_name,
        gold=item.answers,
        predictions=predictions,
        correct=correct,
        voted=result.scores is not None,
        box_failed=box_failed,
        iou=iou,
        seconds=result.timings.get("total", 0.0),
        macro_seconds=result.timings.get("macro", 0.0),
        extra_seconds=extra_seconds,
        result=result,
        passes=passes,
    )


def _path_answers(result: FocusResult, item: EvalItem) -> dict[str, str]:
    """The macro, micro (macro where no box) and DualFocus answers; option letters with options."""
    macro = result.macro_answer if result.macro_answer is not None else result.answer
    micro = result.micro_answer if result.micro_answer is not None else macro
    answers = {"macro": macro or "", "micro": micro or "", "dualfocus": result.answer or ""}
    if item.options:
        answers = {k: option_letter(v, item.options) or v for k, v in answers.items()}
    return answers


def arbitration_answers(
    engine: DualFocus, image: Image.Image, item: EvalItem, result: FocusResult
) -> dict[str, str]:
    """The answer each arbitration method of the engine gives on the pass's own candidates.

    Nothing is generated again: where no perplexity vote ran (no box, the candidates agree, only one
    is a valid option, or the backend does not score) every method keeps the pass's answer; where it
    ran, the pass's method keeps its verdict and each other method scores the same two candidates
    (`DualFocus.arbitrate`) in the same contexts (the crop is cut again from the stored crop box).

    Returns:
        ``{"arbitration.official": ..., "arbitration.own_context": ..., "arbitration.average": ...}``.
    """
    if result.arbitration is None or result.crop_box is None or result.box_text is None:
        return {f"arbitration.{m}": _as_answer(result.answer, item) for m in ARBITRATION_METHODS}
    macro, micro = result.macro_answer or "", result.micro_answer or ""
    if item.options:
        letters = [option_letter(macro, item.options), option_letter(micro, item.options)]
        pair = [item.options[OPTION_LETTERS.index(letter)] for letter in letters]  # type: ignore[arg-type]
        answers = letters
    else:
        pair = answers = [macro, micro]
    crop_image = crop(image, result.crop_box)
    out = {}
    for method in ARBITRATION_METHODS:
        if method == result.arbitration:
            out[f"arbitration.{method}"] = _as_answer(result.answer, item)
            continue
        vote = engine.arbitrate(
            image, crop_image, result.question, pair,
            box_text=result.box_text, method=method, options=item.options,
        )  # fmt: skip
        out[f"arbitration.{method}"] = answers[vote.winner]  # type: ignore[assignment]
    return out


def _as_answer(answer: str | None, item: EvalItem) -> str:
    answer = answer or ""  # None: no option letter, which the judge counts wrong
    return (option_letter(answer, item.options) or answer) if item.options else answer


# -- the run ---------------------------------------------------------------------------------------


def read_rows(path: str | Path) -> tuple[list[ResultRow], bool]:
    """The rows of a results file, and whether a damaged line (a crash mid-write) was skipped."""
    rows, damaged = [], False
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rows.append(ResultRow.model_validate_json(line))
            except ValidationError:
                damaged = True
    return rows, damaged


def run(
    engine: DualFocus,
    benchmark: Benchmark,
    rows_path: str | Path,
    *,
    limit: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    workers: int = 1,
    progress: bool = True,
) -> list[ResultRow]:
    """Evaluate the benchmark's questions, appending one JSON row per question to `rows_path`.

    Args:
        engine: The DualFocus engine (its arbitration method is the vote of the pass).
        benchmark: The questions and their judge.
        rows_path: The JSONL results file, appended to as questions finish.
        limit: Evaluate only the first `limit` questions.
        resume: Keep the rows already in `rows_path` and evaluate only the questions they lack.
        overwrite: Start `rows_path` afresh even if it holds results.
        workers: Questions in flight at once (threads). The transformers backend runs one at a time
            behind its lock; a backend that serves concurrent requests (an HTTP server) gains.
        progress: Show a tqdm progress bar.

    Returns:
        The rows of the selected questions, in the benchmark's order.

    Raises:
        FileExistsError: If `rows_path` holds results and neither `resume` nor `overwrite` is set.
        EvalItemError: If a question fails; the rows written so far stay in the file.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    items = benchmark.items[:limit] if limit else list(benchmark.items)
    ids = [item.id for item in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"benchmark {benchmark.name!r} has duplicate question ids")
    path = Path(rows_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    done: dict[str, ResultRow] = {}
    if path.exists() and path.stat().st_size > 0 and not overwrite:
        if not resume:
            raise FileExistsError(
                f"{path} already holds results: pass --resume to continue them or --overwrite to start again"
            )
        kept, damaged = read_rows(path)
        done = {row.id: row for row in kept}
        if damaged:  # drop the half-written line so the file stays valid JSONL
            path.write_text("".join(row.model_dump_json() + "\n" for row in kept), encoding="utf-8")
    else:
        path.write_text("", encoding="utf-8")
    pending = [item for item in items if item.id not in done]
    with path.open("a", encoding="utf-8") as out, tqdm(
        total=len(items), initial=len(items) - len(pending), desc=benchmark.name, disable=not progress,
        unit="q", dynamic_ncols=True,
    ) as bar:  # fmt: skip
        for row in _evaluate_all(engine, benchmark, pending, workers):
            out.write(row.model_dump_json() + "\n")
            out.flush()
            done[row.id] = row
            bar.update(1)
            bar.set_postfix(_running_accuracy(done.values()), refresh=False)
    return [done[i] for i in ids]


def _evaluate_all(
    engine: DualFocus, benchmark: Benchmark, items: list[EvalItem], workers: int
) -> Iterable[ResultRow]:
    if workers == 1:
        for item in items:
            yield evaluate_item(engine, benchmark, item)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(evaluate_item, engine, benchmark, item) for item in items}
        while futures:
            finished, futures = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in finished if f.exception() is not None]
            for future in finished:
                if future.exception() is None:
                    yield future.result()
            if failed:
                for future in futures:
                    future.cancel()
                raise failed[0].exception()  # type: ignore[misc]


def _running_accuracy(rows: Iterable[ResultRow]) -> dict[str, str]:
    rows = list(rows)
    return {p: f"{sum(r.correct[p] for r in rows) / len(rows):.2f}" for p in ("macro", "dualfocus")}


# -- the report ------------------------------------------------------------------------------------


def summarize(rows: Sequence[ResultRow]) -> dict[str, Any]:
    """The figures of a group of rows (see the module docstring); accuracies in 0..1.

    Keys: ``n``; ``macro``, ``micro``, ``dualfocus`` and ``oracle`` (best of macro and micro);
    one object per group of further systems (``"arbitration": {"official": ...}``); ``picked``
    (how often each path became the answer); ``votes`` (how many votes ran and who won them);
    ``vote_changes`` (questions DualFocus got right that macro-only got wrong, and the reverse; with
    fractional scores, better and worse); ``box_parse_failure_rate`` (of the questions whose box
    request ran); ``mean_iou`` (when targets are known; an unreadable box counts 0);
    ``seconds_per_question`` (the DualFocus pass) and ``macro_seconds_per_question``;
    ``model_calls_per_question``: the mean backend requests of macro-only (one generation), of the
    DualFocus pass and of each further pass (`Benchmark.modes`).
    """
    n = len(rows)
    if n == 0:
        return {"n": 0}
    summary: dict[str, Any] = {"n": n}
    for system in dict.fromkeys(s for row in rows for s in row.correct):
        value = _mean(row.correct.get(system, 0.0) for row in rows)
        group, _, name = system.rpartition(".")
        if group:
            summary.setdefault(group, {})[name] = value
        else:
            summary[system] = value
    summary["oracle"] = _mean(max(row.correct["macro"], row.correct["micro"]) for row in rows)
    paths = [row.result.path for row in rows]
    votes = [row for row in rows if row.voted]
    summary["picked"] = {p: paths.count(p) for p in ("macro", "micro")}
    summary["votes"] = {
        "n": len(votes),
        "macro": sum(row.result.path == "macro" for row in votes),
        "micro": sum(row.result.path == "micro" for row in votes),
    }
    summary["vote_changes"] = {
        "wrong_to_right": sum(row.correct["dualfocus"] > row.correct["macro"] for row in rows),
        "right_to_wrong": sum(row.correct["dualfocus"] < row.correct["macro"] for row in rows),
    }
    located = [row for row in rows if row.result.box_text is not None]
    summary["box_parse_failure_rate"] = _mean(row.box_failed for row in located) if located else 0.0
    ious = [row.iou for row in rows if row.iou is not None]
    if ious:
        summary["mean_iou"] = _mean(ious)
    summary["seconds_per_question"] = _mean(row.seconds for row in rows)
    summary["macro_seconds_per_question"] = _mean(row.macro_seconds for row in rows)
    summary["model_calls_per_question"] = {
        "macro": 1.0,
        "dualfocus": _mean(row.result.model_calls for row in rows),
        **{mode: _mean(row.passes[mode].model_calls for row in rows) for mode in rows[0].passes},
    }
    return summary


def _mean(values: Iterable[float]) -> float:
    values = [float(v) for v in values]
    return math.fsum(values) / len(values) if values else 0.0


def report(
    engine: DualFocus, benchmark: Benchmark, rows: Sequence[ResultRow], *, wall_seconds: float | None = None
) -> dict[str, Any]:
    """The report of a run: ``all`` and one summary per category at the top level, plus the settings.

    Questions filed under the category "all" (the default) count in ``all`` only.

    Raises:
        ValueError: If a category's name clashes with a report key (`RESERVED`).
    """
    categories = [c for c in dict.fromkeys(row.category for row in rows) if c != "all"]
    clash = RESERVED.intersection(categories)
    if clash:
        raise ValueError(f"category names {sorted(clash)} clash with report keys; rename them")
    out: dict[str, Any] = {
        "benchmark": benchmark.name,
        "model": engine.backend.model_id,
        "arbitration": engine.arbitration,
        "settings": dict(benchmark.settings),
        "n": len(rows),
        "categories": categories,
        "all": summarize(rows),
    }
    for category in categories:
        out[category] = summarize([row for row in rows if row.category == category])
    out["box_parse_failure_rate"] = out["all"].get("box_parse_failure_rate", 0.0)
    out["seconds_per_question"] = out["all"].get("seconds_per_question", 0.0)
    if wall_seconds is not None:
        out["wall_seconds"] = wall_seconds
    if benchmark.summarize is not None:
        out |= benchmark.summarize(rows)
    return out


def figure(report_data: dict[str, Any]) -> Figure:
    """A bar chart of per-category accuracy: macro-only, micro-only and DualFocus side by side.

    The best-of-two oracle is a fourth, unfilled bar with a dotted edge, so no line crosses a value
    label; the legend sits below the axes, clear of the bars.

    Raises:
        ImportError: If matplotlib is missing, naming the extra that installs it.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("the plot needs matplotlib: pip install 'df-agent[eval]'") from None

    groups = [*report_data["categories"], "all"]
    fig = Figure(figsize=(max(6.0, 1.9 * len(groups) + 2), 4.2), dpi=110, layout="constrained")
    axes = fig.subplots()
    modes = report_data["all"].get("mode", {})
    passes = [(f"mode.{m}", f"{m} mode", c) for m, c in zip(modes, _PASS_COLOURS, strict=False)]
    bars = [*PLOTTED, *passes, ("oracle", "best-of-two oracle", "none")]
    width = 0.84 / len(bars)
    for k, (key, label, colour) in enumerate(bars):
        group, _, name = key.rpartition(".")
        values = [(report_data[g].get(group, {}) if group else report_data[g]).get(name, 0.0) for g in groups]
        xs = [i + (k - (len(bars) - 1) / 2) * width for i in range(len(groups))]
        style = {"edgecolor": "#222222", "linestyle": ":", "linewidth": 1.2} if key == "oracle" else {}
        drawn = axes.bar(xs, values, width * 0.92, label=label, color=colour, **style)
        axes.bar_label(drawn, labels=[f"{v:.2f}" for v in values], fontsize=7, padding=2)
    axes.set_xticks(range(len(groups)), [f"{g}\n(n={report_data[g]['n']})" for g in groups])
    axes.set_ylim(0, 1.08)
    axes.set_ylabel("accuracy")
    fig.suptitle(f"{report_data['benchmark']}: {Path(str(report_data['model'])).name}", fontsize=10)
    fig.legend(loc="outside lower center", ncols=len(bars), fontsize=8, frameon=False)
    axes.spines[["top", "right"]].set_visible(False)
    return fig


def plot(report_data: dict[str, Any], path: str | Path) -> Path:
    """Write `figure` of the report as a PNG and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure(report_data).savefig(path, format="png")
    return path


def evaluate(
    engine: DualFocus,
    benchmark: Benchmark,
    json_path: str | Path,
    *,
    rows_path: str | Path | None = None,
    plot_path: str | Path | None = None,
    limit: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    workers: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Run a benchmark and write its report (JSON), its rows (JSONL) and its plot (PNG).

    Args:
        engine: The DualFocus engine.
        benchmark: The questions and their judge.
        json_path: Where the report goes.
        rows_path: The per-question results file; default `json_path` with ``.rows.jsonl``.
        plot_path: The plot; default `json_path` with ``.png``.
        limit, resume, overwrite, workers, progress: As `run` takes them.

    Returns:
        The report, with the paths of the files written under ``"files"``.
    """
    json_path = Path(json_path)
    rows_path = Path(rows_path) if rows_path else json_path.with_suffix(".rows.jsonl")
    plot_path = Path(plot_path) if plot_path else json_path.with_suffix(".png")
    start = time.perf_counter()
    rows = run(
        engine, benchmark, rows_path, limit=limit, resume=resume, overwrite=overwrite,
        workers=workers, progress=progress,
    )  # fmt: skip
    data = report(engine, benchmark, rows, wall_seconds=time.perf_counter() - start)
    data["files"] = {"json": str(json_path), "rows": str(rows_path), "plot": str(plot_path)}
    plot(data, plot_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return data


def table(report_data: dict[str, Any]) -> str:
    """The report's main figures as a fixed-width text table, one line per category and "all".

    Columns: n, macro-only, micro-only, DualFocus, the oracle, the vote's changes against macro-only,
    then every further system (each arbitration method; V*'s option-loss paths).
    """
    groups = [*report_data["categories"], "all"]
    every = report_data["all"]
    extra = [
        (group, name)
        for group, values in every.items()
        if isinstance(values, dict) and group not in _COUNTS
        for name in values
    ]
    header = f"{'category':<20}{'n':>6}{'macro':>8}{'micro':>8}{'DF':>8}{'oracle':>8}{'w->r':>6}{'r->w':>6}"
    names = [name if group == "arbitration" else f"{group}:{name}" for group, name in extra]
    widths = [max(len(name) + 2, 9) for name in names]  # whole names: no column is cut short
    header += "".join(f"{name:>{w}}" for name, w in zip(names, widths, strict=True))
    lines = [header]
    for g in groups:
        s = report_data[g]
        if not s.get("n"):
            continue
        line = f"{g:<20}{s['n']:>6}{s['macro']:>8.3f}{s['micro']:>8.3f}{s['dualfocus']:>8.3f}"
        changes = s["vote_changes"]
        line += f"{s['oracle']:>8.3f}{changes['wrong_to_right']:>6}{changes['right_to_wrong']:>6}"
        line += "".join(f"{s[group][name]:>{w}.3f}" for (group, name), w in zip(extra, widths, strict=True))
        lines.append(line)
    return "\n".join(lines)


__all__ = [
    "PATHS",
    "PLOTTED",
    "Benchmark",
    "EvalItemError",
    "ResultRow",
    "arbitration_answers",
    "evaluate",
    "evaluate_item",
    "figure",
    "plot",
    "read_rows",
    "report",
    "run",
    "summarize",
    "table",
]
