"""lorakit: shared logic of the LoRA fine-tuning kit (trainer, eval, bench)."""

__version__ = "0.1.0"
