"""LangChain tools and the toolkit (installed as `df_agent.tools`)."""
