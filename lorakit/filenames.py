"""The names of the files a run leaves in its output folder, defined once.

The trainer writes them, the card, the Hub upload, the kohya export, eval, the docs, the bench and the tests read
them from here. The Space (`space/app.py`) is deployed alone with pip imports only, so it keeps its own copy of
the name it needs; `tests/test_space.py` checks that they agree.
"""

from __future__ import annotations

ADAPTER_FILE = "pytorch_lora_weights.safetensors"  # diffusers' `load_lora_weights` looks for this name
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"  # --export_kohya, for AUTOMATIC1111 and ComfyUI
LEARNED_EMBEDS_FILE = "learned_embeds.safetensors"  # {word: vector} of --train_token_embeddings
# --export_kohya with learned words: one textual-inversion file per word, named `<word>.safetensors` because
# AUTOMATIC1111 and ComfyUI name an embedding after its file (the prompt says `purple` / `embedding:purple`).
KOHYA_EMBEDDINGS_DIR = "embeddings"
TRAINING_CONFIG_FILE = "training_config.yaml"  # the resolved configuration, nested by section
SUMMARY_FILE = "train_summary.json"  # lorakit.summary.TrainSummary
LOSS_HISTORY_FILE = "loss_history.json"
LOSS_CURVE_FILE = "loss_curve.png"
VALIDATION_DIR = "validation"  # validation/<step or final>/NN.png
VALIDATION_GRID_FILE = "validation_grid.png"
CARD_FILE = "README.md"  # the model card
EVAL_RESULTS_FILE = "eval_results.json"  # written by `python -m eval`, read by the card
EVAL_REPORT_FILE = "eval_results.md"
EVAL_GRID_FILE = "comparison_grid.png"
CHECKPOINT_PREFIX = "checkpoint-"  # checkpoint-STEP/
RAW_WEIGHTS_DIR = "raw"  # --use_ema --save_raw_weights: the last step's adapter, not averaged (stays local)
