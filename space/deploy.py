"""Create (or update) a Gradio Space on the Hub that serves a LoRA adapter with this folder's app.

Usage: python space/deploy.py --space_id user/my-space --lora user/adapter [--base nota-ai/bk-sdm-tiny] [--private]

The token is resolved by huggingface_hub (HF_TOKEN or the `hf auth login` cache); it is never passed,
printed or written by this script.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_BASE = "nota-ai/bk-sdm-tiny"
REPO_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Never ship caches, local env files (they may hold tokens) or editor leftovers to a public Space.
IGNORE_PATTERNS = ("__pycache__", "*.pyc", ".env", ".env.*", "*.log", ".DS_Store", "flagged")


def check_repo_id(value: str, flag: str, example: str) -> str:
    """Return `value` if it looks like a Hub repo id, else raise ValueError naming the flag and the fix."""
    if Path(value).expanduser().exists():
        raise ValueError(
            f"{flag} {value!r} is a local path, which a Space cannot read: push it to the Hub first and pass "
            f"its repo id (e.g. {example})."
        )
    if not REPO_ID_PATTERN.match(value):
        raise ValueError(f"{flag} must be a Hub repo id like {example}, got {value!r}.")
    return value


def render_readme(text: str, base: str, lora: str) -> str:
    """Set the `models:` list of the README front matter to the base and the adapter."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---" or "---" not in (line.strip() for line in lines[1:]):
        raise ValueError("space/README.md must start with a '---' YAML front matter block.")
    end = 1 + [line.strip() for line in lines[1:]].index("---")
    header = lines[1:end]
    kept, skipping = [], False
    for line in header:
        if line.startswith("models:"):
            skipping = True
            continue
        # The old list's items are the indented '- ' lines right after `models:`.
        if skipping and line.lstrip().startswith("- ") and line[:1] in (" ", "-"):
            continue
        skipping = False
        kept.append(line)
    kept += ["models:", f"  - {base}", f"  - {lora}"]
    return "\n".join(["---", *kept, *lines[end:]]) + "\n"


def stage_space_folder(space_dir: Path, out_dir: Path, base: str, lora: str) -> Path:
    """Copy the Space files to `out_dir` with the README's `models:` pointing at base and adapter."""
    shutil.copytree(space_dir, out_dir, ignore=shutil.ignore_patterns(*IGNORE_PATTERNS), dirs_exist_ok=True)
    readme = out_dir / "README.md"
    readme.write_text(render_readme(readme.read_text(encoding="utf-8"), base, lora), encoding="utf-8")
    return out_dir


def deploy(
    space_id: str,
    lora: str,
    base: str = DEFAULT_BASE,
    private: bool = False,
    weight_name: str | None = None,
    api: Any = None,
    space_dir: Path = HERE,
) -> str:
    """Create the Space (sdk gradio), set its variables, upload the folder; return the Space URL."""
    check_repo_id(space_id, "--space_id", "user/my-space")
    check_repo_id(lora, "--lora", "user/my-lora-adapter")
    check_repo_id(base, "--base", DEFAULT_BASE)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    url = api.create_repo(space_id, repo_type="space", space_sdk="gradio", exist_ok=True, private=private)
    variables = {"LORA_ADAPTER": lora, "BASE_MODEL": base}
    if weight_name:
        variables["LORA_WEIGHT_NAME"] = weight_name
    # Variables first, so the build triggered by the upload already sees them.
    for key, value in variables.items():
        api.add_space_variable(space_id, key, value, description=f"{key} read by app.py at start-up")
    with tempfile.TemporaryDirectory(prefix="space-") as staging:
        folder = stage_space_folder(Path(space_dir), Path(staging), base, lora)
        api.upload_folder(
            repo_id=space_id,
            repo_type="space",
            folder_path=str(folder),
            commit_message=f"Deploy LoRA Space for {lora} on {base}",
            ignore_patterns=list(IGNORE_PATTERNS),
        )
    return str(url)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space_id", required=True, help="Space repo id to create or update, e.g. user/my-space")
    parser.add_argument("--lora", required=True, help="Hub repo id of the LoRA adapter, e.g. user/my-adapter")
    parser.add_argument("--base", default=DEFAULT_BASE, help=f"Hub repo id of the base model (default {DEFAULT_BASE})")
    parser.add_argument("--weight_name", default=None, help="adapter weights file name, if not the default")
    parser.add_argument("--private", action="store_true", help="create the Space as private")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, api: Any = None, space_dir: Path = HERE) -> int:
    """Deploy from the command line; print the Space URL (never the token)."""
    args = parse_args(argv)
    try:
        url = deploy(args.space_id, args.lora, args.base, args.private, args.weight_name, api=api, space_dir=space_dir)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Space ready: {url} (adapter {args.lora} on {args.base})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
