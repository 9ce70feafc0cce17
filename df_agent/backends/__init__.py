"""Model backends: the protocol, transformers, and OpenAI-compatible servers."""

from df_agent.backends.base import Backend, Conversation, Turn

__all__ = ["Backend", "Conversation", "Turn"]
