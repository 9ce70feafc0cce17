"""The errors a planner can act on: every adapter turns them into a tool error carrying their message."""


class PlannerError(ValueError):
    """A tool call a planner can fix: the message says what was wrong and what to pass instead."""


class ToolInputError(PlannerError):
    """A tool was called with arguments that do not fit together; the message says how to fix them."""


class ImageReferenceError(PlannerError):
    """An image reference could not be resolved; the message says why and what to pass instead."""


__all__ = ["ImageReferenceError", "PlannerError", "ToolInputError"]
