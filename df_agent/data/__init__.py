"""Training data: the DualFocus record format, FocusShapes scenes and Visual Genome curation."""
