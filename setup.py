"""Packaging hook: ship the top-level `model_card.md` inside the `lorakit` package.

The template stays where the design card asks for it (the repository root, one source); a non-editable
`pip install .` copies it into the built package, where `lorakit.card` finds it.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CARD_TEMPLATE = "model_card.md"


class BuildPyWithCardTemplate(build_py):
    """The standard build, plus the card template copied into the built `lorakit` package."""

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "lorakit" / CARD_TEMPLATE
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(__file__).resolve().parent / CARD_TEMPLATE, target)


setup(cmdclass={"build_py": BuildPyWithCardTemplate})
