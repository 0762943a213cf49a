"""Differences between the library versions that requirements.txt allows, named once."""

from __future__ import annotations

import diffusers
from packaging.version import Version

# diffusers 0.42 renamed `from_pretrained(torch_dtype=...)` to `dtype=...`; the old name warns and goes in 1.0.
# (space/app.py, deployed without lorakit, carries the same rule.)
PIPELINE_DTYPE_KWARG = "dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype"
