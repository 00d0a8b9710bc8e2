"""Scoring a model on a held-out text: its static and adaptive (prequential) code lengths, and real compression by its
predictions."""
