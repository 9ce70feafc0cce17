"""The `df-agent` command: ask, and the subcommands other modules register."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence

# subcommand -> module with `add_arguments(parser)` and `run(args) -> int`; imported only when listed.
SUBCOMMANDS: dict[str, str] = {}


def add_ask_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="image file (PNG, JPEG, ...) or a data URI")
    parser.add_argument("question", help="the question about the image")
    parser.add_argument("--model", help="checkpoint folder or hub id (default: the shipped model)")
    parser.add_argument("--mode", choices=["dualfocus", "macro", "micro"], default="dualfocus")
    parser.add_argument("--arbitration", choices=["official", "own_context", "average"], default="official")
    parser.add_argument("--option", action="append", dest="options", help="a multiple-choice option (repeat)")
    parser.add_argument("--json", action="store_true", help="print the full FocusResult as JSON")
    parser.add_argument("--annotate", metavar="OUT.png", help="write the image with the region drawn on it")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")


def run_ask(args: argparse.Namespace) -> int:
    from df_agent.engine import DualFocus
    from df_agent.images import load_image
    from df_agent.visualize import annotate

    image = load_image(args.image)
    engine = DualFocus.from_pretrained(args.model, device=args.device, arbitration=args.arbitration)
    result = engine.ask(image, args.question, options=args.options, mode=args.mode)
    if args.json:
        print(result.model_dump_json(indent=2))
    else:
        print(result.answer)
        print(_summary(result), file=sys.stderr)
    if args.annotate:
        annotate(image, result).save(args.annotate)
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
