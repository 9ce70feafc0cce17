"""Search, count, check and export the visual Q&A memory (`df-agent memory search|stats|check|export`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from df_agent.memory.records import MemoryUnavailableError, Recollection
from df_agent.memory.store import DEFAULT_COLLECTION, VisualQAMemory, default_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `memory` subcommand's actions and options."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--store", metavar="DIR_OR_URL",
        help="memory folder or Chroma server URL http://host:port (default: the user's cache folder)",
    )  # fmt: skip
    common.add_argument("--collection", default=DEFAULT_COLLECTION, help="collection name")
    actions = parser.add_subparsers(dest="action", required=True)
    search = actions.add_parser("search", parents=[common], help="past questions closest to QUERY")
    search.add_argument("query", help="a question or any text")
    search.add_argument("-k", type=int, default=5, help="how many records (default 5)")
    search.add_argument("--image", help="only records about this image (a file or its content hash)")
    search.add_argument("--json", action="store_true", help="one JSON object per line")
    stats = actions.add_parser("stats", parents=[common], help="where the memory is and what it holds")
    stats.add_argument("--json", action="store_true", help="print the stats as JSON")
    check = actions.add_parser(
        "check", parents=[common], help="search for every record with its own vector; report hidden ones"
    )
    check.add_argument("--repair", action="store_true", help="write unreachable records again")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    export = actions.add_parser("export", parents=[common], help="write every record to a JSONL file")
    export.add_argument("out", metavar="OUT.jsonl", help="the file to write")


def run(args: argparse.Namespace) -> int:
    """Run one memory action; 2 on a store that is missing or unreachable."""
    if args.store is None or not args.store.lower().startswith(("http://", "https://")):
        folder = Path(args.store).expanduser() if args.store else default_path()
        if not (folder / "chroma").is_dir():
            print(f"df-agent memory: error: no memory at {folder} (nothing logged yet)", file=sys.stderr)
            return 2
    try:
        with VisualQAMemory(args.store, collection=args.collection) as memory:
            return _ACTIONS[args.action](memory, args)
    except MemoryUnavailableError as err:
        print(f"df-agent memory: error: {err}", file=sys.stderr)
        return 2


def _search(memory: VisualQAMemory, args: argparse.Namespace) -> int:
    if args.k < 1:
        raise ValueError(f"-k must be at least 1, not {args.k}")
    for found in memory.recall(args.query, image=args.image, k=args.k):
        print(found.model_dump_json() if args.json else _line(found))
    return 0


def _stats(memory: VisualQAMemory, args: argparse.Namespace) -> int:
    stats = memory.stats()
    if args.json:
        print(stats.model_dump_json(indent=2))
    else:
        for name, value in stats.model_dump().items():
            print(f"{name}: {value}")
    return 0


def _check(memory: VisualQAMemory, args: argparse.Namespace) -> int:
    """0 when every record is reachable by search after the check; 1 otherwise."""
    report = memory.check(repair=args.repair)
    if args.json:
        print(report.model_dump_json(indent=2))
    else:
        print(report.summary())
        for hidden in report.unreachable:
            print(f"unreachable: {hidden}{' (repaired)' if hidden in report.repaired else ''}")
    return 1 if report.still_unreachable else 0


def _export(memory: VisualQAMemory, args: argparse.Namespace) -> int:
    count = memory.export(args.out)
    print(f"wrote {count} records to {args.out}", file=sys.stderr)
    return 0


def _line(found: Recollection) -> str:
    result = found.record.result
    when = f"{result.created_at:%Y-%m-%d %H:%M}"
    image = found.record.image_name or result.image_hash[:12]
    where = f"{result.model_id}, {result.mode}, image {image}, {when}"
    return f"{found.distance:.3f}  {result.question!r} -> {result.answer!r}  [{where}]"


_ACTIONS = {"search": _search, "stats": _stats, "check": _check, "export": _export}

__all__ = ["add_arguments", "run"]
