"""Where the embedded default lives, so every entry point runs offline with no arguments."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_DIR = REPO_ROOT / "embedded"
EMBEDDED_PIPELINE = EMBEDDED_DIR / "pipeline"
EMBEDDED_CLIP = EMBEDDED_DIR / "clip"
EMBEDDED_BASE_DATA = EMBEDDED_DIR / "data" / "base"
EMBEDDED_ADAPTER_DATA = EMBEDDED_DIR / "data" / "adapter"
EMBEDDED_DEMO_ADAPTER = EMBEDDED_DIR / "demo_adapter"
EMBEDDED_PROMPTS = EMBEDDED_DIR / "prompts"
CONFIGS_DIR = REPO_ROOT / "configs"
SHAPES_PRESET = CONFIGS_DIR / "shapes.yaml"
# The real BK-SDM-Tiny architecture as configs (no weights): tests and benchmarks build it with random weights.
BK_SDM_TINY_REFERENCE = CONFIGS_DIR / "architectures" / "bk-sdm-tiny"


def shown_path(location: str | Path) -> str:
    """A local path as configs and reports show it: relative to the working directory when inside it (no machine
    paths in saved configs or committed results); anything else (a Hub id, a path elsewhere) unchanged."""
    path = Path(location)
    if not path.is_absolute():
        return str(location)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(location)
