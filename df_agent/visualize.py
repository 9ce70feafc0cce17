"""Drawing a result's region on its image, for `--annotate`, notebooks and tools."""

from __future__ import annotations

from PIL import Image, ImageDraw

from df_agent.results import FocusResult


def annotate(image: Image.Image, result: FocusResult, *, width: int | None = None) -> Image.Image:
    """A copy of `image` with the predicted region (red) and the crop (yellow) drawn on it."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    width = width or max(2, round(max(out.size) / 160))
    if result.crop_box is not None:
        draw.rectangle(result.crop_box.as_tuple(), outline=(255, 200, 0), width=width)
    if result.box is not None:
        draw.rectangle(result.box.as_tuple(), outline=(230, 20, 20), width=width)
    return out


__all__ = ["annotate"]
