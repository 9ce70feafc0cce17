"""Shared fixtures: a scripted backend for engine logic, tiny random HF models for the real paths."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from df_agent.backends.base import Abilities, Backend, Conversation, Generation, Request
from df_agent.boxes import BoxConvention

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_configure(config: pytest.Config) -> None:
    """Numerics checks: DF_TEST_TORCH_THREADS=N sets torch's CPU threads, DF_TEST_DETERMINISTIC=1 turns
    on `torch.use_deterministic_algorithms` (both unset: torch's defaults)."""
    threads, deterministic = os.environ.get("DF_TEST_TORCH_THREADS"), os.environ.get("DF_TEST_DETERMINISTIC")
    if threads or deterministic:
        import torch

        if threads:
            torch.set_num_threads(int(threads))
        torch.use_deterministic_algorithms(deterministic == "1")


class ScriptedBackend(Backend):
    """A backend whose replies depend on which DualFocus step is asking; records every call.

    It scores (prompt log-probabilities) and reports no generation log-probabilities; the
    variants below report less or more.
    """

    model_id = "scripted"
    box_convention = BoxConvention.FRACTION
    prompt_family = "dualfocus"

    def __init__(
        self,
        macro: str = "red",
        box: str = "[0.25,0.25,0.50,0.50]",
        micro: str = "blue",
        scores: dict[str, float] | Callable[[Conversation, str], float] | None = None,
    ) -> None:
        self.replies = {"macro": macro, "locate": box, "micro": micro, "judge": "B"}
        self.scores = scores or {}
        self.generated: list[tuple[str, Conversation]] = []
        self.scored: list[tuple[Conversation, list[str]]] = []

    @staticmethod
    def step_of(conversation: Conversation) -> str:
        text = conversation.turns[-1].text
        if text.startswith("Please provide the bounding box"):
            return "locate"
        if len(conversation.turns) == 1 and len(conversation.images) == 2:
            return "judge"
        if text.startswith("Please combine"):
            return "micro"
        return "macro"

    @property
    def abilities(self) -> Abilities:
        return Abilities(prompt_logprobs=True)

    def generate(self, conversation: Conversation, max_new_tokens: int = 128) -> str:
        step = self.step_of(conversation)
        self.generated.append((step, conversation))
        return self.replies[step]

    def score(self, conversation: Conversation, candidates: Sequence[str]) -> list[float]:
        self.scored.append((conversation, list(candidates)))
        if callable(self.scores):
            return [self.scores(conversation, c) for c in candidates]
        return [self.scores.get(c, 1.0) for c in candidates]

    def input_size(self, image: Image.Image) -> tuple[int, int]:
        return (64, 64)


class GenerationLogprobsBackend(ScriptedBackend):
    """Reports each reply's token log-probabilities (`nlls`: mean NLL per reply text) and cannot score."""

    def __init__(self, *args, nlls: dict[str, float] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.nlls = nlls or {}

    @property
    def abilities(self) -> Abilities:
        return Abilities(generation_logprobs=True)

    def generate_many(self, requests: Sequence[Request]) -> list[Generation]:
        replies = [self.generate(r.conversation, r.max_new_tokens) for r in requests]
        return [Generation(text, (-self.nlls.get(text, 1.0),)) for text in replies]

    def score(self, conversation: Conversation, candidates: Sequence[str]) -> list[float]:
        raise AssertionError("a backend without prompt log-probabilities is never asked to score")


class BareBackend(ScriptedBackend):
    """Text only: no log-probabilities of any kind (`score` raises)."""

    @property
    def abilities(self) -> Abilities:
        return Abilities()

    def score(self, conversation: Conversation, candidates: Sequence[str]) -> list[float]:
        return Backend.score(self, conversation, candidates)


@pytest.fixture
def scene() -> Image.Image:
    """A 320x240 picture with a red square in the upper left quadrant."""
    image = Image.new("RGB", (320, 240), (235, 235, 230))
    ImageDraw.Draw(image).rectangle((80, 60, 160, 120), fill=(220, 30, 30))
    return image


@pytest.fixture(scope="session")
def tiny_llava_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import tiny_llava

    return tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def tiny_llava_backend(tiny_llava_path: Path):
    from df_agent.backends.hf import HFBackend

    return HFBackend.from_pretrained(tiny_llava_path, device="cpu")


@pytest.fixture(scope="session")
def served(request: pytest.FixtureRequest):
    """The model behind the local test servers: the shipped one when installed, else the tiny LLaVA."""
    from df_agent.backends.hf import HFBackend, shipped_model_path

    try:
        return HFBackend.from_pretrained(shipped_model_path(), device="cpu")
    except FileNotFoundError:
        return request.getfixturevalue("tiny_llava_backend")


@pytest.fixture(scope="session")
def tiny_qwen_backend():
    from tiny_models import tiny_qwen2_vl

    from df_agent.backends.hf import HFBackend

    model, processor = tiny_qwen2_vl()
    return HFBackend(model, processor, model_id="tiny-qwen2-vl")
