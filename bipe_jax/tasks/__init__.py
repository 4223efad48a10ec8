"""Synthetic tasks scored by generation (arithmetic chain of thought)."""
