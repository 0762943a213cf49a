"""Helpers of the docs generator (`python docs/build.py`): marker blocks, figures, result files, links."""
