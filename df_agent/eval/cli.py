"""Evaluate a model on POPE, TextVQA, V* Bench, FocusShapes(-HR) or a JSONL file: macro-only and DualFocus.

``df-agent eval BENCHMARK [options]`` asks every question once with DualFocus, writes one result row
per question to a JSONL file as it goes (``--resume`` continues it), then the report (``--json``) and
a plot of per-category accuracy for macro-only, micro-only and DualFocus (``--plot``), and prints a
table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from df_agent.eval.harness import Benchmark, evaluate, table

if TYPE_CHECKING:
    from df_agent.engine import DualFocus

DEFAULT_FOCUSSHAPES_SEED = 987654  # never used in training: training scenes are seeded by strings


def _common(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--model", help="checkpoint folder or hub id (default: the shipped model)")
    model.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    model.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: by device")
    model.add_argument(
        "--arbitration", choices=["official", "own_context", "average"], default="official",
        help="the vote of the DualFocus pass (default: official)",
    )  # fmt: skip
    model.add_argument("--margin", type=int, help="pixels added around the squared region (default 25)")
    model.add_argument("--min-side", type=int, help="minimum crop side in pixels (default 32)")
    model.add_argument("--max-new-tokens", type=int, help="answer token budget (default 128)")
    model.add_argument(
        "--server", action="append", metavar="URL",
        help="evaluate a model served by an OpenAI-compatible server (vLLM) instead of a local one; "
        "repeat for replicas; the API key, if any, is read from DF_AGENT_API_KEY",
    )  # fmt: skip
    model.add_argument("--served-model", help="the model's name on the server (default: the first listed)")
    model.add_argument(
        "--server-client", choices=["openai", "langchain"], default="openai",
        help="OpenAIBackend (default) or ChatModelBackend over langchain-openai ChatOpenAI, for --server",
    )  # fmt: skip
    model.add_argument(
        "--capabilities", choices=["vllm", "hosted", "bare"],
        help="what --server offers (default: detected): prompt log-probabilities, generation ones, none",
    )  # fmt: skip
    run = parser.add_argument_group("run")
    run.add_argument("--json", metavar="OUT.json", help="the report (default: ./eval-BENCHMARK.json)")
    run.add_argument("--rows", metavar="OUT.jsonl", help="per-question results (default: OUT.rows.jsonl)")
    run.add_argument("--plot", metavar="OUT.png", help="per-category accuracy plot (default: OUT.png)")
    run.add_argument("--limit", type=int, help="evaluate only the first N questions")
    run.add_argument("--resume", action="store_true", help="continue the per-question results file")
    run.add_argument("--overwrite", action="store_true", help="start the per-question results file again")
    run.add_argument(
        "--workers", type=int, default=1,
        help="questions in flight at once (helps a backend that serves concurrent requests)",
    )  # fmt: skip
    run.add_argument("--quiet", action="store_true", help="no progress bar")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``eval`` subcommand's arguments: one sub-subcommand per benchmark."""
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")

    focus = sub.add_parser("focusshapes", help="fresh FocusShapes scenes: detail, global and exist questions")
    focus.add_argument("--seed", type=int, default=DEFAULT_FOCUSSHAPES_SEED, help="scene seed")
    focus.add_argument("--n", type=int, default=300, help="number of scenes (3 questions each)")

    focus_hr = sub.add_parser(
        "focusshapes-hr",
        help="FocusShapes-HR: 1280 px scenes, objects of the usual sizes; DualFocus and search mode",
    )
    focus_hr.add_argument("--seed", type=int, default=DEFAULT_FOCUSSHAPES_SEED, help="scene seed")
    focus_hr.add_argument("--n", type=int, default=300, help="number of scenes (3 questions each)")
    focus_hr.add_argument("--tile-side", type=int, help="search mode's tile side in pixels (default 320)")
    focus_hr.add_argument("--overlap", type=int, help="search mode's tile overlap in pixels (default 80)")

    pope = sub.add_parser("pope", help="POPE question files (coco_pope_{random,popular,adversarial}.json)")
    pope.add_argument("--questions", nargs="+", required=True, help="question files, one per split")
    pope.add_argument("--images", required=True, help="the folder the image names are relative to")

    textvqa = sub.add_parser("textvqa", help="TextVQA val json (10 answers per question)")
    textvqa.add_argument("--questions", required=True, help="TextVQA_0.5.1_val.json")
    textvqa.add_argument("--images", required=True, help="folder of IMAGE_ID.jpg (train_images/)")
    textvqa.add_argument("--ocr-in-prompt", action="store_true", help="put the OCR tokens in the prompt")
    textvqa.add_argument("--ocr-file", help="the Rosetta OCR json, if the questions carry no ocr_tokens")

    vstar = sub.add_parser("vstar", help="V* Bench folder (direct_attributes/, relative_position/)")
    vstar.add_argument("--root", required=True, help="the benchmark folder")
    vstar.add_argument("--shuffle-seed", type=int, default=0, help="option shuffle for generation")

    jsonl = sub.add_parser("jsonl", help="any JSONL of {image, question, answer}")
    jsonl.add_argument("--questions", required=True, help="the JSONL file (images relative to it)")

    for command in (focus, focus_hr, pope, textvqa, vstar, jsonl):
        _common(command)


def build_benchmark(args: argparse.Namespace) -> Benchmark:
    """The benchmark the arguments name."""
    if args.benchmark == "focusshapes":
        from df_agent.eval import focusshapes

        return focusshapes.benchmark(args.seed, args.n)
    if args.benchmark == "focusshapes-hr":
        from df_agent.eval import focusshapes

        return focusshapes.benchmark_hr(args.seed, args.n)
    if args.benchmark == "pope":
        from df_agent.eval import pope

        return pope.benchmark(args.questions, args.images)
    if args.benchmark == "textvqa":
        from df_agent.eval import textvqa

        return textvqa.benchmark(
            args.questions, args.images, ocr_path=args.ocr_file, ocr_in_prompt=args.ocr_in_prompt
        )
    if args.benchmark == "vstar":
        from df_agent.eval import vstar

        return vstar.benchmark(args.root, shuffle_seed=args.shuffle_seed)
    from df_agent.eval import jsonl

    return jsonl.benchmark(args.questions)


def build_engine(args: argparse.Namespace) -> DualFocus:
    """The engine the arguments name: a local checkpoint, or a model on a server."""
    from df_agent.engine import DualFocus

    options = {"margin": args.margin, "min_side": args.min_side, "max_new_tokens": args.max_new_tokens}
    options |= {
        "search_tile_side": getattr(args, "tile_side", None),
        "search_overlap": getattr(args, "overlap", None),
    }
    kwargs = {"arbitration": args.arbitration, **{k: v for k, v in options.items() if v is not None}}
    if not args.server:
        return DualFocus.from_pretrained(args.model, device=args.device, dtype=args.dtype, **kwargs)
    if args.model or args.device or args.dtype:
        raise ValueError("--server evaluates a served model: --model, --device and --dtype do not apply")
    api_key = os.environ.get("DF_AGENT_API_KEY")
    from df_agent.backends.openai import OpenAIBackend

    if args.server_client == "langchain":
        from langchain_openai import ChatOpenAI

        from df_agent.backends.chat_model import ChatModelBackend

        # the model's name as OpenAIBackend finds it: the first the server lists, unless named
        model = args.served_model
        if model is None:
            with OpenAIBackend(args.server[0], api_key=api_key, capabilities="bare") as listing:
                model = listing.model_id
        logprobs = args.capabilities != "bare"
        llm = ChatOpenAI(
            model=model, base_url=args.server[0], api_key=api_key or "none", temperature=0, logprobs=logprobs
        )
        return DualFocus(ChatModelBackend(llm, logprobs=logprobs), **kwargs)
    backend = OpenAIBackend(args.server, args.served_model, api_key=api_key, capabilities=args.capabilities)
    return DualFocus(backend, **kwargs)


def run(args: argparse.Namespace) -> int:
    """Run the evaluation; print the table, and where the files went."""
    benchmark = build_benchmark(args)
    server_errors: tuple[type[Exception], ...] = ()
    if args.server:
        from df_agent.backends.openai import ServerError

        server_errors = (ServerError,)
        if args.server_client == "langchain":
            from openai import APIError

            server_errors += (APIError,)
    try:
        engine = build_engine(args)
        json_path = Path(args.json or f"eval-{benchmark.name}.json")
        report = evaluate(
            engine, benchmark, json_path, rows_path=args.rows, plot_path=args.plot, limit=args.limit,
            resume=args.resume, overwrite=args.overwrite, workers=args.workers, progress=not args.quiet,
        )  # fmt: skip
    except server_errors as err:
        raise ConnectionError(f"{err} (the rows written so far are kept: rerun with --resume)") from None
    print(table(report))
    print(f"settings: {json.dumps(report['settings'])}")
    for split, paths in report.get("pope", {}).items():
        for path in ("macro", "dualfocus"):
            m = paths[path]
            print(
                f"pope {split:<12} {path:<10} accuracy {m['accuracy']:.4f} precision {m['precision']:.4f} "
                f"recall {m['recall']:.4f} f1 {m['f1']:.4f} yes_ratio {m['yes_ratio']:.4f}"
            )
    for name in ("box_parse_failure_rate", "mean_iou_detail", "seconds_per_question"):
        if name in report:
            print(f"{name}: {report[name]:.4f}")
    if report["all"].get("mode"):  # further passes: their model calls per question, by category
        for group in [*report["categories"], "all"]:
            calls = " ".join(f"{k} {v:.2f}" for k, v in report[group]["model_calls_per_question"].items())
            print(f"model_calls_per_question {group:<8} {calls}")
    if "lookalikes" in report:
        print(f"lookalikes: {json.dumps(report['lookalikes'])}")
    files = report["files"]
    print(f"wrote {files['json']}, {files['rows']} and {files['plot']}", file=sys.stderr)
    return 0


__all__ = ["add_arguments", "build_benchmark", "build_engine", "run"]
