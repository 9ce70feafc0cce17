"""Benchmark readers and metrics: POPE, TextVQA, V* Bench, FocusShapes."""
