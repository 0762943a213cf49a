"""Benchmarks of the trainer and the Space: `python -m bench train|generate|report` (see docs/benchmarks.md)."""
