#!/usr/bin/env bash
# Download, into .whl/, the wheels bench/gpu.sh needs on a GPU machine that has torch but no package index
# (Python 3.12, x86-64 Linux). Run from the repository root on a machine with pip access; .whl/ is not committed.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl diffusers datasets gradio gradio_client "transformers<5.24" peft accelerate psutil \
  --no-deps
echo "Downloaded to .whl/; gradio's and datasets' own dependencies may also be needed: see each wheel's METADATA."
