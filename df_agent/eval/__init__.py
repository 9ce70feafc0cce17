"""Benchmark readers and metrics: POPE, TextVQA, V* Bench, FocusShapes and any JSONL of questions.

`df_agent.eval.pope.score` and `df_agent.eval.textvqa.vqa_accuracy` are the official metrics;
`evaluate` runs a `Benchmark` on an engine and writes the report, the rows and the plot.
"""

from df_agent.eval.harness import Benchmark, ResultRow, evaluate
from df_agent.eval.items import EvalItem

__all__ = ["Benchmark", "EvalItem", "ResultRow", "evaluate"]
