"""`examples/` is what `make_examples.py` writes, and the README's Python examples run on a fresh clone."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_script():
    spec = importlib.util.spec_from_file_location("make_examples", EXAMPLES / "make_examples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_regenerating_gives_the_committed_files(tmp_path: Path) -> None:
    lines = load_script().main(tmp_path)
    assert (tmp_path / "questions.jsonl").read_text() == (EXAMPLES / "questions.jsonl").read_text()
    for k in range(3):
        with Image.open(tmp_path / f"scene_{k}.png") as new, Image.open(EXAMPLES / f"scene_{k}.png") as old:
            assert new.size == old.size == (320, 320) and new.tobytes() == old.tobytes()
    assert [line["category"] for line in lines] == ["detail", "global", "exist"] * 3


def test_scene_0_answers_the_demo_question() -> None:
    first = json.loads((EXAMPLES / "questions.jsonl").read_text().splitlines()[0])
    assert (first["image"], first["question"]) == ("scene_0.png", "What number is on the red circle?")
    assert first["answer"].isdigit()
    x1, y1, x2, y2 = first["box"]
    with Image.open(EXAMPLES / "scene_0.png") as scene:  # the box holds the red circle's pixels
        region = np.asarray(scene.convert("RGB").crop((x1, y1, x2, y2))).astype(int)
    red = (region[..., 0] > 200) & (region[..., 1] < 60) & (region[..., 2] < 60)
    assert red.mean() > 0.5


# -- the README's Python examples, run as a new user would, from a fresh folder ---------------------

README = EXAMPLES.parent / "README.md"
_MARK = re.compile(r"<!-- example: (?P<kind>run|openai|skip)(?: \((?P<reason>[^)]+)\))? -->\n$")


def readme_examples() -> list[tuple[int, str, str, str]]:
    """Every ```python block of the README: (line, kind, reason, code); kind from the comment above it."""
    text = README.read_text(encoding="utf-8")
    found = []
    for match in re.finditer(r"```python\n(.*?)```", text, re.S):
        before = text[: match.start()]
        line = before.count("\n") + 1
        previous = before.splitlines(keepends=True)[-1] if before else ""
        mark = _MARK.match(previous)
        kind, reason = (mark["kind"], mark["reason"] or "") if mark else ("run", "")
        found.append((line, kind, reason, match.group(1)))
    return found


def test_every_skipped_example_says_why() -> None:
    examples = readme_examples()
    assert sum(kind != "skip" for _, kind, _, _ in examples) >= 3  # the quickstart, memory, the agent
    assert all(reason for _, kind, reason, _ in examples if kind == "skip")


class ScriptedPlanner(BaseHTTPRequestHandler):
    """An OpenAI chat-completions endpoint that plans like a model would: one tool call, then a reply."""

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        messages = body["messages"]
        tool_results = [m for m in messages if m["role"] == "tool"]
        if not tool_results:
            user = next(m for m in messages if m["role"] == "user")
            text = user["content"] if isinstance(user["content"], str) else user["content"][0]["text"]
            image = re.search(r"img-[\w-]+", text).group(0)
            arguments = json.dumps({"image": image, "question": "What number is on the red circle?"})
            call = {
                "id": "call-1",
                "type": "function",
                "function": {"name": "dualfocus_answer", "arguments": arguments},
            }
            message = {"role": "assistant", "content": None, "tool_calls": [call]}
            finish = "tool_calls"
        else:
            content = tool_results[-1]["content"]
            content = content if isinstance(content, str) else json.dumps(content)
            message, finish = {"role": "assistant", "content": f"The tool says: {content[:200]}"}, "stop"
        reply = {
            "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }  # fmt: skip
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def planner_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedPlanner)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("line", "kind", "reason", "code"),
    readme_examples(),
    ids=[f"README.md:{e[0]}" for e in readme_examples()],
)
def test_readme_example_runs(
    line: int, kind: str, reason: str, code: str, tmp_path: Path, planner_url: str
) -> None:
    if kind == "skip":
        pytest.skip(f"README.md:{line}: {reason}")
    (tmp_path / "examples").symlink_to(EXAMPLES, target_is_directory=True)  # a fresh folder, the examples
    env = {
        **os.environ,
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",
        "MPLBACKEND": "Agg",
    }
    if kind == "openai":  # the hosted planner, played by a local scripted server
        env |= {"OPENAI_BASE_URL": planner_url, "OPENAI_API_KEY": "test-key"}
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280
    )
    assert run.returncode == 0, f"README.md:{line} failed:\n{run.stderr[-3000:]}"
    if kind == "openai":  # the planner called the tool and answered with what it returned
        assert "The tool says:" in run.stdout and "Answer" in run.stdout, run.stdout[-2000:]
