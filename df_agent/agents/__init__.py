"""The framework-neutral agent layer: what the LangChain tools and the MCP server are built from.

- `registry`: the image ids planners use and the safe resolution of their image references;
- `inputs`: each tool's input model (its arguments, described for a planner);
- `answers`: each tool's result, with the `summary()` a planner reads;
- `operations`: the `Toolbox`, one method per tool, over one engine and one registry;
- `specs`: one declarative spec per tool (name, description, input model, operation);
- `errors`: the errors a planner can act on;
- `mcp`: the MCP server, built from the specs (the LangChain adapter is `df_agent.tools`).
"""
