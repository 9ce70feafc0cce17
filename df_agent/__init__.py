"""df-agent: the DualFocus way of looking at an image, for agents.

Look at the whole picture (macro), zoom into the region the question is about
(micro), and let a perplexity vote keep the more plausible answer.

The names below are imported on first use, so that ``df-agent --help`` and other light uses of the
package (``df_agent.cli``) start without loading numpy, pydantic or torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from df_agent.backends.base import Backend, Conversation, Turn
    from df_agent.boxes import Box, BoxConvention, NoBox
    from df_agent.engine import DualFocus
    from df_agent.images import ImageError, load_image
    from df_agent.results import Arbitration, FocusResult, Location, Zoom

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "Arbitration": "df_agent.results",
    "Backend": "df_agent.backends.base",
    "Box": "df_agent.boxes",
    "BoxConvention": "df_agent.boxes",
    "Conversation": "df_agent.backends.base",
    "DualFocus": "df_agent.engine",
    "FocusResult": "df_agent.results",
    "ImageError": "df_agent.images",
    "Location": "df_agent.results",
    "NoBox": "df_agent.boxes",
    "Turn": "df_agent.backends.base",
    "Zoom": "df_agent.results",
    "load_image": "df_agent.images",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'df_agent' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "Arbitration",
    "Backend",
    "Box",
    "BoxConvention",
    "Conversation",
    "DualFocus",
    "FocusResult",
    "ImageError",
    "Location",
    "NoBox",
    "Turn",
    "Zoom",
    "__version__",
    "load_image",
]
