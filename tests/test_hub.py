"""Hub push against a recording fake HfApi: one repo, one commit, exactly the right files, no token leaks."""

from __future__ import annotations

import json
import logging
import shlex
import shutil
from pathlib import Path

import httpx2
import pytest
from fake_run import FakeHfApi, make_run_folder, snapshot
from huggingface_hub import ModelCard
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.utils import filter_repo_objects

from lorakit import hub
from lorakit.card import write_model_card
from lorakit.hub import PushError, default_repo_id, push_adapter, push_checkpoint
from lorakit.hub_token import resolve_token
from lorakit.kohya import export_kohya

SECRET = "hf_secret_test_value"
EXPECTED_FILES = [
    "README.md",
    "loss_curve.png",
    "loss_history.json",
    "pytorch_lora_weights.safetensors",
    "pytorch_lora_weights_kohya.safetensors",
    "train_summary.json",
    "training_config.yaml",
    "validation/final/00.png",
    "validation/final/01.png",
    "validation_grid.png",
]


@pytest.fixture(scope="module")
def template_run(tmp_path_factory, tiny_pipeline_dir):
    out = make_run_folder(tmp_path_factory.mktemp("hub") / "run", tiny_pipeline_dir, base_name="nota-ai/bk-sdm-tiny")
    export_kohya(out)
    return out


@pytest.fixture
def run_dir(template_run, tmp_path):
    return shutil.copytree(template_run, tmp_path / "shapes-lora")


@pytest.fixture
def token_env(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    return SECRET


@pytest.fixture
def no_token(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)


def _http_error(status: int, message: str) -> HfHubHTTPError:
    request = httpx2.Request("POST", "https://huggingface.co/api/models/alice/shapes-lora/commit/main")
    return HfHubHTTPError(message, response=httpx2.Response(status, request=request))


def test_push_creates_repo_once_and_uploads_exactly_the_artefacts_in_one_commit(run_dir, token_env):
    api = FakeHfApi(user="alice")
    url = push_adapter(run_dir, api=api)
    assert url == "https://huggingface.co/alice/shapes-lora"
    assert api.count("create_repo") == 1 and api.count("upload_folder") == 1
    create = next(kwargs for name, kwargs in api.calls if name == "create_repo")
    assert create["repo_id"] == "alice/shapes-lora" and create["exist_ok"] is True and create["private"] is False
    (commit,) = api.commits
    assert commit["revision"] == "main"
    assert commit["files"] == EXPECTED_FILES
    assert not any(
        f.startswith(("checkpoint-", "logs/")) or "optimizer" in f or f.endswith(".tmp") for f in commit["files"]
    )
    # The pushed card's snippet names the repo it was pushed to.
    assert 'load_lora_weights("alice/shapes-lora")' in (run_dir / "README.md").read_text()


def test_push_with_explicit_repo_private_and_no_validation(tiny_pipeline_dir, tmp_path, token_env):
    run_dir = make_run_folder(tmp_path / "noval", tiny_pipeline_dir, prompts=[])
    api = FakeHfApi()
    push_adapter(run_dir, repo_id="team/tiny-lora", private=True, api=api)
    assert api.count("whoami") == 0
    create = next(kwargs for name, kwargs in api.calls if name == "create_repo")
    assert create["repo_id"] == "team/tiny-lora" and create["private"] is True
    (commit,) = api.commits
    assert commit["files"] == [
        "README.md",
        "loss_curve.png",
        "loss_history.json",
        "pytorch_lora_weights.safetensors",
        "train_summary.json",
        "training_config.yaml",
    ]
    assert ModelCard.load(run_dir / "README.md").data.to_dict().get("widget") is None


def test_token_never_reaches_files_output_logs_or_errors(run_dir, token_env, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    write_model_card(run_dir)
    export_kohya(run_dir)
    push_adapter(run_dir, api=FakeHfApi())
    push_checkpoint(run_dir / "checkpoint-5", "alice/shapes-lora", 5, api=FakeHfApi())
    # A server error that echoes the token must not carry it into our message.
    failing = FakeHfApi(fail=_http_error(403, f"Forbidden for token {SECRET}"))
    with pytest.raises(PushError) as excinfo:
        push_adapter(run_dir, api=failing)
    assert excinfo.value.__cause__ is None and excinfo.value.__context__ is not None
    captured = capsys.readouterr()
    for path in Path(run_dir).rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in captured.out and SECRET not in captured.err
    assert SECRET not in caplog.text
    assert SECRET not in str(excinfo.value) and SECRET not in repr(excinfo.value)
    assert "***" in str(excinfo.value)


def test_card_redacts_a_token_typed_into_the_command(run_dir, token_env):
    summary = json.loads((run_dir / "train_summary.json").read_text())
    summary["command"] = f"HF_TOKEN={SECRET} python train_lora.py --output_dir out"
    (run_dir / "train_summary.json").write_text(json.dumps(summary))
    text = write_model_card(run_dir).read_text()
    assert SECRET not in text and "HF_TOKEN=*** python train_lora.py" in text


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        (httpx2.ConnectError("connection refused"), "network error"),
        (_http_error(403, "403 Forbidden"), "permission denied (HTTP 403)"),
        (_http_error(401, "401 Unauthorized"), "invalid or expired"),
        (OfflineModeIsEnabled("offline"), "HF_HUB_OFFLINE=1"),
    ],
)
def test_push_failure_keeps_output_and_names_cause_and_retry(run_dir, token_env, error, cause):
    write_model_card(run_dir, repo_id="alice/shapes-lora")  # the card a push would render, so bytes can match
    before = snapshot(run_dir)
    with pytest.raises(PushError) as excinfo:
        push_adapter(run_dir, repo_id="alice/shapes-lora", api=FakeHfApi(fail=error))
    message = str(excinfo.value)
    assert cause in message
    assert f"python train_lora.py --push_only --output_dir {run_dir} --hub_model_id alice/shapes-lora" in message
    assert f"hf upload alice/shapes-lora {run_dir} ." in message
    assert snapshot(run_dir) == before


def test_hf_upload_retry_command_selects_the_same_files_as_the_push(run_dir, token_env):
    api = FakeHfApi()
    push_adapter(run_dir, repo_id="alice/shapes-lora", api=api)
    command = next(line.strip() for line in hub.retry_commands(run_dir, "alice/shapes-lora") if "hf upload" in line)
    argv = shlex.split(command)
    includes = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--include"]
    excludes = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--exclude"]
    files = [p.relative_to(run_dir).as_posix() for p in sorted(run_dir.rglob("*")) if p.is_file()]
    selected = sorted(filter_repo_objects(files, allow_patterns=includes, ignore_patterns=excludes))
    assert selected == api.commits[0]["files"]


def test_push_without_token_says_how_to_log_in_and_touches_nothing(run_dir, no_token):
    assert resolve_token() is None
    api = FakeHfApi()
    before = snapshot(run_dir)
    with pytest.raises(PushError, match="hf auth login") as excinfo:
        push_adapter(run_dir, api=api)
    assert "no Hugging Face token found" in str(excinfo.value) and "--push_only" in str(excinfo.value)
    assert api.calls == []
    assert snapshot(run_dir) == before


def test_push_of_unfinished_run_is_refused_before_any_hub_call(tmp_path, token_env):
    api = FakeHfApi()
    with pytest.raises(PushError, match="pytorch_lora_weights.safetensors"):
        push_adapter(tmp_path, api=api)
    assert api.calls == []


def test_checkpoint_push_goes_to_branch_without_optimizer_state(run_dir, token_env):
    api = FakeHfApi()
    url = push_checkpoint(run_dir / "checkpoint-5", "alice/shapes-lora", 5, api=api)
    assert url.endswith("/alice/shapes-lora/tree/checkpoints/checkpoint-5")
    branch = next(kwargs for name, kwargs in api.calls if name == "create_branch")
    assert branch["branch"] == "checkpoints" and branch["exist_ok"] is True
    (commit,) = api.commits
    assert commit["revision"] == "checkpoints"
    assert commit["files"] == ["checkpoint-5/pytorch_lora_weights.safetensors", "checkpoint-5/train_state.json"]


def test_checkpoint_push_failure_names_branch_retry(run_dir, token_env):
    api = FakeHfApi(fail=httpx2.ConnectError("down"), fail_on="create_branch")
    with pytest.raises(PushError, match="--revision checkpoints") as excinfo:
        push_checkpoint(run_dir / "checkpoint-5", "alice/shapes-lora", 5, api=api)
    assert "network error" in str(excinfo.value)
    assert api.commits == []


def test_resolve_token_prefers_env_then_login_cache(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    assert resolve_token() == SECRET
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: "hf_from_login_cache")
    assert resolve_token() == "hf_from_login_cache"


def test_default_repo_id_uses_namespace_and_sanitised_folder_name(tmp_path):
    assert default_repo_id(tmp_path / "my run (v2)", FakeHfApi(user="bob")) == "bob/my-run-v2"


def test_real_hfapi_path_reports_offline_mode_with_retry(run_dir, token_env, monkeypatch, capsys, caplog):
    # No fake: push_adapter builds a real HfApi from the env token; offline mode blocks the first request
    # (whoami), exactly where a missing network would fail.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    caplog.set_level(logging.DEBUG)
    before = snapshot(run_dir)
    with pytest.raises(PushError, match="HF_HUB_OFFLINE=1") as excinfo:
        push_adapter(run_dir)
    assert "--push_only" in str(excinfo.value) and "<your-username>/shapes-lora" in str(excinfo.value)
    assert snapshot(run_dir) == before
    captured = capsys.readouterr()
    assert SECRET not in str(excinfo.value) + captured.out + captured.err + caplog.text


def test_trainer_output_renders_exports_and_pushes(tiny_pipeline_dir, tiny_dataset_dir, tmp_path, token_env):
    # Contract check against the real trainer (2 steps): what it writes is enough for card, kohya and push.
    from accelerate.state import AcceleratorState

    import train_lora
    from lorakit.config import parse_args

    out = tmp_path / "trained"
    argv = ["--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--train_data_dir", str(tiny_dataset_dir)]
    argv += ["--resolution", "32", "--output_dir", str(out), "--train_batch_size", "2", "--report_to", "none"]
    argv += ["--max_train_steps", "2", "--validation_prompt", "a red circle", "--validation_inference_steps", "1"]
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        train_lora.train(parse_args(argv))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    card = ModelCard.load(write_model_card(out))
    assert [w["text"] for w in card.data.widget] == ["a red circle"]
    assert "| `training.max_train_steps` | 2 |" in card.content
    export_kohya(out)
    api = FakeHfApi()
    push_adapter(out, api=api)
    files = api.commits[0]["files"]
    assert {"README.md", "pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"} <= set(files)
    assert {"training_config.yaml", "train_summary.json", "loss_history.json", "validation/final/00.png"} <= set(files)
    assert not any(f.startswith(("checkpoint-", "logs/")) for f in files)


def test_bare_repo_names_go_under_the_users_namespace(run_dir, token_env):
    api = FakeHfApi(user="carol")
    assert push_checkpoint(run_dir / "checkpoint-5", "shapes-lora", 5, api=api).endswith(
        "/carol/shapes-lora/tree/checkpoints/checkpoint-5"
    )
    assert push_adapter(run_dir, repo_id="shapes-lora", api=api) == "https://huggingface.co/carol/shapes-lora"
    assert {c["repo_id"] for c in api.commits} == {"carol/shapes-lora"}
    assert {kwargs["repo_id"] for name, kwargs in api.calls if name == "create_branch"} == {"carol/shapes-lora"}


def test_fetch_optional_file_returns_the_path_none_when_absent_and_none_offline_uncached(tmp_path):
    from huggingface_hub.errors import EntryNotFoundError

    class Downloads:
        def __init__(self, outcome):
            self.outcome, self.asked = outcome, []

        def hf_hub_download(self, repo_id, filename):
            self.asked.append((repo_id, filename))
            if isinstance(self.outcome, Exception):
                raise self.outcome
            return self.outcome

    found = Downloads(str(tmp_path / "learned_embeds.safetensors"))
    assert hub.fetch_optional_file("alice/lora", "learned_embeds.safetensors", api=found) == found.outcome
    assert found.asked == [("alice/lora", "learned_embeds.safetensors")]
    assert hub.fetch_optional_file("alice/lora", "x.safetensors", api=Downloads(EntryNotFoundError("no"))) is None
    offline = Downloads(OfflineModeIsEnabled("offline"))
    assert hub.fetch_optional_file("alice/lora", "x.safetensors", api=offline) is None
