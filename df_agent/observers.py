"""Step observers: the engine tells them about each step it runs; nobody patches the engine to watch it.

An observer's `start` is called with the step's name and its inputs (JSON-able: images are left out,
boxes are dicts), and the handle it returns is told the outputs (or the error) and the seconds the
step took. The LangChain tools report steps as child runs and the MCP server as progress, each
through an observer; give one to `DualFocus(observers=[...])` for every call, or for the calls of
one block with ``with engine.observing(observer): ...``.
"""

from __future__ import annotations

from typing import Any, Protocol

STEPS = ("macro", "locate", "zoom", "micro", "arbitrate", "confidence")


class StepRun(Protocol):
    """One running step, as an observer tracks it."""

    def end(self, outputs: dict[str, Any], seconds: float) -> None:
        """The step returned `outputs` after `seconds`."""
        ...

    def fail(self, error: BaseException, seconds: float) -> None:
        """The step raised `error` after `seconds`."""
        ...


class StepObserver(Protocol):
    """Sees each engine step start with its inputs, then end with its outputs."""

    def start(self, step: str, inputs: dict[str, Any]) -> StepRun:
        """Step `step` (one of `STEPS`) starts with `inputs`; returns the handle it ends through."""
        ...


__all__ = ["STEPS", "StepObserver", "StepRun"]
