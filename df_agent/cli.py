"""The `df-agent` command: ask, and the subcommands other modules register."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

# The engine's modes, spelled out here so that `--help` does not import torch.
MODES = ("dualfocus", "macro", "micro", "auto")
# subcommand -> module with `add_arguments(parser)` and `run(args) -> int`; imported only when listed.
SUBCOMMANDS: dict[str, str] = {
    "eval": "df_agent.eval.cli",
    "memory": "df_agent.memory.cli",
    "convert-checkpoint": "df_agent.convert",
    "mcp": "df_agent.agents.mcp",
}


def add_ask_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", nargs="?", help="image file (PNG, JPEG, ...) or a data URI")
    parser.add_argument("question", nargs="?", help="the question about the image")
    parser.add_argument("--model", help="checkpoint folder or hub id (default: the shipped model)")
    parser.add_argument(
        "--mode", choices=MODES, default="dualfocus", help="auto: skip the zoom when confident"
    )
    parser.add_argument("--arbitration", choices=["official", "own_context", "average"], default="official")
    parser.add_argument("--option", action="append", dest="options", help="a multiple-choice option (repeat)")
    parser.add_argument("--json", action="store_true", help="print the full FocusResult as JSON")
    parser.add_argument("--annotate", metavar="OUT.png", help="write the image with the region drawn on it")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    parser.add_argument(
        "--open", action="store_true",
        help="show the image with the region drawn on it (PIL's Image.show: needs an image viewer, "
        "e.g. xdg-open or ImageMagick's display on Linux)",
    )  # fmt: skip
    parser.add_argument(
        "--questions", metavar="FILE.jsonl",
        help="batch mode instead of IMAGE QUESTION: one {image, question[, options, mode]} per line "
        "(images relative to the file; other fields, e.g. answer, are ignored); prints one FocusResult "
        "JSON per line",
    )  # fmt: skip
    parser.add_argument("--output", metavar="OUT.jsonl", help="batch mode: write results here, not stdout")


def run_ask(args: argparse.Namespace) -> int:
    from df_agent.engine import DualFocus
    from df_agent.images import load_image
    from df_agent.visualize import annotate

    if args.questions:
        return _run_batch(args)
    if args.image is None or args.question is None:
        raise ValueError("give IMAGE and QUESTION, or --questions FILE.jsonl")
    if args.output:
        raise ValueError("--output is for batch mode (--questions); use --json and redirect instead")
    image = load_image(args.image)
    engine = DualFocus.from_pretrained(args.model, device=args.device, arbitration=args.arbitration)
    result = engine.ask(image, args.question, options=args.options, mode=args.mode)
    if args.json:
        print(result.model_dump_json(indent=2))
    else:
        print(result.answer)
        print(_summary(result), file=sys.stderr)
    if args.annotate or args.open:
        annotated = annotate(image, result)
        if args.annotate:
            annotated.save(args.annotate)
        if args.open:
            annotated.show()
    return 0


def _read_batch(path: Path) -> list[tuple[int, dict]]:
    """The (line number, question) pairs of a batch file, checked before any model loads."""
    if not path.is_file():
        raise FileNotFoundError(f"questions file {str(path)!r} not found")
    lines = []
    for lineno, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not JSON: {err}") from None
        if not isinstance(line, dict) or not isinstance(line.get("image"), str) or not line["image"]:
            raise ValueError(f"{path}:{lineno}: needs an 'image' (a path relative to the file or a data URI)")
        if not isinstance(line.get("question"), str) or not line["question"].strip():
            raise ValueError(f"{path}:{lineno}: needs a non-empty 'question'")
        options = line.get("options")
        if options is not None and (
            not isinstance(options, list) or not all(isinstance(o, str) for o in options)
        ):
            raise ValueError(f"{path}:{lineno}: 'options' must be a list of strings")
        if line.get("mode", "dualfocus") not in MODES:
            raise ValueError(f"{path}:{lineno}: mode must be one of {', '.join(MODES)}")
        lines.append((lineno, line))
    if not lines:
        raise ValueError(f"{path} holds no questions")
    return lines


def _run_batch(args: argparse.Namespace) -> int:
    """`ask --questions FILE.jsonl`: one FocusResult JSON per line, with a progress bar on stderr."""
    from tqdm import tqdm

    from df_agent.engine import DualFocus
    from df_agent.images import ImageError, load_image

    if args.image or args.question:
        raise ValueError("give either IMAGE QUESTION or --questions FILE.jsonl, not both")
    if args.annotate or args.open:
        raise ValueError("--annotate and --open show one result; they do not apply to --questions")
    path = Path(args.questions)
    lines = _read_batch(path)
    engine = DualFocus.from_pretrained(args.model, device=args.device, arbitration=args.arbitration)
    with Path(args.output).open("w", encoding="utf-8") if args.output else nullcontext(sys.stdout) as out:
        for lineno, line in tqdm(lines, desc="ask", unit="q", file=sys.stderr):
            source = line["image"]
            if not source.startswith("data:") and not Path(source).is_absolute():
                source = str(path.parent / source)
            try:
                image = load_image(source)
            except ImageError as err:
                raise ImageError(f"{path}:{lineno}: {err}") from None
            options = line.get("options") or args.options
            result = engine.ask(image, line["question"], options=options, mode=line.get("mode", args.mode))
            out.write(result.model_dump_json() + "\n")
            out.flush()
    return 0


def _summary(result) -> str:
    box = "none" if result.box is None else ",".join(f"{v:.0f}" for v in result.box.as_tuple())
    scores = json.dumps(result.scores) if result.scores else "no vote"
    return (
        f"path={result.path} macro={result.macro_answer!r} micro={result.micro_answer!r} box=[{box}] "
        f"scores={scores} fallback={result.fallback!r} total={result.timings.get('total', 0):.3f}s"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="df-agent", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ask = sub.add_parser("ask", help="answer a question about an image with DualFocus")
    add_ask_arguments(ask)
    ask.set_defaults(handler=run_ask)
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(command)
        command.set_defaults(handler=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `df-agent` console script."""
    from df_agent.images import ImageError

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ImageError, FileNotFoundError, ValueError, OSError) as err:
        print(f"df-agent {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
