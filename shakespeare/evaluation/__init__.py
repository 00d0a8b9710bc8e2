"""Scoring a model on a held-out text: static and adaptive (prequential) code lengths, and real compression."""
