"""Box conventions of the chat models users run, Gemini's box_2d above all: a parsing table with
garbage cases, and format/parse round trips."""

from __future__ import annotations

import pytest

from df_agent.boxes import Box, BoxConvention, NoBox, format_box, parse_box

SIZE = (400, 200)  # width, height: y and x scale differently, so a swap shows
G = BoxConvention.GEMINI_1000

# text, expected box in pixels of the 400x200 image (x1, y1, x2, y2), or a word of the NoBox reason
TABLE = [
    ('[{"box_2d": [100, 250, 500, 750], "label": "cat"}]', (100, 20, 300, 100)),
    ('```json\n[\n  {"box_2d": [0, 0, 1000, 1000], "label": "all"}\n]\n```', (0, 0, 400, 200)),
    ("{'box_2d': [250, 100, 750, 900]}", (40, 50, 360, 150)),
    ('label "object 3": {"box_2d": [100, 250, 500, 750]}', (100, 20, 300, 100)),  # label digits skipped
    ('[{"box_2d": [100, 250, 500, 750]}, {"box_2d": [0, 0, 10, 10]}]', (100, 20, 300, 100)),  # first box
    ("[100, 250, 500, 750]", (100, 20, 300, 100)),  # bare list: still y first
    ('{"box_2d": [-20, 950, 500, 1050]}', (380, 0, 400, 100)),  # slightly outside: clipped
    ('{"box_2d": [100, 250, 500]}', "fewer than four"),
    ('{"box_2d": []}', "no numbers"),
    ("I cannot see a cat in this image.", "no numbers"),
    ("", "no numbers"),
    ('{"box_2d": [500, 250, 100, 750]}', "inverted"),  # ymax < ymin
    ('{"box_2d": [100, 750, 500, 250]}', "inverted"),  # xmax < xmin
    ('{"box_2d": [100, 250, 100, 750]}', "zero area"),
    ('{"box_2d": [100, 250, 500, 2000]}', "out of the gemini_1000 range"),
    ('{"box_2d": [0.1, 0.25, 0.5, 0.75]}', "less than one unit"),  # fractions in a 0..1000 frame
    ('{"box_2d": [nan, 250, 500, 750]}', "NaN"),
]


@pytest.mark.parametrize(("text", "expected"), TABLE)
def test_gemini_box_2d_table(text: str, expected: tuple | str) -> None:
    parsed = parse_box(text, G, SIZE)
    if isinstance(expected, str):
        assert isinstance(parsed, NoBox) and expected in parsed.reason
    else:
        assert isinstance(parsed, Box)
        assert parsed.as_tuple() == pytest.approx(expected, abs=1e-6)


def test_gemini_reads_box_2d_not_a_qwen_bbox_2d_in_the_same_text() -> None:
    text = '{"bbox_2d": [100, 200, 300, 400]} then {"box_2d": [100, 250, 500, 750]}'
    assert parse_box(text, G, SIZE).as_tuple() == pytest.approx((100, 20, 300, 100))
    # and the other conventions do not mistake box_2d's numbers for bbox_2d's
    assert parse_box(text, BoxConvention.JSON_1000, SIZE).as_tuple() == pytest.approx((40, 40, 120, 80))


@pytest.mark.parametrize("convention", list(BoxConvention))
def test_every_convention_round_trips_and_rejects_garbage(convention: BoxConvention) -> None:
    box = Box(x1=40, y1=30, x2=300, y2=170)
    input_size = (560, 280) if convention is BoxConvention.PIXELS else None
    text = format_box(box, convention, SIZE, input_size)
    back = parse_box(text, convention, SIZE, input_size)
    assert isinstance(back, Box)
    assert back.as_tuple() == pytest.approx(box.as_tuple(), abs=3)  # rounding of the written values
    for garbage in ("no box here", "[1, 2]", "box: [nan, nan, nan, nan]", "[[[["):
        assert isinstance(parse_box(garbage, convention, SIZE, input_size), NoBox)


def test_gemini_format_writes_y_first() -> None:
    text = format_box(Box(x1=100, y1=20, x2=300, y2=100), G, SIZE)
    assert text == '[{"box_2d": [100, 250, 500, 750]}]'
