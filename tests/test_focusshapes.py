"""FocusShapes: determinism, geometry, question balance, and digits that need a zoom."""

from __future__ import annotations

import numpy as np
import pytest

from df_agent.data.focusshapes import COLORS, SHAPES, generate, render_scene, write_dataset
from df_agent.data.format import read_records


@pytest.fixture(scope="module")
def data():
    return generate(seed=11, n_scenes=40)


def test_same_seed_same_scene_and_questions(data):
    scenes, records = data
    again_scenes, again_records = generate(seed=11, n_scenes=40)
    assert [r.model_dump() for r in records] == [r.model_dump() for r in again_records]
    assert np.array_equal(np.asarray(scenes[3].image), np.asarray(again_scenes[3].image))
    other = render_scene("another seed")
    assert not np.array_equal(np.asarray(other.image), np.asarray(scenes[0].image))


def test_objects_do_not_overlap_and_pairs_are_unique(data):
    scenes, _ = data
    for scene in scenes:
        assert 3 <= len(scene.objects) <= 6
        pairs = [(o.shape, o.color) for o in scene.objects]
        assert len(set(pairs)) == len(pairs)
        assert all(o.shape in SHAPES and o.color in COLORS for o in scene.objects)
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1 :]:
                disjoint = (
                    a.box[2] <= b.box[0]
                    or b.box[2] <= a.box[0]
                    or a.box[3] <= b.box[1]
                    or b.box[3] <= a.box[1]
                )
                assert disjoint, (a, b)


def test_boxes_contain_their_object_and_digit(data):
    scenes, _ = data
    for scene in scenes:
        for index, obj in enumerate(scene.objects, 1):
            ys, xs = np.nonzero(scene.object_map == index)
            assert len(xs) > 0
            x1, y1, x2, y2 = obj.box
            assert x1 <= xs.min() and xs.max() <= x2 and y1 <= ys.min() and ys.max() <= y2
            dx1, dy1, dx2, dy2 = obj.digit_box
            assert x1 <= dx1 and dx2 <= x2 + 1 and y1 <= dy1 and dy2 <= y2 + 1


def test_question_types_answers_and_balance(data):
    scenes, records = data
    assert {r.qtype for r in records} == {"detail", "global", "exist"}
    exist = [r.answer for r in records if r.qtype == "exist"]
    assert abs(exist.count("yes") - exist.count("no")) <= 1
    by_scene = {s.id: s for s in scenes}
    for r in records:
        scene = by_scene[r.image.split("/")[-1].removesuffix(".png")]
        if r.qtype == "detail":
            obj = next(o for o in scene.objects if f"the {o.name}?" in r.question)
            assert r.answer == str(obj.digit) and r.box == tuple(float(v) for v in obj.box)
        elif r.question.startswith("How many"):
            assert r.answer == str(len(scene.objects)) and r.box == (0.0, 0.0, 320.0, 320.0)
        elif r.qtype == "exist":
            present = any(f" {o.name}?" in r.question for o in scene.objects)
            assert r.answer == ("yes" if present else "no")
            assert r.box == (0.0, 0.0, 320.0, 320.0)


def test_digit_is_tiny_at_model_resolution_and_readable_in_a_crop(data):
    scenes, _ = data
    for scene in scenes[:10]:
        for obj in scene.objects:
            _, dy1, _, dy2 = obj.digit_box
            scale_full = 64 / scene.size[0]
            assert (dy2 - dy1) * scale_full < 4  # under 4 px tall at 64x64: illegible
            crop_side = max(obj.box[2] - obj.box[0], obj.box[3] - obj.box[1]) + 50
            assert (dy2 - dy1) * 64 / crop_side >= 6  # at least 6 px tall in the zoomed crop


def test_write_dataset(tmp_path):
    path = write_dataset(tmp_path / "fs", seed=3, n_scenes=4)
    records = list(read_records(path))
    assert len(records) == 12
    assert all((path.parent / r.image).is_file() for r in records)
