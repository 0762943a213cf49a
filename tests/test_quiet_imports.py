"""Two known third-party import warnings are dropped; everything else those loggers say still shows."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from lorakit.quiet_imports import KNOWN_NOISE, silence_known_import_noise

REPO = Path(__file__).resolve().parent.parent


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("name", sorted(KNOWN_NOISE))
def test_known_noise_is_dropped_and_other_messages_pass(name):
    silence_known_import_noise()
    silence_known_import_noise()  # twice: still one filter
    logger = logging.getLogger(name)
    assert len(logger.filters) == 1
    collect = Collect()
    logger.addHandler(collect)
    try:
        logger.warning("Note: %s. More text.", KNOWN_NOISE[name][0])
        logger.warning("Something else went wrong: %s", "a real problem")
    finally:
        logger.removeHandler(collect)
    assert collect.messages == ["Something else went wrong: a real problem"]


def test_importing_the_pipeline_after_lorakit_prints_neither_warning():
    # without `import lorakit` first, this prints all three warnings on the 2-core CI machine (checked by hand)
    code = "\n".join(
        (
            "import lorakit",
            "import diffusers, transformers",
            "diffusers.StableDiffusionPipeline",
            "transformers.CLIPImageProcessor",
        )
    )
    completed = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    for texts in KNOWN_NOISE.values():
        assert not any(text in completed.stderr for text in texts), completed.stderr
