"""Write the example FocusShapes scenes and questions in this folder.

    python examples/make_examples.py [OUT_DIR]

Writes ``scene_0.png``, ``scene_1.png``, ``scene_2.png`` and ``questions.jsonl`` (one detail, one global
and one exist question per scene: ``{id, image, question, answer, category, box}``, boxes in pixels).
Scene 0 holds a red circle and its detail question asks for the number on it, the question
``make demo`` asks. The output is a pure function of the seeds below, so running it again rewrites
the same files. ``questions.jsonl`` serves both ``df-agent ask --questions`` and
``df-agent eval jsonl --questions``.
"""

from __future__ import annotations

import json
import random
import sys
from itertools import count
from pathlib import Path

from df_agent.data.focusshapes import Scene, detail_record, render_scene, scene_records

SEED = "examples"
N_SCENES = 3
DEMO_OBJECT = "red circle"


def first_scene_with(name: str) -> Scene:
    """The first example scene (``examples-0``, ``examples-1``, ...) that holds the object `name`."""
    for k in count():
        scene = render_scene(f"{SEED}-{k}", scene_id=f"{SEED}-{k}")
        if any(obj.name == name for obj in scene.objects):
            return scene
    raise AssertionError("unreachable")


def main(out_dir: Path) -> list[dict]:
    """Write the scenes and the questions to `out_dir`; return the question lines."""
    out_dir.mkdir(parents=True, exist_ok=True)
    demo = first_scene_with(DEMO_OBJECT)
    scenes = [demo] + [
        render_scene(f"{SEED}-extra-{k}", scene_id=f"{SEED}-extra-{k}") for k in range(1, N_SCENES)
    ]
    lines = []
    for index, scene in enumerate(scenes):
        image = f"scene_{index}.png"
        scene.image.save(out_dir / image, optimize=True)
        rng = random.Random(f"{SEED}-questions-{index}")
        records = scene_records(scene, rng, exist_yes=index % 2 == 0)
        if index == 0:  # the demo question: the number on the red circle
            target = next(obj for obj in scene.objects if obj.name == DEMO_OBJECT)
            records[0] = detail_record(scene, target)
        for record in records:
            lines.append(
                {
                    "id": f"scene_{index}-{record.qtype}",
                    "image": image,
                    "question": record.question,
                    "answer": record.answer,
                    "category": record.qtype,
                    "box": [round(v) for v in record.box],
                }
            )
    (out_dir / "questions.jsonl").write_text(
        "".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8"
    )
    return lines


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent
    for line in main(target):
        print(f"{line['image']}: {line['question']} -> {line['answer']}")
