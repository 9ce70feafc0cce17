"""The framework-neutral agent layer: image registry, tool operations and the MCP server.

`df_agent.agents.registry` resolves the image references planners pass; `df_agent.agents.operations`
holds the tool operations that both adapters (LangChain: `df_agent.tools`; MCP:
`df_agent.agents.mcp`) expose.
"""
