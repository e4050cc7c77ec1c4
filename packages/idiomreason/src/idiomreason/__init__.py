"""Idiomaticity detection with reasoning LLMs: datasets, prompt conditions, inference backends, robust answer parsing, macro-F1, resumable sweeps."""
