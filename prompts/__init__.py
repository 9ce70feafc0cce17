"""Model-facing prompt files, one folder per model family (package data)."""
