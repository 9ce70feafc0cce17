"""Pictures of a result: the region on the image (`annotate`) and a figure that explains the zoom.

`figure(result, image)` is what `df-agent ask --annotate OUT.png` writes and `FocusResult.plot`
returns: the image with the model's box and the crop region (a legend says which is which), the
crop beside it at readable size, the question, both candidates with their scores, the answer,
why no vote ran when none did, the result's warnings and the image's path.
"""

from __future__ import annotations

import functools
import io
import os
import textwrap
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw

from df_agent.boxes import Box, crop
from df_agent.images import load_image

if TYPE_CHECKING:  # results imports this module (FocusResult.plot): no import back at run time
    from matplotlib.figure import Figure

    from df_agent.results import FocusResult

BOX_COLOUR = "#e6141e"  # the model's box: red, solid
CROP_COLOUR = "#ffc800"  # the crop region: yellow, dashed
FIGURE_INCHES = (12.0, 7.5)
FIGURE_DPI = 100  # so a saved figure is 1200 x 750 pixels


def annotate(image: Image.Image, result: FocusResult, *, width: int | None = None) -> Image.Image:
    """A copy of `image` with the model's box (red) and the crop region (yellow) drawn on it."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    width = width or max(2, round(max(out.size) / 160))
    if result.crop_box is not None:
        draw.rectangle(result.crop_box.as_tuple(), outline=CROP_COLOUR, width=width)
    if result.box is not None:
        draw.rectangle(result.box.as_tuple(), outline=BOX_COLOUR, width=width)
    return out


def figure(
    result: FocusResult, image: Image.Image | str | os.PathLike, *, source: str | None = None
) -> Figure:
    """One figure that explains `result`: image and regions, the crop, the question, both answers.

    Args:
        result: The result of `DualFocus.ask` on `image`.
        image: The image asked about, or its path (the crop is cut from it again when
            `result.crop` is unset, e.g. for a result from memory).
        source: Where the image came from, printed under the figure (default: `image` if a path).

    Returns:
        A matplotlib figure of `FIGURE_INCHES` at `FIGURE_DPI` (1200 x 750 pixels when saved);
        it is not registered with pyplot, so save it (`fig.savefig(path)`) or display it.
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    if not isinstance(image, Image.Image):
        source = source or str(image)
    picture = load_image(image)
    fig = _shown_as_png()(figsize=FIGURE_INCHES, dpi=FIGURE_DPI)
    grid = fig.add_gridspec(
        3, 2, height_ratios=[3.2, 0.3, 1.5], hspace=0.1, wspace=0.08, left=0.04, right=0.96
    )
    left, right = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    key, text = fig.add_subplot(grid[1, :]), fig.add_subplot(grid[2, :])
    fig.suptitle(_wrap(f"Q: {result.question}", 100), fontsize=14, fontweight="bold")

    left.imshow(picture, interpolation="nearest")
    left.set_title(f"whole image ({picture.width}x{picture.height} px)", fontsize=11)
    handles = []
    for box, colour, style, label in (
        (result.box, BOX_COLOUR, "-", "model's box (where it says the answer is)"),
        (result.crop_box, CROP_COLOUR, "--", "crop region (what the micro answer saw)"),
    ):
        if box is None:
            continue
        x1, y1, x2, y2 = box.as_tuple()
        left.add_patch(
            Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=2.5,
                      linestyle=style)
        )  # fmt: skip
        handles.append(
            Line2D([], [], color=colour, linestyle=style, linewidth=2.5, label=f"{label}: {box_label(box)}")
        )
    key.axis("off")
    if handles:
        key.legend(handles=handles, loc="center", ncol=len(handles), fontsize=10, frameon=False)

    zoomed = result.crop if result.crop is not None else _recrop(picture, result.crop_box)
    if zoomed is not None:
        right.imshow(zoomed, interpolation="nearest")
        scale = max(picture.size) / max(zoomed.size)
        right.set_title(f"the crop, shown {scale:.1f}x ({zoomed.width}x{zoomed.height} px)", fontsize=11)
        for spine in right.spines.values():
            spine.set(edgecolor=CROP_COLOUR, linewidth=3, linestyle="--")
    else:
        right.text(0.5, 0.5, "no crop: the zoom did not run", ha="center", va="center", fontsize=12)
    for axis in (left, right):
        axis.set_xticks([])
        axis.set_yticks([])

    text.axis("off")
    text.text(
        0, 1, "\n".join(_caption(result, source)), va="top", ha="left", fontsize=10.5, family="monospace"
    )
    return fig


@functools.cache
def _shown_as_png() -> type[Figure]:
    """A matplotlib `Figure` that notebooks display as a PNG (one not made by pyplot shows no picture)."""
    from matplotlib.figure import Figure

    class ShownFigure(Figure):
        def _repr_png_(self) -> bytes:
            buffer = io.BytesIO()
            self.savefig(buffer, format="png")
            return buffer.getvalue()

    return ShownFigure


def box_label(box: Box) -> str:
    """A box for display: whole pixels, ``(x1, y1)-(x2, y2)``."""
    x1, y1, x2, y2 = (round(v) for v in box.as_tuple())
    return f"({x1}, {y1})-({x2}, {y2})"


def _caption(result: FocusResult, source: str | None) -> list[str]:
    scores = result.scores or {}
    lines = []
    for path, label, answer in (
        ("macro", "macro (whole image)", result.macro_answer),
        ("micro", "micro (the crop)   ", result.micro_answer),
    ):
        if answer is None:
            continue
        score = f"mean NLL {scores[path]:.3f}" if path in scores else "not scored"
        mark = "<- chosen" if result.path == path else ""
        lines.append(f"{label}: {answer!r:24s} {score:18s} {mark}")
    how = "lower mean NLL wins" if scores else (result.fallback or "no vote")
    lines.append(_wrap(f"answer: {result.answer!r} ({result.path} path; {how})", 112))
    lines.extend(_wrap(f"warning: {warning}", 112) for warning in result.warnings)
    lines.append(f"image: {source or 'not a file'}  (model: {result.model_id}, mode: {result.mode})")
    return lines


def _recrop(image: Image.Image, crop_box: Box | None) -> Image.Image | None:
    return None if crop_box is None else crop(image, crop_box)


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.wrap(text, width, subsequent_indent="  ")) or text


__all__ = ["BOX_COLOUR", "CROP_COLOUR", "FIGURE_DPI", "FIGURE_INCHES", "annotate", "box_label", "figure"]
