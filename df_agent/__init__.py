"""df-agent: the DualFocus way of looking at an image, for agents.

Look at the whole picture (macro), zoom into the region the question is about
(micro), and let a perplexity vote keep the more plausible answer.
"""

from df_agent.backends.base import Backend, Conversation, Turn
from df_agent.boxes import Box, BoxConvention, NoBox
from df_agent.engine import DualFocus
from df_agent.images import ImageError, load_image
from df_agent.results import Arbitration, FocusResult, Location, Zoom

__version__ = "0.1.0"

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
