"""The notebooks: committed with outputs cleared, and each runs top to bottom in a fresh kernel.

They load the shipped model (`DualFocus.from_pretrained()`). Until it is in `df_agent/model/`, the
kernel is pointed at a tiny random model instead, by a set-up cell this test runs first (the notebook
files are not changed): the pipeline, the drawing, the memory and the plots all still run, only the
answers are random.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["quickstart", "agent", "evaluate"]


def shipped_model_exists() -> bool:
    from df_agent.backends.hf import shipped_model_path

    try:
        shipped_model_path()
    except FileNotFoundError:
        return False
    return True


def test_every_notebook_is_listed() -> None:
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_committed_with_outputs_cleared(name: str) -> None:
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, "a notebook without code"
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert notebook.metadata.kernelspec.name == "python3"


def kernel_spec_is_this_python() -> None:
    """The python3 kernel spec must start this interpreter, so the kernel sees df-agent."""
    from jupyter_client.kernelspec import KernelSpecManager

    command = KernelSpecManager().get_kernel_spec("python3").argv[0]
    # jupyter_client runs a bare "python"/"python3" as sys.executable
    same = command in ("python", "python3") or Path(command).resolve() == Path(sys.executable).resolve()
    assert same, f"the python3 kernel runs {command}, not {sys.executable}"


def outputs(notebook: nbformat.NotebookNode, index: int) -> list[dict]:
    return notebook.cells[index].outputs


def mime_types(notebook: nbformat.NotebookNode) -> set[str]:
    return {
        mime
        for cell in notebook.cells
        if cell.cell_type == "code"
        for o in cell.outputs
        for mime in o.get("data", {})
    }


def text_of(notebook: nbformat.NotebookNode) -> str:
    chunks = []
    for cell in notebook.cells:
        for o in cell.get("outputs", []):
            chunks.append(o.get("text", "") + o.get("data", {}).get("text/plain", ""))
    return "\n".join(chunks)


@pytest.fixture(scope="module")
def setup_source(tmp_path_factory: pytest.TempPathFactory) -> str | None:
    """A first cell pointing the default model at a tiny one, or None when the shipped model is there."""
    if shipped_model_exists():
        return None
    from tiny_models import tiny_llava

    path = tiny_llava(tmp_path_factory.mktemp("notebook-model"))
    return (
        "import df_agent.backends.hf as _hf\n"
        "from pathlib import Path as _Path\n"
        f"_hf.shipped_model_path = lambda: _Path({str(path)!r})"
    )


def stderr_of(notebook: nbformat.NotebookNode) -> list[str]:
    """Every stderr stream the cells wrote (warnings, text progress bars)."""
    return [
        o.get("text", "")
        for cell in notebook.cells
        for o in cell.get("outputs", [])
        if o.get("output_type") == "stream" and o.get("name") == "stderr"
    ]


def assert_quiet(notebook: nbformat.NotebookNode) -> None:
    """No warnings, and progress only as widgets (one per loop), never as lines of text bars."""
    err = "".join(stderr_of(notebook))
    assert "Warning" not in err and "it/s" not in err and "|" not in err, err[:2000]


def execute(name: str, setup_source: str | None) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    kernel_spec_is_this_python()
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    if setup_source is not None:
        notebook.cells.insert(0, nbformat.v4.new_code_cell(setup_source, id="test-setup"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    client = NotebookClient(
        notebook, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()
    if setup_source is not None:
        notebook.cells.pop(0)
    return notebook


@pytest.mark.slow
def test_quickstart_runs_and_shows_the_annotated_image(setup_source: str | None) -> None:
    notebook = execute("quickstart", setup_source)
    assert_quiet(notebook)
    cells = notebook.cells
    explained = next(i for i, c in enumerate(cells) if c.cell_type == "code" and "result.plot(" in c.source)
    assert "image/png" in outputs(notebook, explained)[0]["data"]  # the figure that explains the zoom
    assert "warning: df-agent/focusshapes-small is a demonstration model" in text_of(notebook)
    text = text_of(notebook)
    assert "What number is on the red circle? -> " in text
    assert "macro (whole image): " in text and "scores: " in text
    assert text.count("scene_") >= 9  # one line per example question
    assert "answered from memory: True" in text
    assert "'What number is on the red circle?' -> " in text  # recalled from memory


@pytest.mark.slow
def test_agent_notebook_runs_the_scripted_planner(setup_source: str | None) -> None:
    text = text_of(execute("agent", setup_source))
    assert "planner calls: global_answer, zoom_region" in text
    assert "[global_answer] Answer from the whole image: " in text
    assert "ai: " in text  # the planner's final reply
    assert "Answer: " in text  # the whole pipeline as one tool


@pytest.mark.slow
def test_evaluate_notebook_runs_a_small_focusshapes_evaluation(setup_source: str | None) -> None:
    notebook = execute("evaluate", setup_source)
    assert_quiet(notebook)
    assert "image/png" in mime_types(notebook)  # the plot
    widgets = [m for m in mime_types(notebook) if "widget" in m]
    assert widgets, "the evaluation's progress shows as one widget bar"
    text = text_of(notebook)
    assert "category" in text and "oracle" in text and "detail" in text
    assert "mean IoU on detail questions" in text
    assert "picked {'macro': " in text
