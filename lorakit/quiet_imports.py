"""Drop two warnings that third-party imports print on every run and that do not concern this kit.

A first run on a CPU otherwise opens with them, and "Failed to load ..." reads like an error:
- bitsandbytes (imported by diffusers whenever it is installed) cannot find the optional `kernels` package for its
  CPU 4-bit matmul; the kit never runs 4-bit layers, so nothing is missing.
- transformers falls back to the PIL image processors when torchvision is absent; that is the processing every
  release before transformers 5 used, so nothing changes for CLIP or the safety checker.
Only records that hold these texts are dropped; every other message of those loggers still shows.
"""

from __future__ import annotations

import logging

# logger name -> texts; a record of that logger whose message contains one of them is dropped
KNOWN_NOISE: dict[str, tuple[str, ...]] = {
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    "transformers.utils.import_utils": ("requires torchvision (not installed); falling back to `",),
}


class DropMessages(logging.Filter):
    """A logging filter that drops the records whose message contains one of `texts`."""

    def __init__(self, texts: tuple[str, ...]) -> None:
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.texts)


def silence_known_import_noise() -> None:
    """Attach the filters (idempotent). Loggers exist before their modules import, so call this first."""
    for name, texts in KNOWN_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(existing, DropMessages) for existing in logger.filters):
            logger.addFilter(DropMessages(texts))
