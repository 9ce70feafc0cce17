"""The `df-agent` command: ask, and the subcommands other modules register.

Everything that can be checked is checked before a model loads (arguments, files, folders, the
batch file's lines, image paths), and `--help` or a usage error never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

    from df_agent.engine import DualFocus
    from df_agent.results import FocusResult

# The engine's modes and votes, spelled out here so that `--help` does not import torch.
MODES = ("dualfocus", "macro", "micro", "auto", "search")
ARBITRATIONS = ("official", "own_context", "average")
MAX_OPTIONS = 26  # option letters A..Z
ENGINE_MAX_PIXELS = 40_000_000  # df_agent.images.DEFAULT_MAX_PIXELS, without importing PIL here
FIGURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pdf", ".svg")
# subcommand -> (module with `add_arguments(parser)` and `run(args) -> int`, one-line help);
# a module is imported only when its subcommand runs.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "eval": ("df_agent.eval.cli", "evaluate a model on a benchmark: macro-only and DualFocus side by side"),
    "memory": ("df_agent.memory.cli", "search, count, check and export the visual Q&A memory"),
    "convert-checkpoint": ("df_agent.convert", "convert an original LLaVA / DualFocus checkpoint"),
    "mcp": ("df_agent.agents.mcp", "serve the DualFocus tools over MCP"),
}


class UsageError(ValueError):
    """Arguments that cannot work together, or a file or folder they name that is not there."""


def add_ask_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", nargs="?", help="image file (PNG, JPEG, ...) or a data URI")
    parser.add_argument("question", nargs="?", help="the question about the image")
    parser.add_argument(
        "--model", metavar="PATH_OR_HUB_ID",
        help="checkpoint folder or hub id (default: the shipped demonstration model, which knows only "
        "synthetic FocusShapes scenes)",
    )  # fmt: skip
    parser.add_argument(
        "--mode", choices=MODES, default="dualfocus", help="auto: skip the zoom when confident"
    )
    parser.add_argument("--arbitration", choices=ARBITRATIONS, default="official")
    parser.add_argument("--option", action="append", dest="options", help="a multiple-choice option (repeat)")
    parser.add_argument("--json", action="store_true", help="print the full FocusResult as JSON")
    parser.add_argument(
        "--annotate", metavar="OUT.png",
        help="write a figure: the image with the model's box and the crop region, the crop, the question, "
        "both answers with their scores and the answer",
    )  # fmt: skip
    parser.add_argument(
        "--open", action="store_true",
        help="open that figure in the system's image viewer (xdg-open on Linux, open on macOS)",
    )  # fmt: skip
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    parser.add_argument(
        "--memory", nargs="?", const="", metavar="DIR",
        help="log every answer to the Q&A memory that `df-agent memory` reads (default folder: the "
        "user cache's; needs df-agent[memory]) and answer exact repeats from it",
    )  # fmt: skip
    parser.add_argument(
        "--max-pixels", type=int, metavar="N",
        help=f"downscale images larger than N pixels to N (keeping the aspect ratio; at most "
        f"{ENGINE_MAX_PIXELS:,}); without it, images over {ENGINE_MAX_PIXELS:,} pixels are refused",
    )  # fmt: skip
    parser.add_argument(
        "--questions", metavar="FILE.jsonl",
        help="batch mode instead of IMAGE QUESTION: one {image, question[, id, options, mode]} per line "
        "(images relative to the file; other fields are ignored); writes one JSON line per question: "
        "its id, image and line, then the FocusResult, or an 'error'",
    )  # fmt: skip
    parser.add_argument("--output", metavar="OUT.jsonl", help="batch mode: write results here, not stdout")
    parser.add_argument(
        "--resume", action="store_true",
        help="batch mode: skip the questions already answered in --output (matched by id, else by line)",
    )  # fmt: skip


# -- checks made before any model loads ---------------------------------------------------------


def _check_args(args: argparse.Namespace) -> None:
    """Every check on the arguments alone; raises `UsageError` naming what is wrong."""
    batch = args.questions is not None
    if batch and (args.image or args.question):
        raise UsageError("give either IMAGE QUESTION or --questions FILE.jsonl, not both")
    if not batch:
        if args.image is None or args.question is None:
            raise UsageError("give IMAGE and QUESTION, or --questions FILE.jsonl")
        if not args.question.strip():
            raise UsageError("QUESTION is empty")
        if args.output or args.resume:
            raise UsageError(
                "--output and --resume are for batch mode (--questions); use --json and redirect"
            )
    elif args.annotate or args.open:
        raise UsageError("--annotate and --open show one result; they do not apply to --questions")
    if args.resume and not args.output:
        raise UsageError("--resume needs --output OUT.jsonl (the file to resume)")
    _check_options(args.options, "--option")
    if not batch:
        _check_lengths(args.question, args.options or [])
    if args.max_pixels is not None and not 0 < args.max_pixels <= ENGINE_MAX_PIXELS:
        raise UsageError(f"--max-pixels must be between 1 and {ENGINE_MAX_PIXELS:,}, not {args.max_pixels:,}")
    if args.annotate:
        if Path(args.annotate).suffix.lower() not in FIGURE_SUFFIXES:
            raise UsageError(f"--annotate writes {', '.join(FIGURE_SUFFIXES)} files, not {args.annotate!r}")
        _check_parent(args.annotate, "--annotate")
    if args.output:
        _check_parent(args.output, "--output")
    if args.memory:
        memory = Path(args.memory).expanduser()
        if memory.exists() and not memory.is_dir():
            raise UsageError(f"--memory {args.memory!r} is a file; give a folder")
    if args.model:
        from df_agent.backends.checkpoints import looks_like_folder

        if looks_like_folder(args.model) and not Path(args.model).expanduser().exists():
            raise UsageError(f"--model: folder not found: {args.model!r}")


def _check_options(options: object, name: str) -> None:
    if options is None:
        return
    if not isinstance(options, list) or not all(isinstance(o, str) and o.strip() for o in options):
        raise UsageError(f"{name} must be non-empty strings")
    if not 2 <= len(options) <= MAX_OPTIONS:
        raise UsageError(f"{name}: give 2 to {MAX_OPTIONS} options, not {len(options)}")


def _check_lengths(question: str, options: list[str]) -> None:
    """The engine's default text limits (max_question_chars, max_option_chars), checked before loading."""
    from df_agent.engine import MAX_OPTION_CHARS, MAX_QUESTION_CHARS

    length = len(question) + sum(len(o) for o in options)
    if length > MAX_QUESTION_CHARS:
        raise UsageError(
            f"the question is {length:,} characters (with its options); the limit is "
            f"{MAX_QUESTION_CHARS:,} (max_question_chars)"
        )
    if any(len(o) > MAX_OPTION_CHARS for o in options):
        raise UsageError(f"an option is longer than {MAX_OPTION_CHARS:,} characters (max_option_chars)")


def _check_parent(path: str, name: str) -> None:
    parent = Path(path).expanduser().resolve().parent
    if not parent.is_dir():
        raise UsageError(f"{name} {path!r}: folder not found: {str(parent)!r}")
    if Path(path).is_dir():
        raise UsageError(f"{name} {path!r} is a folder; give a file name")


@dataclass
class _Line:
    """One line of a batch file: where it is, what it names, and why it cannot run (if so)."""

    lineno: int
    fields: dict[str, Any]
    source: str | None = None  # the image as a path (resolved against the file) or a data URI
    error: str | None = None

    @property
    def key(self) -> tuple[str, object]:
        """How `--resume` matches it with an output line: by id, else by line number."""
        ident = self.fields.get("id")
        return ("id", ident) if ident is not None else ("line", self.lineno)

    def head(self) -> dict[str, Any]:
        """The fields every output line starts with: id (if given), image, line."""
        head = {"id": self.fields["id"]} if "id" in self.fields else {}
        return {**head, "image": self.fields.get("image"), "line": self.lineno}


def _read_batch(path: Path) -> list[_Line]:
    """Every question of a batch file, each checked (JSON, fields, image file) before any model loads."""
    if not path.is_file():
        raise UsageError(f"questions file {str(path)!r} not found")
    lines = []
    for lineno, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if text.strip():
            lines.append(_check_line(path, lineno, text))
    if not lines:
        raise UsageError(f"{path} holds no questions")
    return lines


def _check_line(path: Path, lineno: int, text: str) -> _Line:
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as err:
        return _Line(lineno, {}, error=f"not JSON: {err}")
    if not isinstance(fields, dict):
        return _Line(lineno, {}, error="not a JSON object")
    line = _Line(lineno, fields)
    image = fields.get("image")
    if not isinstance(image, str) or not image:
        line.error = "needs an 'image' (a path relative to the file or a data URI)"
    elif not isinstance(fields.get("question"), str) or not fields["question"].strip():
        line.error = "needs a non-empty 'question'"
    elif fields.get("mode", "dualfocus") not in MODES:
        line.error = f"mode must be one of {', '.join(MODES)}"
    else:
        try:
            _check_options(fields.get("options"), "'options'")
        except UsageError as err:
            line.error = f"{err} (a list of strings)"
        else:
            try:
                _check_lengths(fields["question"], fields.get("options") or [])
            except UsageError as err:
                line.error = str(err)
    if line.error is None:
        line.source = (
            image if image.startswith("data:") or Path(image).is_absolute() else str(path.parent / image)
        )
        if not image.startswith("data:") and not Path(line.source).is_file():
            line.error = f"image file {line.source!r} not found"
    return line


def _answered(output: Path) -> set[tuple[str, object]]:
    """The keys of the questions `output` already answers (lines without an 'error')."""
    done: set[tuple[str, object]] = set()
    if not output.is_file():
        return done
    for text in output.read_text(encoding="utf-8").splitlines():
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            continue  # a line cut off by an interrupted run: asked again
        if isinstance(line, dict) and "error" not in line:
            done.add(("id", line["id"]) if "id" in line else ("line", line.get("line")))
    return done


# -- running ------------------------------------------------------------------------------------


def run_ask(args: argparse.Namespace) -> int:
    _check_args(args)
    if args.questions:
        return _run_batch(args)
    image = _load(args.image, args.max_pixels)
    engine = _engine(args)
    try:
        result = _ask(engine, image, args.image, args.question, options=args.options, mode=args.mode)
    finally:
        _closing(engine)
    if args.json:
        print(result.model_dump_json(indent=2))
    else:
        print(result.answer)
        print(_summary(result), file=sys.stderr)
    _print_warnings(result.warnings)
    if not (args.annotate or args.open):
        return 0
    target = args.annotate or _temporary_png()
    with warnings.catch_warnings():  # a glyph the font lacks is drawn as a box; no need to say so
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        result.plot(image, source=args.image).savefig(target)
    print(f"wrote the figure to {target}", file=sys.stderr)
    return _open(target) if args.open else 0


def _load(source: str, max_pixels: int | None) -> Image.Image:
    """The image, downscaled to `max_pixels` when it is larger and a limit was given."""
    from PIL import Image

    from df_agent.images import load_image

    if max_pixels is None:
        return load_image(source)
    image = load_image(source, max_pixels=max(Image.MAX_IMAGE_PIXELS or 0, max_pixels))
    pixels = image.width * image.height
    if pixels <= max_pixels:
        return image
    scale = (max_pixels / pixels) ** 0.5
    size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
    print(f"downscaled {image.width}x{image.height} to {size[0]}x{size[1]} (--max-pixels)", file=sys.stderr)
    return image.resize(size, Image.Resampling.LANCZOS)


def _engine(args: argparse.Namespace) -> DualFocus:
    """The engine the arguments ask for; with `--memory`, logging to it under each image's name."""
    from df_agent.engine import DualFocus

    memory = None
    if args.memory is not None:
        try:
            from df_agent.memory import VisualQAMemory
        except ImportError as err:
            raise UsageError(
                f"--memory needs the memory extra: pip install 'df-agent[memory]' ({err})"
            ) from None
        memory = _NamedMemory(VisualQAMemory(args.memory or None))
    return DualFocus.from_pretrained(
        args.model, device=args.device, arbitration=args.arbitration, memory=memory
    )


class _NamedMemory:
    """A memory that logs each result with the name of the image being asked about."""

    def __init__(self, memory: Any) -> None:
        self.memory = memory
        self.image_name: str | None = None

    def lookup(self, *args: Any, **kwargs: Any) -> FocusResult | None:
        return self.memory.lookup(*args, **kwargs)

    def log(self, result: FocusResult) -> str:
        return self.memory.log(result, image_name=self.image_name)

    def close(self) -> None:
        self.memory.close()


def _ask(engine: DualFocus, image: Image.Image, source: str, question: str, **kwargs: Any) -> FocusResult:
    if isinstance(engine.memory, _NamedMemory):
        engine.memory.image_name = None if source.startswith("data:") else Path(source).name
    return engine.ask(image, question, **kwargs)


def _closing(engine: DualFocus | None) -> None:
    if engine is not None and isinstance(engine.memory, _NamedMemory):
        engine.memory.close()  # every logged answer is in the store before the command returns


def _run_batch(args: argparse.Namespace) -> int:
    """`ask --questions FILE.jsonl`: one JSON line per question, in order; bad lines become errors."""
    from tqdm import tqdm

    from df_agent.images import ImageError

    path = Path(args.questions)
    lines = _read_batch(path)
    done = _answered(Path(args.output)) if args.resume else set()
    todo = [line for line in lines if line.key not in done]
    failed = sum(line.error is not None for line in todo)
    if args.resume:
        print(
            f"resuming: {len(lines) - len(todo)} of {len(lines)} questions already answered", file=sys.stderr
        )
    engine = _engine(args) if failed < len(todo) else None  # no model when nothing can run
    mode = "a" if args.resume else "w"
    out = Path(args.output).open(mode, encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
    shown: set[str] = set()  # each warning is printed once, not once per question
    try:
        for line in tqdm(todo, desc="ask", unit="q", file=sys.stderr, disable=not todo):
            if line.error is None:
                try:
                    image = _load(line.source, args.max_pixels)  # type: ignore[arg-type]
                    result = _ask(
                        engine, image, line.source, line.fields["question"],  # type: ignore[arg-type]
                        options=line.fields.get("options") or args.options,
                        mode=line.fields.get("mode", args.mode),
                    )  # fmt: skip
                except (ImageError, ValueError) as err:
                    line.error = str(err)
                    failed += 1
                else:
                    _print_warnings([w for w in result.warnings if w not in shown])
                    shown.update(result.warnings)
                    out.write(json.dumps({**line.head(), **result.model_dump(mode="json")}) + "\n")
            if line.error is not None:
                tqdm.write(f"{path}:{line.lineno}: {line.error}", file=sys.stderr)
                out.write(json.dumps({**line.head(), "error": line.error}) + "\n")
            out.flush()
    finally:
        if out is not sys.stdout:
            out.close()
        _closing(engine)
    if failed:
        print(
            f"df-agent ask: {failed} of {len(todo)} questions failed (their lines hold an 'error')",
            file=sys.stderr,
        )
        return 1
    return 0


def _print_warnings(warnings: Sequence[str]) -> None:
    """Each warning on its own stderr line (through tqdm, so a progress bar stays whole)."""
    from tqdm import tqdm

    from df_agent.backends.caveats import SHIPPED_MODEL_NOTE

    for warning in warnings:
        tqdm.write(f"{'note' if warning == SHIPPED_MODEL_NOTE else 'warning'}: {warning}", file=sys.stderr)


def _summary(result: FocusResult) -> str:
    from df_agent.visualize import box_label

    box = "none" if result.box is None else box_label(result.box)
    scores = ", ".join(f"{k} {v:.3f}" for k, v in result.scores.items()) if result.scores else "no vote"
    return (
        f"path={result.path} macro={result.macro_answer!r} micro={result.micro_answer!r} box={box} "
        f"scores (mean NLL)={scores} fallback={result.fallback!r} total={result.timings.get('total', 0):.3f}s"
    )


def _temporary_png() -> str:
    handle, name = tempfile.mkstemp(prefix="df-agent-", suffix=".png")
    os.close(handle)
    return name


def _open(path: str) -> int:
    """Open `path` in the system's viewer; 1 with a message saying why when there is none."""
    if sys.platform == "win32":
        os.startfile(path)  # type: ignore[attr-defined]
        return 0
    opener = shutil.which("open" if sys.platform == "darwin" else "xdg-open")
    display = sys.platform == "darwin" or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    why = None
    if opener is None:
        why = "no image viewer found (xdg-open is not installed)"
    elif not display:
        why = "no display to show it on (DISPLAY is not set)"
    else:
        try:
            failed = subprocess.run([opener, path], capture_output=True, timeout=30).returncode
        except subprocess.TimeoutExpired:
            failed = 0  # a viewer that keeps running has opened the file
        why = f"{Path(opener).name} could not open it (exit status {failed})" if failed else None
    if why is None:
        return 0
    print(f"df-agent ask: --open: {why}; the figure is at {path}: open it yourself", file=sys.stderr)
    return 1


# -- the command --------------------------------------------------------------------------------


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; of the other subcommands only the one named in `argv` is imported and built."""
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = argparse.ArgumentParser(prog="df-agent", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ask = sub.add_parser("ask", help="answer a question about an image with DualFocus")
    add_ask_arguments(ask)
    ask.set_defaults(handler=run_ask)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        command = sub.add_parser(name, help=help_text, add_help=name == chosen)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(command)
            command.set_defaults(handler=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `df-agent` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return args.handler(args)
    except (FileNotFoundError, ValueError, OSError) as err:  # ImageError and UsageError are ValueErrors
        print(f"df-agent {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
