"""The one module that talks to the Hugging Face Hub: push the adapter folder and checkpoints.

Usage (the trainer, at `--push_to_hub` / `--push_only` / `--hub_push_checkpoints`):

    from lorakit.hub import PushError, push_adapter, push_checkpoint
    try:
        url = push_adapter(output_dir, repo_id=args.hub_model_id, private=args.hub_private)
    except PushError as err:
        print(err)          # names the cause and the command that retries the push
        sys.exit(1)

Every function takes an optional `api` (an `HfApi`-like object) so tests pass a fake. The token comes from
`HF_TOKEN` or huggingface_hub's login cache; it is handed to `HfApi` and never printed, logged or written.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
from pathlib import Path
from typing import Any

from lorakit.card import write_model_card
from lorakit.filenames import (
    ADAPTER_FILE,
    CARD_FILE,
    CHECKPOINT_PREFIX,
    EVAL_RESULTS_FILE,
    KOHYA_EMBEDDINGS_DIR,
    KOHYA_FILE,
    LEARNED_EMBEDS_FILE,
    LOSS_CURVE_FILE,
    LOSS_HISTORY_FILE,
    SUMMARY_FILE,
    TRAINING_CONFIG_FILE,
    VALIDATION_DIR,
    VALIDATION_GRID_FILE,
)
from lorakit.hub_token import redact_secrets, resolve_token

logger = logging.getLogger(__name__)

CHECKPOINT_BRANCH = "checkpoints"
# What a published adapter repo holds: weights, card, images, config and history. Nothing else.
UPLOAD_PATTERNS = [
    ADAPTER_FILE,
    KOHYA_FILE,
    f"{KOHYA_EMBEDDINGS_DIR}/*.safetensors",
    LEARNED_EMBEDS_FILE,
    CARD_FILE,
    LOSS_CURVE_FILE,
    VALIDATION_GRID_FILE,
    f"{VALIDATION_DIR}/final/*.png",
    TRAINING_CONFIG_FILE,
    LOSS_HISTORY_FILE,
    SUMMARY_FILE,
    EVAL_RESULTS_FILE,
]
# Belt and braces on top of the allow-list: checkpoints (optimizer state), TensorBoard logs, temp files.
IGNORE_PATTERNS = [
    f"{CHECKPOINT_PREFIX}*",
    f"{CHECKPOINT_PREFIX}*/**",
    "logs/**",
    "*optimizer*",
    "*.tmp",
    ".*",
    "*/.*",
]
# A checkpoint branch gets weights and small metadata only; pickled optimizer/RNG state never leaves the machine.
CHECKPOINT_PATTERNS = ["*.safetensors", "*.json", "*.yaml"]
CHECKPOINT_IGNORE_PATTERNS = ["*optimizer*", "*.bin", "*.pkl", "*.pt", "*.tmp", ".*", "*/.*"]


class PushError(RuntimeError):
    """A Hub push failed; the message names the cause and how to retry. Never contains the token."""


def _get_api(api: Any | None) -> Any:
    token = resolve_token()
    if api is None:
        if token is None:
            raise _NoToken()
        from huggingface_hub import HfApi

        return HfApi(token=token)
    if token is None and not getattr(api, "token", None):
        raise _NoToken()
    return api


class _NoToken(Exception):
    pass


def fetch_optional_file(repo_id: str, filename: str, api: Any | None = None) -> str | None:
    """Local path of `filename` from a Hub model repo (downloaded or cached), or None when the repo lacks it.

    Reading a public repo needs no token; offline, only the Hub cache is consulted.
    """
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled

    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=resolve_token())
    try:
        return api.hf_hub_download(repo_id=repo_id, filename=filename)
    except EntryNotFoundError:
        return None
    except (OfflineModeIsEnabled, HfHubHTTPError, OSError):
        cached = try_to_load_from_cache(repo_id, filename)
        return cached if isinstance(cached, str) else None


def default_repo_id(output_dir: str | os.PathLike, api: Any) -> str:
    """`<user>/<output folder name>`, the user taken from `api.whoami()`."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(output_dir).resolve().name).strip("-.")[:96] or "lora-adapter"
    return f"{api.whoami()['name']}/{name}"


def _full_repo_id(repo_id: str, api: Any) -> str:
    # A bare name means "under my namespace"; branch and upload endpoints need the full `user/name`.
    return repo_id if "/" in repo_id else f"{api.whoami()['name']}/{repo_id}"


def _explain(exc: BaseException, repo_id: str | None) -> str:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

    if isinstance(exc, _NoToken):
        return "no Hugging Face token found. Set HF_TOKEN to a token with write access, or run `hf auth login`"
    if isinstance(exc, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE=1 is set, so the Hub cannot be reached. Unset it (and check the network)"
    detail = redact_secrets(str(exc).strip().splitlines()[0] if str(exc).strip() else "")[:300]
    status = getattr(getattr(exc, "response", None), "status_code", None)
    target = f" {repo_id}" if repo_id else ""
    if isinstance(exc, HfHubHTTPError) and status == 401:
        cause = "the Hub rejected the token (HTTP 401): it is invalid or expired; run `hf auth login` again"
    elif isinstance(exc, HfHubHTTPError) and status == 403:
        cause = (
            f"permission denied (HTTP 403): the token cannot write to{target}. Use a token with write access, "
            "or a --hub_model_id in a namespace you own"
        )
    elif isinstance(exc, RepositoryNotFoundError):
        cause = f"repository{target} not found or not accessible with this token (HTTP {status})"
    elif isinstance(exc, HfHubHTTPError):
        cause = f"the Hub answered with an HTTP error ({status})"
    elif isinstance(exc, (ConnectionError, TimeoutError, OSError)) or "httpx" in type(exc).__module__:
        cause = "network error: could not reach the Hub. Check the connection (and any proxy)"
    else:
        cause = f"unexpected {type(exc).__name__}"
    return f"{cause} [{type(exc).__name__}: {detail}]" if detail else cause


def retry_commands(output_dir: str | os.PathLike, repo_id: str | None, private: bool = False) -> list[str]:
    """The two commands that retry an adapter push: our `--push_only` mode and the plain `hf upload`."""
    folder = shlex.quote(str(output_dir))
    ours = f"python train_lora.py --push_only --output_dir {folder}"
    if repo_id:
        ours += f" --hub_model_id {shlex.quote(repo_id)}"
    if private:
        ours += " --hub_private"
    includes = " ".join(f"--include {shlex.quote(p)}" for p in UPLOAD_PATTERNS)
    excludes = " ".join(f"--exclude {shlex.quote(p)}" for p in IGNORE_PATTERNS)
    target = shlex.quote(repo_id) if repo_id else "<your-username>/" + shlex.quote(Path(output_dir).resolve().name)
    hf = f"hf upload {target} {folder} . {includes} {excludes}" + (" --private" if private else "")
    return [ours, hf]


def _failure(exc: BaseException, repo_id: str | None, what: str, commands: list[str], local: Path) -> PushError:
    message = (
        f"Push of {what} to the Hugging Face Hub failed: {_explain(exc, repo_id)}.\n"
        f"The local output in {local} is complete and untouched by the failed push.\n"
        "Retry with:\n" + "\n".join(f"  {c}" for c in commands)
    )
    return PushError(redact_secrets(message))


def _endpoint(api: Any) -> str:
    return str(getattr(api, "endpoint", None) or "https://huggingface.co").rstrip("/")


def push_adapter(
    output_dir: str | os.PathLike, repo_id: str | None = None, private: bool = False, api: Any | None = None
) -> str:
    """Create the repo if needed and upload adapter, card, images, config and history in one commit; return its URL."""
    output_dir = Path(output_dir)
    if not (output_dir / ADAPTER_FILE).is_file():
        raise PushError(
            f"Nothing to push: {output_dir / ADAPTER_FILE} is missing. Train first, or point --output_dir at a "
            "finished run."
        )
    try:
        api = _get_api(api)
        repo_id = _full_repo_id(repo_id, api) if repo_id else default_repo_id(output_dir, api)
    except Exception as exc:  # any failure here is reported with the retry command, token scrubbed
        raise _failure(exc, repo_id, "the adapter", retry_commands(output_dir, repo_id, private), output_dir) from None

    # Re-render so the card's usage snippet names the repo it is pushed to (a local write, before any upload).
    write_model_card(output_dir, repo_id=repo_id)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        logger.info("Uploading %s to %s in one commit", output_dir, repo_id)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(output_dir),
            repo_type="model",
            allow_patterns=UPLOAD_PATTERNS,
            ignore_patterns=IGNORE_PATTERNS,
            commit_message="Upload LoRA adapter, model card and training artefacts (lorakit)",
        )
    except Exception as exc:
        raise _failure(exc, repo_id, "the adapter", retry_commands(output_dir, repo_id, private), output_dir) from None
    url = f"{_endpoint(api)}/{repo_id}"
    logger.info("Pushed adapter to %s", url)
    return url


def push_checkpoint(
    checkpoint_dir: str | os.PathLike, repo_id: str, step: int, api: Any | None = None, private: bool = False
) -> str:
    """Upload a checkpoint's weights to `checkpoint-STEP/` on the `checkpoints` branch (never main); return its URL."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise PushError(f"Checkpoint folder {checkpoint_dir} does not exist; nothing to push for step {step}.")
    path_in_repo = f"{CHECKPOINT_PREFIX}{int(step)}"
    includes = " ".join(f"--include {shlex.quote(p)}" for p in CHECKPOINT_PATTERNS)
    excludes = " ".join(f"--exclude {shlex.quote(p)}" for p in CHECKPOINT_IGNORE_PATTERNS)
    retry = [
        f"hf upload {shlex.quote(repo_id)} {shlex.quote(str(checkpoint_dir))} {path_in_repo} "
        f"--revision {CHECKPOINT_BRANCH} {includes} {excludes}"
    ]
    try:
        api = _get_api(api)
        repo_id = _full_repo_id(repo_id, api)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.create_branch(repo_id, branch=CHECKPOINT_BRANCH, exist_ok=True, repo_type="model")
        logger.info("Uploading checkpoint step %d to %s@%s", step, repo_id, CHECKPOINT_BRANCH)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(checkpoint_dir),
            path_in_repo=path_in_repo,
            repo_type="model",
            revision=CHECKPOINT_BRANCH,
            allow_patterns=CHECKPOINT_PATTERNS,
            ignore_patterns=CHECKPOINT_IGNORE_PATTERNS,
            commit_message=f"Checkpoint at step {int(step)} (lorakit)",
        )
    except Exception as exc:
        raise _failure(exc, repo_id, f"checkpoint {step}", retry, checkpoint_dir) from None
    return f"{_endpoint(api)}/{repo_id}/tree/{CHECKPOINT_BRANCH}/{path_in_repo}"
