"""Tests for the Visual Genome curation, on a tiny data set written in VG v1.2's own schema."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from df_agent.data.format import FocusRecord, read_records
from df_agent.data.visual_genome import (
    DROP_REASONS,
    CurationConfig,
    CurationReport,
    VisualGenomePaths,
    _iter_json_array,
    curate,
    main,
    report_path,
)

REPO = Path(__file__).resolve().parents[1]


def obj(
    object_id: int, name: str, x: int, y: int, w: int, h: int, synset: str | None = None, **extra: Any
) -> dict[str, Any]:
    """An object as objects.json and the QA files write it."""
    return {
        "object_id": object_id,
        "x": x,
        "y": y,
        "w": w,
        "h": h,
        "names": [name],
        "synsets": [synset or f"{name}.n.01"],
        **extra,
    }


# Image 1 (800x600): two cars told apart by colour, a duplicate box of the red car, a sky too
# large to zoom into, an ant too small to see, a man holding a frisbee (two regions), a dog.
OBJECTS_1 = [
    obj(10, "car", 100, 100, 200, 100),
    obj(11, "car", 500, 300, 150, 80),
    obj(12, "dog", 50, 400, 60, 40),
    obj(13, "sky", 0, 0, 800, 400),
    obj(14, "ant", 700, 500, 5, 5),
    obj(15, "man", 300, 200, 100, 250),
    obj(16, "frisbee", 420, 210, 30, 20),
    obj(17, "car", 102, 101, 198, 100),  # a second annotation of car 10 (IoU ~0.98)
]
# Image 2 (640x480): two tall people, a red sign and a plain one, a bench cut by the right
# edge, a kite outside the image.
OBJECTS_2 = [
    obj(20, "person", 50, 50, 100, 200),
    obj(21, "person", 300, 60, 100, 200),
    obj(22, "sign", 500, 20, 100, 60),
    obj(23, "sign", 20, 380, 100, 60),
    obj(24, "bench", 600, 400, 100, 100),
    obj(25, "kite", 700, 10, 50, 50),
]
# Image 3 (500x500): a cat, and a 10x10 button, 0.04% of the image.
OBJECTS_3 = [obj(30, "cat", 100, 100, 200, 150), obj(32, "button", 50, 50, 10, 10)]

ATTRIBUTES = {
    1: {10: ["red"], 11: ["Blue "]},
    2: {20: ["tall"], 21: ["tall"], 22: ["red"]},
}

QAS: dict[int, list[dict[str, Any]]] = {
    1: [
        # car 10 and its duplicate box 17 are one region; only car 10 is red, but the question
        # does not say so: dropped by default, kept under unique_or_mentioned (red is unique)
        {
            "qa_id": 1,
            "question": "What color is the car?",
            "answer": "Red.",
            "q_objects": [OBJECTS_1[0], OBJECTS_1[7]],
        },
        {
            "qa_id": 2,
            "question": "What is the man holding?",
            "answer": "A frisbee.",
            "a_objects": [OBJECTS_1[6]],
            "q_objects": [OBJECTS_1[5]],
        },
        {"qa_id": 3, "question": "What is in the sky?", "answer": "Clouds.", "q_objects": [OBJECTS_1[3]]},
        {"qa_id": 4, "question": "What is on the ground?", "answer": "An ant.", "a_objects": [OBJECTS_1[4]]},
        {"qa_id": 5, "question": "What is the weather like?", "answer": "Sunny."},
        # empty question wins over the region being too large
        {"qa_id": 6, "question": "   ", "answer": "Yes.", "q_objects": [OBJECTS_1[3]]},
        # kept: an id alone, resolved against objects.json
        {
            "qa_id": 7,
            "question": "What color is the dog?",
            "answer": "Brown.",
            "q_objects": [{"object_id": 12}],
        },
    ],
    2: [
        {
            "qa_id": 8,
            "question": "What is the person holding?",
            "answer": "An umbrella.",
            "q_objects": [OBJECTS_2[0]],
        },
        # dropped by default: "tall" is named, but both people are tall; kept under
        # unique_or_mentioned, which accepts any named attribute of the target
        {
            "qa_id": 9,
            "question": "What is the tall person wearing?",
            "answer": "A hat.",
            "q_objects": [OBJECTS_2[1]],
        },
        # kept under both rules: red is the target's alone (sign 23 has none), and named
        {
            "qa_id": 10,
            "question": "What does the red sign say?",
            "answer": "Stop.",
            "q_objects": [OBJECTS_2[2]],
        },
        {"qa_id": 11, "question": "What is flying?", "answer": "A kite.", "a_objects": [OBJECTS_2[5]]},
        # kept, box clipped to the image
        {
            "qa_id": 12,
            "question": "What is the bench made of?",
            "answer": "Wood.",
            "q_objects": [OBJECTS_2[4]],
        },
    ],
    99: [  # not in image_data.json: unknown_image wins over ungrounded
        {"qa_id": 13, "question": "What is this?", "answer": "A cat."},
    ],
    3: [
        {
            "qa_id": 14,
            "question": "Where is the cat?",
            "answer": "On the sofa.",
            "a_objects": [],
            "q_objects": [OBJECTS_3[0]],
        },
        # an id that neither the QA nor objects.json can place
        {
            "qa_id": 15,
            "question": "What is on the table?",
            "answer": "A cup.",
            "q_objects": [{"object_id": 999}],
        },
        {
            "qa_id": 16,
            "question": "What color is the button?",
            "answer": "Black.",
            "q_objects": [OBJECTS_3[1]],
        },
    ],
}

EXPECTED = {
    "empty_text": 1,  # 6
    "unknown_image": 1,  # 13
    "ungrounded": 2,  # 5, 15
    "multiple_regions": 1,  # 2
    "invalid_box": 1,  # 11
    "region_too_small": 2,  # 4 (5 px side), 16 (area fraction)
    "region_too_large": 1,  # 3
    "ambiguous_category": 3,  # 1 (red unnamed), 8 (nothing unique), 9 (tall named, not unique)
}
KEPT_BOXES = {
    "vg-7": (50.0, 400.0, 110.0, 440.0),
    "vg-10": (500.0, 20.0, 600.0, 80.0),
    "vg-12": (600.0, 400.0, 640.0, 480.0),  # clipped at 640x480
    "vg-14": (100.0, 100.0, 300.0, 250.0),
}
# The looser unique_or_mentioned rule also keeps 1 (red is unique) and 9 ("tall" is named).
LOOSE_EXPECTED = {**EXPECTED, "ambiguous_category": 1}  # 8
LOOSE_KEPT_BOXES = {
    **KEPT_BOXES,
    "vg-1": (100.0, 100.0, 300.0, 201.0),  # union of car 10 and its duplicate 17
    "vg-9": (300.0, 60.0, 400.0, 260.0),
}


def write_vg(
    folder: Path, *, with_attributes: bool = True, reverse_objects: bool = False, indent: int | None = None
) -> Path:
    """Write the fixture as VG v1.2 files; attributes live in attributes.json, as in VG."""
    folder.mkdir(parents=True, exist_ok=True)
    images = [
        {
            "image_id": 1,
            "width": 800,
            "height": 600,
            "url": "https://cs.stanford.edu/people/rak248/VG_100K/1.jpg",
        },
        {
            "image_id": 2,
            "width": 640,
            "height": 480,
            "url": "https://cs.stanford.edu/people/rak248/VG_100K_2/2.jpg",
        },
        {
            "image_id": 3,
            "width": 500,
            "height": 500,
            "url": "https://cs.stanford.edu/people/rak248/VG_100K/3.jpg",
        },
    ]
    per_image = {1: OBJECTS_1, 2: OBJECTS_2, 3: OBJECTS_3}
    objects = [{"image_id": i, "objects": objs} for i, objs in per_image.items()]
    attributes = [
        {
            "image_id": i,
            "attributes": [{**o, "attributes": ATTRIBUTES.get(i, {}).get(o["object_id"], [])} for o in objs],
        }
        for i, objs in per_image.items()
    ]
    qas = [{"id": i, "qas": [{**qa, "image_id": i} for qa in entries]} for i, entries in QAS.items()]
    if reverse_objects:
        objects.reverse()
        attributes.reverse()
    files = {"image_data": images, "objects": objects, "question_answers": qas}
    if with_attributes:
        files["attributes"] = attributes
    for name, data in files.items():
        (folder / f"{name}.json").write_text(json.dumps(data, indent=indent), encoding="utf-8")
    return folder


@pytest.fixture
def vg_dir(tmp_path: Path) -> Path:
    return write_vg(tmp_path / "vg")


def test_counts_per_reason_and_kept_records(vg_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "vg.jsonl"
    report = curate(vg_dir, out)

    assert report.dropped == EXPECTED
    assert list(report.dropped) == list(DROP_REASONS)
    assert report.kept == len(KEPT_BOXES)
    assert report.total == 16 == report.kept + sum(report.dropped.values())
    assert report.config.attribute_rule == "unique_and_mentioned"

    records = list(read_records(out))
    assert {r.id: r.box for r in records} == KEPT_BOXES
    by_id = {r.id: r for r in records}
    assert by_id["vg-7"].question == "What color is the dog?"
    assert by_id["vg-7"].answer == "Brown."
    assert by_id["vg-10"].question == "What does the red sign say?"
    assert (by_id["vg-12"].width, by_id["vg-12"].height) == (640, 480)
    for record in records:
        FocusRecord.model_validate(record.model_dump())
        assert record.source == "visual_genome"
        assert record.qtype == "other"
        assert record.image == f"{_image_of(record.id)}.jpg"

    saved = CurationReport.model_validate_json(report_path(out).read_text(encoding="utf-8"))
    assert saved == report
    assert report_path(out) == tmp_path / "out" / "vg.report.json"


def _image_of(record_id: str) -> int:
    qa_id = int(record_id.removeprefix("vg-"))
    return next(image for image, qas in QAS.items() if any(qa["qa_id"] == qa_id for qa in qas))


def test_attributes_disambiguate(tmp_path: Path) -> None:
    plain = write_vg(tmp_path / "plain", with_attributes=False)
    without = curate(plain, tmp_path / "plain.jsonl")
    # sign 10 loses its red: nothing tells it from sign 23, so it joins 1, 8 and 9
    assert without.dropped["ambiguous_category"] == 4
    assert without.kept == 3
    kept = {r.id for r in read_records(tmp_path / "plain.jsonl")}
    assert kept == {"vg-7", "vg-12", "vg-14"}
    # without attributes the looser rule has nothing to accept either
    loose = curate(
        plain, tmp_path / "plain-loose.jsonl", CurationConfig(attribute_rule="unique_or_mentioned")
    )
    assert loose.dropped["ambiguous_category"] == 4
    assert {r.id for r in read_records(tmp_path / "plain-loose.jsonl")} == kept


def test_loose_attribute_rule(vg_dir: Path, tmp_path: Path) -> None:
    config = CurationConfig(attribute_rule="unique_or_mentioned")
    out = tmp_path / "loose.jsonl"
    report = curate(vg_dir, out, config)
    # car 1: red is unique though unnamed; person 9: tall is named though shared; 8 stays dropped
    assert report.dropped == LOOSE_EXPECTED
    assert report.kept == len(LOOSE_KEPT_BOXES)
    assert report.total == 16 == report.kept + sum(report.dropped.values())
    by_id = {r.id: r for r in read_records(out)}
    assert {i: r.box for i, r in by_id.items()} == LOOSE_KEPT_BOXES
    assert by_id["vg-1"].question == "What color is the car?"
    assert by_id["vg-1"].answer == "Red."


def test_thresholds_are_configurable(vg_dir: Path, tmp_path: Path) -> None:
    config = CurationConfig(max_area_fraction=0.7, min_side_px=4, min_area_fraction=0.00001)
    report = curate(vg_dir, tmp_path / "loose.jsonl", config)
    assert report.dropped["region_too_large"] == 0
    assert report.dropped["region_too_small"] == 0
    # sky 3, ant 4 and button 16 are kept
    assert report.kept == len(KEPT_BOXES) + 3
    assert report.total == report.kept + sum(report.dropped.values())


def test_misaligned_files_and_explicit_paths(tmp_path: Path) -> None:
    folder = write_vg(tmp_path / "vg", reverse_objects=True, indent=2)
    paths = [folder / "question_answers.json", folder / "objects.json", folder / "image_data.json"]
    report = curate([*paths, folder / "attributes.json"], tmp_path / "a.jsonl")
    assert report.dropped == EXPECTED
    assert {r.id: r.box for r in read_records(tmp_path / "a.jsonl")} == KEPT_BOXES

    three = curate(paths, tmp_path / "b.jsonl")  # no attributes.json
    assert three.dropped["ambiguous_category"] == 4

    only_attributes = VisualGenomePaths(
        question_answers=paths[0], image_data=paths[2], attributes=folder / "attributes.json"
    )
    assert curate(only_attributes, tmp_path / "c.jsonl").dropped == EXPECTED


def test_image_pattern(vg_dir: Path, tmp_path: Path) -> None:
    config = CurationConfig(image_pattern="{url_dir}/{image_id}.jpg")
    curate(vg_dir, tmp_path / "p.jsonl", config)
    images = {r.id: r.image for r in read_records(tmp_path / "p.jsonl")}
    assert images["vg-7"] == "VG_100K/1.jpg"
    assert images["vg-12"] == "VG_100K_2/2.jpg"
    with pytest.raises(ValidationError):
        CurationConfig(image_pattern="{nope}.jpg")
    with pytest.raises(ValidationError):
        CurationConfig(min_area_fraction=0.6, max_area_fraction=0.5)


def test_missing_files(tmp_path: Path) -> None:
    (tmp_path / "question_answers.json").write_text("[]")
    with pytest.raises(FileNotFoundError, match=r"image_data\.json"):
        curate(tmp_path, tmp_path / "out.jsonl")


def test_duplicate_image_entries_are_refused(tmp_path: Path) -> None:
    folder = write_vg(tmp_path / "vg")
    qas = json.loads((folder / "question_answers.json").read_text())
    qas.append(qas[0])
    (folder / "question_answers.json").write_text(json.dumps(qas))
    with pytest.raises(ValueError, match="appears twice"):
        curate(folder, tmp_path / "out.jsonl")


@pytest.mark.parametrize("chunk", [1, 3, 7, 1 << 20])
def test_iter_json_array_matches_json_load(tmp_path: Path, chunk: int) -> None:
    data = [{"a": "x]y,[z", "b": [1, 2, {"c": None}]}, 12345, "é ünïcode", [], {}, 3.5e-3, True]
    path = tmp_path / "a.json"
    path.write_text(" \n[ " + ",\n  ".join(json.dumps(v, ensure_ascii=False) for v in data) + " ]\n", "utf-8")
    assert list(_iter_json_array(path, chunk_chars=chunk)) == data
    path.write_text(" [ ] ")
    assert list(_iter_json_array(path, chunk_chars=chunk)) == []


@pytest.mark.parametrize("text", ['{"a": 1}', "[1, 2", "[1 2]", '[{"a": }]', ""])
def test_iter_json_array_rejects_bad_files(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError):
        list(_iter_json_array(path, chunk_chars=2))


def test_main(vg_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.jsonl"
    assert main([str(vg_dir), str(out), "--attribute-rule", "unique_or_mentioned"]) == 0
    printed = CurationReport.model_validate_json(capsys.readouterr().out)
    assert printed.dropped == LOOSE_EXPECTED
    assert printed.config.attribute_rule == "unique_or_mentioned"


def test_module_runs_as_a_script(vg_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "script.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "df_agent.data.visual_genome", str(vg_dir), str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    report = CurationReport.model_validate_json(done.stdout)
    assert report.config.attribute_rule == "unique_and_mentioned"
    assert report.dropped == EXPECTED
    assert report.kept == sum(1 for _ in read_records(out)) == len(KEPT_BOXES)
