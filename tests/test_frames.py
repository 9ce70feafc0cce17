"""Coordinate frames: boxes map between an image and its root through any chain of crops and views."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from df_agent.agents.registry import ImageRegistry
from df_agent.boxes import Box, BoxError
from df_agent.frames import Frame, cut, cut_region

ROOT_SIZE = (240, 180)


def noise(size: tuple[int, int] = ROOT_SIZE, seed: int = 0) -> Image.Image:
    """Every pixel different from its neighbours, so a crop one pixel off cannot compare equal."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@st.composite
def boxes_in(draw: st.DrawFn, size: tuple[int, int], whole: bool = False) -> Box:
    """A box of at least one pixel a side inside an image of `size` (integer edges if `whole`)."""
    w, h = size
    number = st.integers if whole else st.floats
    x1 = draw(number(0, w - 1))
    y1 = draw(number(0, h - 1))
    x2 = draw(number(x1 + 1, w))
    y2 = draw(number(y1 + 1, h))
    return Box(x1=x1, y1=y1, x2=x2, y2=y2)


@st.composite
def chains(draw: st.DrawFn, resized: bool = True) -> list[tuple[Box, tuple[int, int] | None]]:
    """1-4 steps: each a region of the previous image (whole pixels) and, sometimes, a size to resize to."""
    size, steps = ROOT_SIZE, []
    for _ in range(draw(st.integers(1, 4))):
        region = draw(boxes_in(size, whole=True))
        view = None
        if resized and draw(st.booleans()):
            view = (draw(st.integers(1, 300)), draw(st.integers(1, 300)))
        steps.append((region, view))
        size = view or (int(region.width), int(region.height))
    return steps


def close(a: Box, b: Box, tol: float = 1e-6) -> bool:
    return all(abs(x - y) <= tol * max(1.0, abs(y)) for x, y in zip(a.as_tuple(), b.as_tuple(), strict=True))


@settings(max_examples=200, deadline=None)
@given(chain=chains(), data=st.data())
def test_a_box_goes_to_the_root_and_back_through_any_chain(chain, data) -> None:
    frame, size = Frame(), ROOT_SIZE
    for region, view in chain:
        frame = Frame.of_region(region, view).within(frame)
        size = view or (int(region.width), int(region.height))
    box = data.draw(boxes_in(size))
    assert close(frame.from_root(frame.to_root(box)), box)
    # composing step by step is mapping step by step
    step_by_step = box
    for local in reversed([Frame.of_region(region, view) for region, view in chain]):
        step_by_step = local.to_root(step_by_step)
    assert close(step_by_step, frame.to_root(box))
    # the image's extent lies inside the root
    extent = frame.extent(size)
    assert extent.x1 >= -1e-6 and extent.y1 >= -1e-6
    assert extent.x2 <= ROOT_SIZE[0] + 1e-6 and extent.y2 <= ROOT_SIZE[1] + 1e-6


@settings(max_examples=100, deadline=None)
@given(chain=chains(resized=False), data=st.data())
def test_a_crop_of_a_crop_equals_the_same_region_cut_from_the_original(chain, data) -> None:
    root_image = noise()
    registry = ImageRegistry()
    registry.register(root_image, "root")
    entry, pixels = registry.get("root"), root_image
    for i, (region, _) in enumerate(chain):
        entry = registry.add_crop(entry, region, box_text=str(i))
        pixels = pixels.crop(region.as_int_tuple())  # cutting from the crop's own pixels, step by step
        assert entry.image.tobytes() == pixels.tobytes()
        assert entry.image.tobytes() == root_image.crop(entry.region.as_int_tuple()).tobytes()
        assert entry.frame.scale_x == entry.frame.scale_y == 1
    # a planner's box in the last crop maps to the root box that holds the same pixels
    box = data.draw(boxes_in(entry.image.size, whole=True))
    in_root = entry.frame.to_root(box)
    assert entry.image.crop(box.as_int_tuple()).tobytes() == root_image.crop(in_root.as_int_tuple()).tobytes()


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_crops_of_resized_views_are_cut_from_full_resolution(data) -> None:
    root_image = noise(seed=1)
    registry = ImageRegistry()
    registry.register(root_image, "root")
    entry = registry.get("root")
    for i in range(data.draw(st.integers(1, 4))):  # each step: a region of what the registry holds
        region = data.draw(boxes_in(entry.image.size, whole=True))
        view = data.draw(st.none() | st.tuples(st.integers(1, 300), st.integers(1, 300)))
        entry = registry.add_crop(entry, region, box_text=str(i), size=view)
        assert entry.image.size == (view or entry.image.size)
    box = data.draw(boxes_in(entry.image.size))
    crop = registry.add_crop(entry, box, box_text="last")
    expected = cut_region(entry.frame.to_root(box), ROOT_SIZE)
    assert crop.region == expected and crop.frame == Frame(x=expected.x1, y=expected.y1)
    assert crop.image.tobytes() == root_image.crop(expected.as_int_tuple()).tobytes()


def test_frames_compose_offsets_and_scales() -> None:
    view = Frame.of_region(Box(x1=100, y1=50, x2=300, y2=250), (50, 50))  # 4 root px per view px
    assert view == Frame(x=100, y=50, scale_x=4, scale_y=4)
    crop = Frame.of_region(Box(x1=10, y1=5, x2=20, y2=15)).within(view)
    assert crop == Frame(x=140, y=70, scale_x=4, scale_y=4)
    assert crop.to_root(Box(x1=0, y1=0, x2=10, y2=10)) == Box(x1=140, y1=70, x2=180, y2=110)
    assert crop.from_root(Box(x1=140, y1=70, x2=180, y2=110)) == Box(x1=0, y1=0, x2=10, y2=10)
    assert Frame().is_identity and not crop.is_identity


def test_bad_frames_and_regions_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="greater than 0"):
        Frame(scale_x=0)
    with pytest.raises(ValueError, match="finite"):
        Frame(x=float("nan"))
    with pytest.raises(BoxError, match="takes a Box"):
        Frame().to_root((0, 0, 1, 1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="does not lie within the 240x180 root"):
        cut(noise(), Box(x1=200, y1=0, x2=260, y2=10))
    with pytest.raises(ValueError, match="non-empty region"):
        Frame.of_region(Box(x1=0, y1=0, x2=10, y2=10), (0, 5))
