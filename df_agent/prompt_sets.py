"""Loads the prompt files in `prompts/` (installed as `df_agent.prompts`) for one model family."""

from __future__ import annotations

import string
from collections.abc import Sequence
from functools import cache
from importlib import resources

from pydantic import BaseModel

STEPS = ("macro", "locate", "micro", "score", "choices")
# Optional templates: a family without the file uses the "dualfocus" family's.
OPTIONAL_STEPS = ("judge", "presence")
OPTION_LETTERS = string.ascii_uppercase
# Templates for several regions (``DualFocus(max_regions>1)``): a family without the file uses its own
# single-region template.
MANY_STEPS = {"locate_many": "locate", "micro_many": "micro", "score_many": "score"}


class PromptSet(BaseModel, frozen=True):
    """The templates of one model family; see prompts/README.md."""

    family: str
    macro: str
    locate: str
    micro: str
    score: str
    choices: str
    judge: str
    locate_many: str
    micro_many: str
    score_many: str
    presence: str

    def with_options(self, question: str, options: Sequence[str] | None) -> str:
        """The question followed by lettered options and the letter hint, or the bare question."""
        if not options:
            return question
        if len(options) > len(OPTION_LETTERS):
            raise ValueError(f"at most {len(OPTION_LETTERS)} options (one per letter), not {len(options)}")
        lines = "\n".join(f"{OPTION_LETTERS[i]}. {option}" for i, option in enumerate(options))
        return self.choices.format(question=question, options=lines)


def families() -> list[str]:
    """Names of the prompt families shipped with the package."""
    root = resources.files("df_agent.prompts")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_"))


@cache
def load_prompts(family: str) -> PromptSet:
    """The prompt set of `family` (a folder of `prompts/`).

    Raises:
        ValueError: If no such family ships with the package.
    """
    folder = resources.files("df_agent.prompts") / family
    if not folder.is_dir():
        raise ValueError(f"unknown prompt family {family!r}; shipped families: {', '.join(families())}")
    texts = {step: (folder / f"{step}.txt").read_text(encoding="utf-8") for step in STEPS}
    for step in OPTIONAL_STEPS:
        own = folder / f"{step}.txt"
        source = own if own.is_file() else resources.files("df_agent.prompts") / "dualfocus" / f"{step}.txt"
        texts[step] = source.read_text(encoding="utf-8")
    for step, single in MANY_STEPS.items():
        own = folder / f"{step}.txt"
        texts[step] = own.read_text(encoding="utf-8") if own.is_file() else texts[single]
    return PromptSet(family=family, **texts)


__all__ = ["MANY_STEPS", "OPTIONAL_STEPS", "OPTION_LETTERS", "STEPS", "PromptSet", "families", "load_prompts"]
