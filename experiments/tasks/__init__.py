"""Procedural tasks (no downloads)."""
