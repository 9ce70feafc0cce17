"""Coordinate frames: where an image (a crop, a crop of a crop, a resized view) sits in its root image.

A `Frame` maps an image's pixels to its root image's pixels: ``root = offset + scale * local`` per axis.
The root's own frame is the identity; a crop cut at ``(x1, y1)`` is an offset with scale 1; a view
resized from a region adds a scale (root pixels per view pixel). Frames compose
(`Frame.within`), so a crop of a crop knows its place in the root, and `to_root` / `from_root` move a
`Box` between the two frames exactly (up to float rounding). Pure geometry: this module knows boxes and
images only.
"""

from __future__ import annotations

import math

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from df_agent.boxes import Box, BoxError


class Frame(BaseModel):
    """The transform from an image's pixels to its root image's pixels.

    ``x_root = x + scale_x * x_local`` and ``y_root = y + scale_y * y_local``.

    Attributes:
        x: Where the image's left edge lies in the root, in root pixels.
        y: Where the image's top edge lies in the root, in root pixels.
        scale_x: Root pixels per image pixel, horizontally (1 for a crop, >1 for a shrunk view).
        scale_y: Root pixels per image pixel, vertically.
    """

    model_config = ConfigDict(frozen=True)

    x: float = 0.0
    y: float = 0.0
    scale_x: float = Field(default=1.0, gt=0)
    scale_y: float = Field(default=1.0, gt=0)

    @model_validator(mode="after")
    def _finite(self) -> Frame:
        if not all(math.isfinite(v) for v in (self.x, self.y, self.scale_x, self.scale_y)):
            raise ValueError(f"a frame's offset and scale must be finite, got {self.model_dump()}")
        return self

    @classmethod
    def of_region(cls, region: Box, size: tuple[int, int] | None = None) -> Frame:
        """The frame of an image showing `region` of its parent, resized to `size` (default: not resized).

        Args:
            region: The region in the parent's pixels.
            size: ``(width, height)`` of the image made from it; None: the region's own size (scale 1).

        Returns:
            The image's frame relative to its parent (compose with `within` for the root).
        """
        region = _box(region, "Frame.of_region")
        if size is None:
            return cls(x=region.x1, y=region.y1)
        w, h = size
        if w <= 0 or h <= 0 or region.width <= 0 or region.height <= 0:
            raise ValueError(f"a resized view needs a non-empty region and size, got {region} and {size}")
        return cls(x=region.x1, y=region.y1, scale_x=region.width / w, scale_y=region.height / h)

    @property
    def is_identity(self) -> bool:
        """Whether the image is its root (no offset, no scale)."""
        return self == Frame()

    def within(self, parent: Frame) -> Frame:
        """This frame (image -> parent) followed by `parent` (parent -> root): image -> root."""
        return Frame(
            x=parent.x + parent.scale_x * self.x,
            y=parent.y + parent.scale_y * self.y,
            scale_x=parent.scale_x * self.scale_x,
            scale_y=parent.scale_y * self.scale_y,
        )

    def to_root(self, box: Box) -> Box:
        """`box` in this image's pixels as a box in the root image's pixels."""
        box = _box(box, "Frame.to_root")
        return Box(
            x1=self.x + self.scale_x * box.x1,
            y1=self.y + self.scale_y * box.y1,
            x2=self.x + self.scale_x * box.x2,
            y2=self.y + self.scale_y * box.y2,
        )

    def from_root(self, box: Box) -> Box:
        """`box` in the root image's pixels as a box in this image's pixels (it may lie outside it)."""
        box = _box(box, "Frame.from_root")
        return Box(
            x1=(box.x1 - self.x) / self.scale_x,
            y1=(box.y1 - self.y) / self.scale_y,
            x2=(box.x2 - self.x) / self.scale_x,
            y2=(box.y2 - self.y) / self.scale_y,
        )

    def extent(self, size: tuple[int, int]) -> Box:
        """The region of the root an image of `size` ``(width, height)`` in this frame shows, root pixels."""
        w, h = size
        return self.to_root(Box(x1=0, y1=0, x2=w, y2=h))


def cut(root: Image.Image, region: Box, size: tuple[int, int] | None = None) -> Image.Image:
    """The `region` (root pixels) cut from the root's full-resolution pixels, resized to `size` if given.

    A region with fractional edges is cut at its integer hull (`Box.as_int_tuple`), as
    `df_agent.boxes.crop` does; the resize (if any) is bicubic.

    Raises:
        BoxError: If `region` is not a `Box`.
        ValueError: If `region` does not lie within the root image (within a hundredth of a pixel).
    """
    region = _box(region, "cut")
    w, h = root.size
    eps = 1e-2
    if region.x1 < -eps or region.y1 < -eps or region.x2 > w + eps or region.y2 > h + eps:
        raise ValueError(f"region {region} does not lie within the {w}x{h} root image")
    x1, y1, x2, y2 = _hull(region, w, h)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"region {region} is smaller than one pixel of the {w}x{h} root image")
    piece = root.crop((x1, y1, x2, y2))
    if size is not None and tuple(size) != piece.size:
        piece = piece.resize(tuple(size), Image.Resampling.BICUBIC)
    return piece


def cut_region(region: Box, root_size: tuple[int, int]) -> Box:
    """The region `cut` really cuts for `region`: its integer hull, clipped to the root (root pixels)."""
    x1, y1, x2, y2 = _hull(_box(region, "cut_region"), *root_size)
    return Box(x1=x1, y1=y1, x2=x2, y2=y2)


def _hull(region: Box, w: int, h: int) -> tuple[int, int, int, int]:
    # Round edges within float noise of an integer to it, so composed frames cut the exact pixels.
    def snap(v: float) -> float:
        return float(round(v)) if abs(v - round(v)) < 1e-6 else v

    x1, y1 = math.floor(snap(region.x1)), math.floor(snap(region.y1))
    x2, y2 = math.ceil(snap(region.x2)), math.ceil(snap(region.y2))
    return max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)


def _box(box: object, where: str) -> Box:
    if not isinstance(box, Box):
        raise BoxError(f"{where} takes a Box, not {type(box).__name__} ({box!r:.80})")
    return box


__all__ = ["Frame", "cut", "cut_region"]
