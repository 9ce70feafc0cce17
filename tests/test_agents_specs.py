"""The tool specs: one input model per tool, checked against its operation, shared by every adapter."""

from __future__ import annotations

import pytest
from conftest import ScriptedBackend
from pydantic import ValidationError

from df_agent.agents.inputs import AskInput, FocusedInput, ZoomInput
from df_agent.agents.operations import Toolbox
from df_agent.agents.specs import BY_NAME, DESCRIPTIONS, SPECS, ToolSpec, offered_specs
from df_agent.data.focusshapes import render_scene
from df_agent.engine import DualFocus

SCENE = render_scene("specs-test")


def scripted_toolbox(**backend) -> Toolbox:
    toolbox = Toolbox(DualFocus(ScriptedBackend(**backend)))
    toolbox.registry.register(SCENE.image, "scene")
    return toolbox


def test_every_spec_runs_its_toolbox_operation_and_is_described() -> None:
    assert [s.name for s in SPECS] == [
        "dualfocus_answer", "global_answer", "zoom_region", "focused_answer", "arbitrate_answers",
        "recall_visual_qa",
    ]  # fmt: skip
    for spec in SPECS:
        assert spec.operation is getattr(Toolbox, spec.name)
        assert spec.description == DESCRIPTIONS[spec.name] and len(spec.description) > 100
        assert spec.input.model_config["extra"] == "forbid"


def test_a_spec_whose_operation_takes_another_model_fails_at_construction() -> None:
    with pytest.raises(TypeError, match=r"takes .*ZoomInput.*not AskInput"):
        ToolSpec("zoom_region", AskInput, Toolbox.zoom_region)


def test_recall_is_offered_only_over_a_searchable_memory() -> None:
    class Recalling:
        def recall(self, query, image=None, k=5):
            return []

    class LookupOnly:
        def lookup(self, *args, **kwargs):
            return None

        def log(self, result):
            return "id"

    names = [s.name for s in offered_specs(scripted_toolbox())]
    assert "recall_visual_qa" not in names and len(names) == 5
    assert offered_specs(Toolbox(DualFocus(ScriptedBackend(), memory=LookupOnly()))) == list(SPECS[:5])
    assert offered_specs(Toolbox(DualFocus(ScriptedBackend(), memory=Recalling()))) == list(SPECS)


def test_call_validates_a_dict_and_runs_the_operation() -> None:
    toolbox = scripted_toolbox(macro="red")
    answer = BY_NAME["global_answer"].call(toolbox, {"image": "scene", "question": "  Which colour?  "})
    assert answer.answer == "red" and answer.question == "Which colour?"
    args = ZoomInput(image="scene", question="Q?")
    assert BY_NAME["zoom_region"].parse(args) is args


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({"image": "scene", "question": "Q?", "colour": "red"}, "colour: unknown argument"),
        ({"image": "scene"}, "question: Field required"),
        ({"image": "scene", "question": "   "}, "question: String should have at least 1 character"),
        ({"image": "scene", "question": "Q?", "box": [1, 2]}, "box: List should have at least 4 items"),
        ({"image": "scene", "question": "Q?", "options": ["a", " "]}, "options.1: String should have"),
        ({"image": "scene", "question": "Q?", "options": list("abcdefghijklmnopqrstuvwxyz!")},
         "options: List should have at most 26 items"),
    ],
)  # fmt: skip
def test_explain_names_each_bad_argument_and_what_the_tool_takes(arguments: dict, expected: str) -> None:
    spec = BY_NAME["focused_answer"]
    with pytest.raises(ValidationError) as error:
        spec.parse(arguments)
    message = spec.explain(error.value)
    assert message.startswith("Invalid arguments (") and expected in message
    assert "focused_answer takes: image, question, crop_id, box, box_units, box_frame, options." in message


def test_field_descriptions_reach_the_schema() -> None:
    properties = FocusedInput.model_json_schema()["properties"]
    assert all(len(field["description"]) > 30 for field in properties.values())
    assert properties["box_units"]["enum"] == ["pixels", "fraction"]
