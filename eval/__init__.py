"""Evaluation of a LoRA adapter against its base: CLIP score, CLIP R-precision, parameter counts, speed."""

import lorakit  # noqa: F401  (filters two third-party import warnings before eval imports diffusers)
