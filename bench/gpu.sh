#!/usr/bin/env bash
# GPU benchmark, one prepared script (< 8 minutes on an H200): BK-SDM-Tiny architecture (random weights) at
# 512 px in bf16, batch sizes 1, 4 and 8, with and without --compile; the real preset
# (configs/bk-sdm-tiny-naruto.yaml on the same architecture and generated images) with --auto_micro_batch and
# with its former layout (micro-batch 1 x 4, gradient checkpointing); generation at 25 steps through the
# Space's code (fp16 vs fp32, fused vs unfused LoRA, PNDM-50, cold start). Writes bench/results/train-gpu.json
# and bench/results/generate-gpu.json, then re-renders docs/benchmarks.md.
#
#   bash bench/gpu.sh            # from the repository root, on a machine with a CUDA GPU
#
# BK-SDM-Tiny configs: the repository's configs/architectures/bk-sdm-tiny, or the folder named by
# $BK_SDM_TINY_CONFIGS.
# Packages: torch must be there. Anything else missing from requirements.txt (diffusers, datasets, gradio...)
# is installed from wheels in .whl/ (make them with `bash bench/gpu_wheels.sh` on a machine with pip access).
# From a session with a lent GPU machine (only the repository travels): carry `.whl` and run `bash bench/gpu.sh`;
# results land in $OUT too.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export GRADIO_ANALYTICS_ENABLED=False
PY=${PYTHON:-python3}
WORK=${BENCH_WORK_DIR:-/tmp/lorakit-bench}
LOG=${BENCH_LOG_DIR:-$WORK/logs}
mkdir -p "$LOG"

if ! "$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  echo "error: no CUDA GPU visible to $PY (torch.cuda.is_available() is False); run this on a GPU machine." >&2
  exit 2
fi
if ! "$PY" -c "import diffusers, datasets, transformers, peft, accelerate, gradio, gradio_client, psutil" 2>/dev/null; then
  if [ -d .whl ]; then
    echo "[gpu.sh] installing missing packages from .whl/"
    "$PY" -m pip install -q --no-index --find-links .whl -r requirements.txt -r space/requirements.txt gradio_client
  else
    echo "error: packages from requirements.txt are missing and there is no .whl/ folder to install them from:" >&2
    echo "       pip install -r requirements.txt -r requirements-dev.txt, or bash bench/gpu_wheels.sh first." >&2
    exit 2
  fi
fi
"$PY" -c "import torch; print('[gpu.sh]', torch.__version__, torch.cuda.get_device_name(0))"
CONFIGS=${BK_SDM_TINY_CONFIGS:-configs/architectures/bk-sdm-tiny}
if [ ! -f "$CONFIGS/unet_config.json" ]; then
  echo "error: no BK-SDM-Tiny configs in $CONFIGS: set BK_SDM_TINY_CONFIGS to the folder of its *_config.json." >&2
  exit 2
fi
export BK_SDM_TINY_CONFIGS=$CONFIGS

# Training: 8 runs (eager, the real preset twice, then compiled); each stage has its own time limit so one slow
# compile cannot eat the whole budget (the stage limits add up to 450 s, as before the preset runs: they take
# time from the compiled runs, the last and least important); results are written after every run, so a stage
# cut short still leaves its figures.
timeout 330 "$PY" -m bench train --cases gpu --work_dir "$WORK" 2>&1 | tee "$LOG/train.log" \
  || echo "[gpu.sh] training stage stopped early (see $LOG/train.log); partial results kept"
# Generation at 25 steps on the same architecture (an adapter is trained for one step to have one to load).
timeout 120 "$PY" -m bench generate --base "$WORK/bk-sdm-tiny" --steps 25 --device cuda --work_dir "$WORK" \
  2>&1 | tee "$LOG/generate.log" || echo "[gpu.sh] generation stage stopped early (see $LOG/generate.log)"
"$PY" -m bench report
ls -l bench/results/
# On a lent device machine only $OUT comes back: copy the results there when it is set.
if [ -n "${OUT:-}" ]; then cp bench/results/*-gpu.json docs/benchmarks.md "$LOG"/*.log "$OUT"/ 2>/dev/null || true; fi
