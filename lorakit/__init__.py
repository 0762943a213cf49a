"""lorakit: shared logic of the LoRA fine-tuning kit (trainer, eval, bench)."""

__version__ = "0.1.0"

# Before any submodule imports diffusers: two third-party import warnings that do not concern the kit.
from lorakit.quiet_imports import silence_known_import_noise  # noqa: E402

silence_known_import_noise()
