"""LangChain tools and the toolkit (installed as `df_agent.tools`)."""

from df_agent.tools.dualfocus_tools import (
    ArbitrateAnswersTool,
    DualFocusAnswerTool,
    DualFocusTool,
    FocusedAnswerTool,
    GlobalAnswerTool,
    RecallVisualQATool,
    ZoomRegionTool,
)
from df_agent.tools.toolkit import DualFocusToolkit

__all__ = [
    "ArbitrateAnswersTool",
    "DualFocusAnswerTool",
    "DualFocusTool",
    "DualFocusToolkit",
    "FocusedAnswerTool",
    "GlobalAnswerTool",
    "RecallVisualQATool",
    "ZoomRegionTool",
]
