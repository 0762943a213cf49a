"""Helpers of the docs generator (`python docs/build.py`): renderers, figures, result files."""
