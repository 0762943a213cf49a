"""Evaluation of a LoRA adapter against its base: CLIP score, CLIP R-precision, parameter counts, speed."""
