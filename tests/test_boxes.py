"""Tests for df_agent.boxes: parsing every convention, garbage, round trips, zoom invariants."""

from __future__ import annotations

import pydantic
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from df_agent.boxes import (
    Box,
    BoxConvention,
    BoxError,
    NoBox,
    NoBoxError,
    crop,
    fit_box,
    format_box,
    parse_box,
    parse_boxes,
    read_boxes,
    readable_boxes,
    zoom_box,
)

C = BoxConvention
SIZE = (640, 480)

GOOD = [
    # (text, convention, image_size, input_size, expected x1, y1, x2, y2 in original pixels)
    ("[0.12,0.34,0.56,0.78]", C.FRACTION, SIZE, None, (76.8, 163.2, 358.4, 374.4)),
    ("The region is [0.25, 0.5, 0.75, 1.0].", C.FRACTION, SIZE, None, (160, 240, 480, 480)),
    ("[-0.02,0.10,0.50,1.04]", C.FRACTION, SIZE, None, (0, 48, 320, 480)),  # partly outside: clipped
    ("x1=0.1, y1=0.2, x2=0.5, y2=0.6", C.FRACTION, SIZE, None, (64, 96, 320, 288)),
    ("1e-1 2E-1 5e-1 6e-1", C.FRACTION, SIZE, None, (64, 96, 320, 288)),
    ("[0.100, 0.200, 0.500, 0.600]", C.SQUARE_FRACTION, SIZE, None, (64, 48, 320, 304)),
    ("[0.000, 0.125, 1.000, 0.875]", C.SQUARE_FRACTION, SIZE, None, (0, 0, 640, 480)),
    ("[0.125, 0.000, 0.875, 1.000]", C.SQUARE_FRACTION, (480, 640), None, (0, 0, 480, 640)),
    ("[0.2, 0.05, 0.4, 0.3]", C.SQUARE_FRACTION, SIZE, None, (128, 0, 256, 112)),  # partly in padding
    ("<|box_start|>(100,200),(300,400)<|box_end|>", C.QWEN_1000, SIZE, None, (64, 96, 192, 192)),
    (
        "<|object_ref_start|>person 1<|object_ref_end|><|box_start|>(0,0),(1000,1000)<|box_end|>",
        C.QWEN_1000,
        SIZE,
        None,
        (0, 0, 640, 480),
    ),
    ("<ref>cat</ref><box>(500,500),(750,1000)</box>", C.QWEN_1000, SIZE, None, (320, 240, 480, 480)),
    ("(100,200),(300,400)", C.QWEN_1000, SIZE, None, (64, 96, 192, 192)),
    (
        '```json\n[{"bbox_2d": [10, 20, 110, 220], "label": "cat 2"}]\n```',
        C.PIXELS,
        SIZE,
        (320, 240),
        (20, 40, 220, 440),
    ),
    ('{"bbox_2d": [64, 48, 320, 240]}', C.PIXELS, SIZE, None, (64, 48, 320, 240)),
    ('[{"label": "sign 3", "bbox_2d": [0, 0, 160, 120]}]', C.PIXELS, SIZE, (320, 240), (0, 0, 320, 240)),
    (
        '```json\n[\n  {"bbox_2d": [250, 500, 750, 1000], "label": "dog"}\n]\n```',
        C.JSON_1000,
        SIZE,
        None,
        (160, 240, 480, 480),
    ),
    ("{'bbox_2d': [100, 200, 300, 400]}", C.JSON_1000, SIZE, None, (64, 96, 192, 192)),
    ("[100, 200, 300, 400]", C.JSON_1000, SIZE, None, (64, 96, 192, 192)),
]


@pytest.mark.parametrize(("text", "convention", "image_size", "input_size", "expected"), GOOD)
def test_parse_box_good(text, convention, image_size, input_size, expected):
    box = parse_box(text, convention, image_size, input_size)
    assert isinstance(box, Box), box
    assert box.as_tuple() == pytest.approx(expected)


GARBAGE = [
    # (text, convention, input_size, words the reason must contain)
    ("", C.FRACTION, None, "no numbers"),
    ("I don't know", C.FRACTION, None, "no numbers"),
    ("None", C.FRACTION, None, "no numbers"),
    ("x1, y1, x2, y2", C.FRACTION, None, "no numbers"),
    ("[0.1,0.2]", C.FRACTION, None, "fewer than four"),
    ('{"bbox_2d": [1, 2, 3]}', C.JSON_1000, None, "fewer than four"),
    ("nan,nan,nan,nan", C.FRACTION, None, "NaN"),
    ("[0.1, 0.2, inf, 0.4]", C.FRACTION, None, "infinite"),
    ("[0.1,0.2,1e999,0.4]", C.FRACTION, None, "infinite"),
    ("[0.5,0.5,0.2,0.9]", C.FRACTION, None, "inverted"),
    ("<|box_start|>(300,400),(100,500)<|box_end|>", C.QWEN_1000, None, "inverted"),
    ("[0.2,0.5,0.2,0.9]", C.FRACTION, None, "zero area"),
    ("[1.02,0.2,1.08,0.5]", C.FRACTION, None, "outside the image"),
    ("[-0.08,-0.09,-0.01,-0.02]", C.FRACTION, None, "outside the image"),
    ("[0.1, 0.0, 0.5, 0.1]", C.SQUARE_FRACTION, None, "outside the image"),  # all in the padding
    ('{"bbox_2d": [400, 300, 500, 400]}', C.PIXELS, (320, 240), "outside the image"),
    ("[35,1,50,60]", C.FRACTION, None, "out of the fraction range"),
    ("[-0.5,-0.5,-0.2,-0.2]", C.FRACTION, None, "out of the fraction range"),
    ("<|box_start|>(100,200),(2000,400)<|box_end|>", C.QWEN_1000, None, "out of the qwen_1000 range"),
    ("word " * 200_000 + "0.5", C.FRACTION, None, "fewer than four"),
    ("blah " * 200_000, C.FRACTION, None, "no numbers"),
]


@pytest.mark.parametrize(("text", "convention", "input_size", "reason"), GARBAGE)
def test_parse_box_garbage(text, convention, input_size, reason):
    result = parse_box(text, convention, SIZE, input_size)
    assert isinstance(result, NoBox)
    assert reason in result.reason


@pytest.mark.parametrize("value", [None, 42, 0.5, b"[0.1,0.2,0.3,0.4]", ["0.1", "0.2", "0.3", "0.4"]])
def test_parse_box_non_str_gives_nobox(value):
    result = parse_box(value, C.FRACTION, SIZE)
    assert isinstance(result, NoBox)
    assert "not text" in result.reason


@given(text=st.text(max_size=200), convention=st.sampled_from(list(C)))
@settings(max_examples=200, deadline=None)
def test_parse_box_never_raises_and_stays_inside(text, convention):
    result = parse_box(text, convention, SIZE, (320, 240))
    if isinstance(result, Box):
        assert 0 <= result.x1 < result.x2 <= SIZE[0]
        assert 0 <= result.y1 < result.y2 <= SIZE[1]


@pytest.mark.parametrize("bad_size", [(0, 10), (10, -1), (10.5, 10), (10,), None])
def test_parse_box_rejects_bad_image_size(bad_size):
    with pytest.raises(ValueError, match="image_size"):
        parse_box("[0.1,0.2,0.3,0.4]", C.FRACTION, bad_size)


def test_format_box_exact_text():
    box = Box(x1=76.8, y1=163.2, x2=358.4, y2=374.4)
    assert format_box(box, C.FRACTION, SIZE) == "[0.12,0.34,0.56,0.78]"
    assert format_box(Box(x1=64, y1=48, x2=320, y2=304), C.SQUARE_FRACTION, SIZE) == (
        "[0.100, 0.200, 0.500, 0.600]"
    )
    box = Box(x1=64, y1=96, x2=192, y2=192)
    assert format_box(box, C.QWEN_1000, SIZE) == "<|box_start|>(100,200),(300,400)<|box_end|>"
    assert format_box(box, C.JSON_1000, SIZE) == '[{"bbox_2d": [100, 200, 300, 400]}]'
    assert format_box(box, C.PIXELS, SIZE, (320, 240)) == '[{"bbox_2d": [32, 48, 96, 96]}]'


@st.composite
def _box_in_image(draw, min_frac=0.0):
    """An image size and a box inside it whose sides are at least `min_frac` of the image's."""
    w = draw(st.integers(1, 4000))
    h = draw(st.integers(1, 4000))
    fx1, fy1 = draw(st.floats(0, 1 - min_frac)), draw(st.floats(0, 1 - min_frac))
    fx2 = draw(st.floats(min(fx1 + min_frac, 1.0), 1))
    fy2 = draw(st.floats(min(fy1 + min_frac, 1.0), 1))
    return (w, h), Box(x1=fx1 * w, y1=fy1 * h, x2=fx2 * w, y2=fy2 * h)


# The most one coordinate may move in a format/parse round trip, as a fraction of the image side.
_QUANTUM = {
    C.FRACTION: 0.005,
    C.SQUARE_FRACTION: 0.0005,
    C.QWEN_1000: 0.0005,
    C.JSON_1000: 0.0005,
    C.GEMINI_1000: 0.0005,
}


@pytest.mark.parametrize("convention", list(C))
@given(data=st.data())
@settings(max_examples=60, deadline=None)
def test_format_parse_round_trip(convention, data):
    (w, h), box = data.draw(_box_in_image(min_frac=0.1))
    input_size = None
    if convention is C.PIXELS:
        input_size = (data.draw(st.integers(28, 1400)), data.draw(st.integers(28, 1400)))
        tol_x, tol_y = 0.5 * w / input_size[0], 0.5 * h / input_size[1]
    else:
        side = max(w, h) if convention is C.SQUARE_FRACTION else None
        tol_x = _QUANTUM[convention] * (side or w)
        tol_y = _QUANTUM[convention] * (side or h)
    assume(box.width > 4 * tol_x and box.height > 4 * tol_y)  # wider than the convention's resolution
    assume(box.width > 1 + 2 * tol_x and box.height > 1 + 2 * tol_y)  # read back, still >= 1 pixel
    text = format_box(box, convention, (w, h), input_size)
    parsed = parse_box(text, convention, (w, h), input_size)
    assert isinstance(parsed, Box), (text, parsed)
    for got, want, tol in zip(parsed.as_tuple(), box.as_tuple(), (tol_x, tol_y, tol_x, tol_y), strict=True):
        assert abs(got - want) <= tol + 1e-6


@given(
    case=_box_in_image(),
    margin=st.integers(0, 50),
    min_side=st.integers(0, 500),
)
@settings(max_examples=300, deadline=None)
def test_zoom_box_invariants(case, margin, min_side):
    (w, h), box = case
    assume(box.x2 > 0 and box.y2 > 0 and box.x1 < w and box.y1 < h)  # inside, if only a point
    z = zoom_box(box, (w, h), margin=margin, min_side=min_side)
    assert all(v == int(v) for v in z.as_tuple())
    assert 0 <= z.x1 <= z.x2 <= w and 0 <= z.y1 <= z.y2 <= h
    assert z.width >= min(min_side, w) and z.height >= min(min_side, h)
    assert z.x1 <= box.x1 and z.y1 <= box.y1 and z.x2 >= box.x2 and z.y2 >= box.y2


@pytest.mark.parametrize(
    ("box", "size", "margin", "min_side", "expected"),
    [
        ((100, 100, 150, 120), (1000, 1000), 25, 0, (75, 60, 175, 160)),  # square, then 25 px margin
        ((0, 0, 10, 40), (100, 100), 25, 0, (0, 0, 50, 65)),  # clipped at the corner
        ((10, 10, 20, 20), (300, 200), 0, 224, (0, 0, 224, 200)),  # min side, shifted inside
        ((280, 90, 290, 100), (300, 200), 0, 100, (200, 45, 300, 145)),  # shifted left
        ((0, 0, 640, 480), (640, 480), 25, 0, (0, 0, 640, 480)),  # whole image
    ],
)
def test_zoom_box_examples(box, size, margin, min_side, expected):
    x1, y1, x2, y2 = box
    z = zoom_box(Box(x1=x1, y1=y1, x2=x2, y2=y2), size, margin=margin, min_side=min_side)
    assert z.as_tuple() == expected


def test_box_properties():
    box = Box(x1=1.5, y1=2.5, x2=10.2, y2=20.0)
    assert box.width == pytest.approx(8.7)
    assert box.height == 17.5
    assert box.area == pytest.approx(8.7 * 17.5)
    assert box.center == pytest.approx((5.85, 11.25))
    assert box.as_int_tuple() == (1, 2, 11, 20)
    assert box.normalized((20, 40)) == pytest.approx((0.075, 0.0625, 0.51, 0.5))
    with pytest.raises(pydantic.ValidationError):
        box.x1 = 0  # frozen
    with pytest.raises(pydantic.ValidationError, match="inverted"):
        Box(x1=5, y1=0, x2=1, y2=1)
    assert Box.model_validate_json(box.model_dump_json()) == box
    assert NoBox(reason="no numbers in the model output").model_dump() == {
        "reason": "no numbers in the model output"
    }


def test_iou():
    a = Box(x1=0, y1=0, x2=2, y2=1)
    b = Box(x1=1, y1=0, x2=3, y2=1)
    assert a.iou(a) == 1.0
    assert a.iou(b) == pytest.approx(1 / 3)
    assert b.iou(a) == a.iou(b)
    assert a.iou(Box(x1=5, y1=5, x2=6, y2=6)) == 0.0
    assert a.iou(Box(x1=2, y1=0, x2=3, y2=1)) == 0.0  # touching edges
    assert a.iou(Box(x1=0.5, y1=0.25, x2=1.5, y2=0.75)) == pytest.approx(0.25)  # contained
    point = Box(x1=1, y1=1, x2=1, y2=1)
    assert point.iou(point) == 0.0


def test_crop():
    image = Image.new("RGB", (40, 30))
    assert crop(image, Box(x1=1.5, y1=2.5, x2=10.2, y2=20.0)).size == (10, 18)
    assert crop(image, Box(x1=30, y1=20, x2=60, y2=60)).size == (10, 10)  # clipped to the image
    with pytest.raises(NoBoxError, match="does not overlap") as info:
        crop(image, Box(x1=50, y1=50, x2=60, y2=60))
    assert isinstance(info.value, ValueError) and "does not overlap" in info.value.no_box.reason


@pytest.mark.parametrize(
    "box",
    [(700, 10, 800, 50), (-90, -90, -10, -10), (10, 500, 50, 600), (640, 0, 700, 480), (0, -5, 640, 0)],
)
def test_zoom_box_outside_the_image_is_no_box_not_a_corner_crop(box):
    x1, y1, x2, y2 = box
    with pytest.raises(NoBoxError, match="outside the 640x480 image") as info:
        zoom_box(Box(x1=x1, y1=y1, x2=x2, y2=y2), SIZE)
    assert isinstance(info.value.no_box, NoBox)
    assert isinstance(fit_box(Box(x1=x1, y1=y1, x2=x2, y2=y2), SIZE), NoBox)


def test_fit_box_clips_or_says_why_not():
    assert fit_box(Box(x1=-10, y1=5, x2=30, y2=600), SIZE) == Box(x1=0, y1=5, x2=30, y2=480)
    tiny = fit_box(Box(x1=10, y1=10, x2=10.4, y2=20), SIZE)
    assert isinstance(tiny, NoBox) and "smaller than one pixel" in tiny.reason


@pytest.mark.parametrize(
    ("text", "convention", "input_size", "reason"),
    [
        ('{"bbox_2d": [0.1, 0.2, 0.5, 0.6]}', C.PIXELS, (320, 240), "they look like 0-1 fractions"),
        ("[0.1, 0.2, 0.5, 0.6]", C.PIXELS, None, "less than one unit wide or high in the pixels frame"),
        ("<|box_start|>(100,200),(100.5,400)<|box_end|>", C.QWEN_1000, None, "less than one unit"),
        ('[{"bbox_2d": [0.2, 0.2, 0.9, 0.9]}]', C.JSON_1000, None, "0-1 fractions"),
        ("[0.5,0.5,0.5001,0.9]", C.FRACTION, None, "smaller than one pixel"),
    ],
)
def test_a_box_degenerate_in_the_frame_it_was_read_in_is_no_box(text, convention, input_size, reason):
    result = parse_box(text, convention, SIZE, input_size)
    assert isinstance(result, NoBox), result
    assert reason in result.reason


NOT_BOXES = ["[0.1,0.2,0.3,0.4]", (1, 2, 3, 4), [1, 2, 3, 4], {"x1": 1, "y1": 2, "x2": 3, "y2": 4}, None, 7,
             NoBox(reason="no numbers")]  # fmt: skip


@pytest.mark.parametrize("value", NOT_BOXES)
def test_box_functions_take_only_a_box(value):
    image = Image.new("RGB", SIZE)
    calls = [
        lambda: zoom_box(value, SIZE),
        lambda: crop(image, value),
        lambda: format_box(value, C.FRACTION, SIZE),
        lambda: fit_box(value, SIZE),
        lambda: Box(x1=0, y1=0, x2=1, y2=1).iou(value),
    ]
    for call in calls:
        with pytest.raises(BoxError, match="takes a Box, not") as info:
            call()
        assert isinstance(info.value, TypeError)


@given(text=st.one_of(st.text(max_size=80), st.binary(max_size=40).map(lambda b: b.decode("latin-1"))),
       convention=st.sampled_from(list(C)))  # fmt: skip
@settings(max_examples=200, deadline=None)
def test_garbage_text_gives_a_box_of_at_least_a_pixel_or_a_reason(text, convention):
    result = parse_box(text, convention, SIZE, (320, 240))
    if isinstance(result, NoBox):
        assert result.reason
    else:
        assert result.width >= 1 and result.height >= 1
        assert result.x1 >= 0 and result.x2 <= SIZE[0] and result.y1 >= 0 and result.y2 <= SIZE[1]
        z = zoom_box(result, SIZE)
        assert crop(Image.new("RGB", SIZE), z).size == (z.width, z.height)


# --- several boxes in one reply (parse_boxes, read_boxes) ------------------------------------------

MANY = [
    # (text, convention, input_size, expected boxes in original pixels of the 640x480 image)
    (
        '```json\n[\n  {"bbox_2d": [100, 200, 300, 400], "label": "cat 1"},\n'
        '  {"bbox_2d": [500, 500, 750, 1000], "label": "cat 2"}\n]\n```',
        C.JSON_1000, None, [(64, 96, 192, 192), (320, 240, 480, 480)],
    ),
    (
        '[{"bbox_2d": [10, 20, 110, 220], "label": "sign"}, '
        '{"label": "car 3", "bbox_2d": [160, 120, 320, 240]}]',
        C.PIXELS, (320, 240), [(20, 40, 220, 440), (320, 240, 640, 480)],
    ),
    (
        '[{"box_2d": [200, 100, 400, 300], "label": "a"}, {"box_2d": [500, 500, 1000, 750], "label": "b 2"}]',
        C.GEMINI_1000, None, [(64, 96, 192, 192), (320, 240, 480, 480)],
    ),
    (
        "<|object_ref_start|>dog 1<|object_ref_end|><|box_start|>(100,200),(300,400)<|box_end|>"
        "<|object_ref_start|>dog 2<|object_ref_end|><|box_start|>(500,500),(750,1000)<|box_end|>",
        C.QWEN_1000, None, [(64, 96, 192, 192), (320, 240, 480, 480)],
    ),
    ("<box>(0,0),(500,500)</box> and <box>(500,500),(1000,1000)</box>", C.QWEN_1000, None,
     [(0, 0, 320, 240), (320, 240, 640, 480)]),
    ("[0.10,0.20,0.30,0.40] [0.50,0.50,0.75,1.00]", C.FRACTION, None,
     [(64, 96, 192, 192), (320, 240, 480, 480)]),
    ("Regions: [0.100, 0.200, 0.500, 0.600], [0.000, 0.125, 1.000, 0.875]", C.SQUARE_FRACTION, None,
     [(64, 48, 320, 304), (0, 0, 640, 480)]),
    # nested: one key whose value is a list of boxes, or a bare list of lists
    ('{"bbox_2d": [[100, 200, 300, 400], [500, 500, 750, 1000]]}', C.JSON_1000, None,
     [(64, 96, 192, 192), (320, 240, 480, 480)]),
    ("[[0.10,0.20,0.30,0.40],[0.50,0.50,0.75,1.00]]", C.FRACTION, None,
     [(64, 96, 192, 192), (320, 240, 480, 480)]),
    ("[[100, 200, 300, 400], [500, 500, 750, 1000], [0, 0, 1000, 1000]]", C.JSON_1000, None,
     [(64, 96, 192, 192), (320, 240, 480, 480), (0, 0, 640, 480)]),
]  # fmt: skip


@pytest.mark.parametrize(("text", "convention", "input_size", "expected"), MANY)
def test_parse_boxes_reads_every_box(text, convention, input_size, expected):
    boxes = parse_boxes(text, convention, SIZE, input_size)
    assert isinstance(boxes, list), boxes
    assert [b.as_tuple() for b in boxes] == [pytest.approx(e) for e in expected]
    assert boxes[0] == parse_box(text, convention, SIZE, input_size)  # parse_box: the first box


MANY_GARBAGE = [
    # (text, convention, boxes kept, the dropped boxes' reasons, in order)
    (  # truncated JSON: the last box cut off by the token budget
        '[{"bbox_2d": [100, 200, 300, 400], "label": "a"}, {"bbox_2d": [500, 50',
        C.JSON_1000, [(64, 96, 192, 192)], ["fewer than four numbers"],
    ),
    (  # cut off right after the key
        '[{"bbox_2d": [100, 200, 300, 400]}, {"bbox_2d": ', C.JSON_1000, [(64, 96, 192, 192)], ["not a list"],
    ),
    (  # mixed: valid, out of range, inverted, less than a unit, valid
        '[{"bbox_2d": [100, 200, 300, 400]}, {"bbox_2d": [100, 200, 3000, 400]}, '
        '{"bbox_2d": [300, 400, 100, 200]}, {"bbox_2d": [0.2, 0.2, 0.9, 0.9]}, '
        '{"bbox_2d": [0, 0, 500, 500]}]',
        C.JSON_1000, [(64, 96, 192, 192), (0, 0, 320, 240)],
        ["out of the json_1000 range", "inverted", "0-1 fractions"],
    ),
    (  # a box outside the image (pixels of a 320x240 input) and a null box
        '[{"bbox_2d": null}, {"bbox_2d": [400, 300, 500, 400]}, {"bbox_2d": [0, 0, 160, 120]}]',
        C.PIXELS, [(0, 0, 320, 240)], ["not a list", "outside the image"],
    ),
    (  # duplicates are read once
        "<|box_start|>(100,200),(300,400)<|box_end|><|box_start|>(100,200),(300,400)<|box_end|>"
        "<|box_start|>(0,0),(500,500)<|box_end|>",
        C.QWEN_1000, [(64, 96, 192, 192), (0, 0, 320, 240)], ["the same box as box 1"],
    ),
    ("[0.1,0.1,0.3,0.3] [0.1,0.1,0.3,0.3]", C.FRACTION, [(64, 48, 192, 144)], ["the same box as box 1"]),
    (  # Gemini: box_2d lists, never a bbox_2d in the same text
        '[{"bbox_2d": [0, 0, 10, 10]}, {"box_2d": [200, 100, 400, 300]}, {"box_2d": [nan, 0, 10, 10]}]',
        C.GEMINI_1000, [(64, 96, 192, 192)], ["NaN"],
    ),
    (  # fraction groups: a cut-off last group
        "[0.10,0.20,0.30,0.40] [0.50,0.50,0.75,1.00] [0.3", C.FRACTION,
        [(64, 96, 192, 192), (320, 240, 480, 480)], ["fewer than four numbers"],
    ),
]  # fmt: skip


@pytest.mark.parametrize(("text", "convention", "kept", "reasons"), MANY_GARBAGE)
def test_parse_boxes_drops_unreadable_boxes_and_says_why(text, convention, kept, reasons):
    input_size = (320, 240) if convention is C.PIXELS else None
    readings = read_boxes(text, convention, SIZE, input_size)
    boxes = parse_boxes(text, convention, SIZE, input_size)
    assert [b.as_tuple() for b in boxes] == [pytest.approx(k) for k in kept]
    assert [r for r in readings if isinstance(r, Box)] == boxes
    dropped = [r.reason for r in readings if isinstance(r, NoBox)]
    assert len(dropped) == len(reasons)
    for reason, words in zip(dropped, reasons, strict=True):
        assert words in reason


@pytest.mark.parametrize(
    ("text", "convention"),
    [
        ('[{"bbox_2d": [1, 2, 3]}, {"bbox_2d": [300, 400, 100, 200]}]', C.JSON_1000),
        ("<|box_start|>(100,200),(2000,400)<|box_end|><|box_start|>(1,1),(1,1)<|box_end|>", C.QWEN_1000),
        ('[{"box_2d": [100, 250, 500]}, {"box_2d": []}]', C.GEMINI_1000),
    ],
)
def test_parse_boxes_with_no_readable_box_names_each_fault(text, convention):
    result = parse_boxes(text, convention, SIZE)
    assert isinstance(result, NoBox)
    assert (
        "none of the 2 boxes" in result.reason and "box 1: " in result.reason and "box 2: " in result.reason
    )


@pytest.mark.parametrize(("text", "convention", "image_size", "input_size", "expected"), GOOD)
def test_one_box_reads_as_parse_box_reads_it(text, convention, image_size, input_size, expected):
    assert parse_boxes(text, convention, image_size, input_size) == [
        parse_box(text, convention, image_size, input_size)
    ]


@pytest.mark.parametrize(
    ("text", "convention", "input_size", "reason"),
    [g for g in GARBAGE if len(g[0]) < 1000],  # the long ones are the single-box tests' business
)
def test_one_unreadable_box_gives_parse_box_reason(text, convention, input_size, reason):
    assert parse_boxes(text, convention, SIZE, input_size) == parse_box(text, convention, SIZE, input_size)


def test_fraction_fragments_read_as_the_first_four_numbers():
    # one whole [..] group or none: not several boxes, so the text reads as parse_box reads it
    for text in ("[0.1,0.2] [0.3,0.4]", "[0.1,0.2,0.3,0.4] [0.5]", "[0.1, 0.2, 0.5, 0.6] (conf [0.9])"):
        assert parse_boxes(text, C.FRACTION, SIZE) == [parse_box(text, C.FRACTION, SIZE)]


def test_readable_boxes_of_no_readings():
    assert isinstance(readable_boxes([]), NoBox)


def _written_together(texts: list[str], convention: BoxConvention) -> str:
    """Several boxes written as a model of `convention` writes them in one reply."""
    if convention in (C.PIXELS, C.JSON_1000, C.GEMINI_1000):  # one JSON list of objects
        return "[" + ", ".join(t.removeprefix("[").removesuffix("]") for t in texts) + "]"
    return ("" if convention is C.QWEN_1000 else "\n").join(texts)


@pytest.mark.parametrize("convention", list(C))
@given(data=st.data())
@settings(max_examples=40, deadline=None)
def test_several_boxes_round_trip(convention, data):
    w, h = data.draw(st.integers(64, 2000)), data.draw(st.integers(64, 2000))
    input_size = (
        (data.draw(st.integers(56, 1400)), data.draw(st.integers(56, 1400)))
        if convention is C.PIXELS
        else None
    )
    if convention is C.PIXELS:
        tol_x, tol_y = 0.5 * w / input_size[0], 0.5 * h / input_size[1]
    else:
        side = max(w, h) if convention is C.SQUARE_FRACTION else None
        tol_x, tol_y = _QUANTUM[convention] * (side or w), _QUANTUM[convention] * (side or h)
    boxes = []
    for _ in range(data.draw(st.integers(1, 4))):
        fx1, fy1 = data.draw(st.floats(0, 0.8)), data.draw(st.floats(0, 0.8))
        fx2, fy2 = data.draw(st.floats(fx1 + 0.15, 1)), data.draw(st.floats(fy1 + 0.15, 1))
        boxes.append(Box(x1=fx1 * w, y1=fy1 * h, x2=fx2 * w, y2=fy2 * h))
    texts = [format_box(b, convention, (w, h), input_size) for b in boxes]
    assume(len(set(texts)) == len(texts))  # no two written the same
    text = _written_together(texts, convention)
    parsed = parse_boxes(text, convention, (w, h), input_size)
    assert isinstance(parsed, list) and len(parsed) == len(boxes), (text, parsed)
    for got, want in zip(parsed, boxes, strict=True):
        for a, b, tol in zip(got.as_tuple(), want.as_tuple(), (tol_x, tol_y, tol_x, tol_y), strict=True):
            assert abs(a - b) <= tol + 1e-6


@given(text=st.text(max_size=200), convention=st.sampled_from(list(C)))
@settings(max_examples=200, deadline=None)
def test_read_boxes_never_raises_and_every_box_is_inside_and_new(text, convention):
    readings = read_boxes(text, convention, SIZE, (320, 240))
    assert readings
    if len(readings) == 1:
        assert readings[0] == parse_box(text, convention, SIZE, (320, 240))
    boxes = [r for r in readings if isinstance(r, Box)]
    assert len(set(boxes)) == len(boxes)
    for box in boxes:
        assert 0 <= box.x1 < box.x2 <= SIZE[0] and 0 <= box.y1 < box.y2 <= SIZE[1]
    assert all(r.reason for r in readings if isinstance(r, NoBox))
