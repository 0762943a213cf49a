"""Learned words beside the LoRA (--train_token_embeddings): offsets, files, training, resume, card and eval."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_train_args
from safetensors.torch import load_file
from test_resume import assert_same_adapter, run_faulty
from transformers import CLIPTextModel, CLIPTokenizer

import train_lora
from eval.models import attach_adapter, learned_embeds_file, load_pipeline
from lorakit.config import ConfigError, parse_args
from lorakit.filenames import LEARNED_EMBEDS_FILE
from lorakit.token_embeddings import (
    TokenEmbeddingOffsets,
    apply_learned_embeds,
    learned_words,
    read_learned_embeds,
    save_learned_embeds,
    word_token_ids,
)

WORD = "blue"  # in the tiny tokenizer's vocabulary and in a third of the tiny dataset's captions


def tiny_text_side(pipeline: Path) -> tuple[CLIPTokenizer, CLIPTextModel]:
    tokenizer = CLIPTokenizer.from_pretrained(pipeline, subfolder="tokenizer")
    return tokenizer, CLIPTextModel.from_pretrained(pipeline, subfolder="text_encoder").requires_grad_(False)


def token_ids(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=16, return_tensors="pt").input_ids


def test_word_token_ids_refuses_a_word_the_tokenizer_splits(tiny_pipeline_dir):
    tokenizer, _ = tiny_text_side(tiny_pipeline_dir)
    assert len(set(word_token_ids(tokenizer, ["red", WORD]))) == 2
    with pytest.raises(ConfigError, match=r"'bluish' is \d+ tokens for this tokenizer"):
        word_token_ids(tokenizer, ["bluish"])


def test_offsets_change_only_prompts_holding_the_word_and_train_alone(tiny_pipeline_dir):
    tokenizer, text_encoder = tiny_text_side(tiny_pipeline_dir)
    ids = token_ids(tokenizer, ["a red circle", f"a {WORD} circle"])
    before = text_encoder(ids)[0]
    table = text_encoder.get_input_embeddings().weight.clone()
    offsets = TokenEmbeddingOffsets(text_encoder.get_input_embeddings(), [WORD], word_token_ids(tokenizer, [WORD]))
    assert torch.equal(text_encoder(ids)[0], before)  # zero offsets: the base exactly
    with torch.no_grad():
        offsets.offsets.fill_(0.5)
    after = text_encoder(ids)[0]
    assert torch.equal(after[0], before[0])  # no "blue" in the prompt: untouched
    assert not torch.allclose(after[1], before[1])
    after[1].sum().backward()
    assert offsets.offsets.grad.abs().sum() > 0
    assert torch.equal(text_encoder.get_input_embeddings().weight, table)  # the table itself never changes
    assert torch.allclose(offsets.rows()[0], table[word_token_ids(tokenizer, [WORD])[0]] + 0.5)
    offsets.remove()
    assert torch.equal(text_encoder(ids)[0], before)


def test_saved_words_applied_to_a_fresh_text_encoder_give_the_trained_states(tiny_pipeline_dir, tmp_path):
    tokenizer, text_encoder = tiny_text_side(tiny_pipeline_dir)
    offsets = TokenEmbeddingOffsets(text_encoder.get_input_embeddings(), [WORD], word_token_ids(tokenizer, [WORD]))
    with torch.no_grad():
        offsets.offsets.normal_(generator=torch.Generator().manual_seed(0))
    ids = token_ids(tokenizer, [f"a {WORD} square"])
    trained_states = text_encoder(ids)[0]
    path = save_learned_embeds(tmp_path, offsets.words, offsets.rows())
    assert path.name == LEARNED_EMBEDS_FILE and set(read_learned_embeds(path)) == {WORD}
    _, fresh = tiny_text_side(tiny_pipeline_dir)
    assert apply_learned_embeds(fresh, tokenizer, read_learned_embeds(path)) == [WORD]
    assert torch.allclose(fresh(ids)[0], trained_states, atol=1e-6)
    with pytest.raises(ConfigError, match="5 values, but this text encoder's are 16 wide"):
        apply_learned_embeds(fresh, tokenizer, {WORD: torch.zeros(5)})


def test_config_refuses_a_repeated_word_and_a_bad_learning_rate(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    base = tiny_train_args(tiny_pipeline_dir, tiny_dataset_dir, tmp_path / "out")
    with pytest.raises(ConfigError, match="names a word twice"):
        parse_args([*base, "--train_token_embeddings", WORD, WORD])
    with pytest.raises(ConfigError, match="--token_embedding_lr 0.0 is invalid"):
        parse_args([*base, "--train_token_embeddings", WORD, "--token_embedding_lr", "0"])


def test_a_split_word_fails_before_any_model_loads(tiny_pipeline_dir, tiny_dataset_dir, tmp_path, capsys, monkeypatch):
    def no_models(*args, **kwargs):
        raise AssertionError("models were loaded before the word was checked")

    monkeypatch.setattr(train_lora, "load_models", no_models)
    args = tiny_train_args(tiny_pipeline_dir, tiny_dataset_dir, tmp_path / "out", "--train_token_embeddings", "bluish")
    assert train_lora.main(args) == 2
    assert "'bluish' is" in capsys.readouterr().err


def test_learned_words_are_refused_across_processes():
    cfg = SimpleNamespace(lora=SimpleNamespace(train_token_embeddings=[WORD]))
    with pytest.raises(ConfigError, match="runs on one process, not 2"):
        train_lora.check_processes(cfg, SimpleNamespace(num_processes=2))
    train_lora.check_processes(cfg, SimpleNamespace(num_processes=1))


@pytest.fixture(scope="module")
def learned_run(tiny_pipeline_dir, tiny_dataset_dir, tmp_path_factory) -> Path:
    """A tiny run that learns WORD beside the LoRA, checkpointing every 2 steps (6 steps in all)."""
    out = tmp_path_factory.mktemp("learned") / "out"
    args = tiny_train_args(tiny_pipeline_dir, tiny_dataset_dir, out, "--train_token_embeddings", WORD)
    completed = run_faulty("none", [*args, "--checkpointing_steps", "2", "--token_embedding_lr", "0.05"])
    assert completed.returncode == 0, completed.stderr[-2000:]
    return out


@pytest.mark.slow
def test_training_learns_the_word_and_no_other_row(learned_run, tiny_pipeline_dir, tmp_path, monkeypatch):
    tokenizer, text_encoder = tiny_text_side(tiny_pipeline_dir)
    learned = load_file(learned_run / LEARNED_EMBEDS_FILE)
    assert set(learned) == {WORD}
    base_row = text_encoder.get_input_embeddings().weight[word_token_ids(tokenizer, [WORD])[0]]
    assert (learned[WORD] - base_row).abs().max() > 1e-3
    assert set(load_file(learned_run / "checkpoint-2" / LEARNED_EMBEDS_FILE)) == {WORD}  # checkpoints hold it too
    card = (learned_run / "README.md").read_text()
    assert f"**Learned words:** `{WORD}`" in card and f'load_textual_inversion("{learned_run}"' in card
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    monkeypatch.chdir(tmp_path)  # the snippet saves lora_sample.png where it runs
    exec(compile(snippet, "card_snippet", "exec"), namespace)  # the card's usage code runs as written
    pipe = namespace["pipe"]
    word_id = pipe.tokenizer.convert_tokens_to_ids(WORD)
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[word_id], learned[WORD])


@pytest.mark.slow
def test_eval_loads_the_learned_word_with_the_adapter(learned_run, tiny_pipeline_dir):
    assert learned_embeds_file(str(learned_run)) == str(learned_run / LEARNED_EMBEDS_FILE)
    assert learned_embeds_file(str(learned_run / "pytorch_lora_weights.safetensors")) is not None
    pipe = load_pipeline(str(tiny_pipeline_dir))
    table_before = pipe.text_encoder.get_input_embeddings().weight.clone()
    # Loaded as a stock diffusers user does (load_textual_inversion): the word is an added token, one row more.
    assert attach_adapter(pipe, str(learned_run), str(tiny_pipeline_dir)) == [WORD]
    table = pipe.text_encoder.get_input_embeddings().weight
    word_id = pipe.tokenizer.convert_tokens_to_ids(WORD)
    assert word_id == len(table_before) == len(table) - 1
    assert pipe.tokenizer(f"a {WORD} circle", add_special_tokens=False)["input_ids"][1] == word_id
    assert torch.equal(table[word_id], load_file(learned_run / LEARNED_EMBEDS_FILE)[WORD])
    assert torch.equal(table[: len(table_before)], table_before)  # every other word keeps its row


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_word_and_adapter(
    learned_run, tiny_pipeline_dir, tiny_dataset_dir, tmp_path
):
    out = tmp_path / "out"
    args = tiny_train_args(tiny_pipeline_dir, tiny_dataset_dir, out, "--train_token_embeddings", WORD)
    args = [*args, "--checkpointing_steps", "2", "--token_embedding_lr", "0.05"]
    assert run_faulty("kill_after_checkpoint:4", args).returncode != 0
    resumed = run_faulty("none", [*args, "--resume_from_checkpoint", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert torch.allclose(
        load_file(out / LEARNED_EMBEDS_FILE)[WORD], load_file(learned_run / LEARNED_EMBEDS_FILE)[WORD], atol=1e-6
    )
    assert_same_adapter(out, learned_run)


@pytest.mark.slow
def test_a_run_started_from_an_adapter_keeps_its_learned_words(
    learned_run, tiny_pipeline_dir, tiny_dataset_dir, tmp_path
):
    out = tmp_path / "continued"
    args = tiny_train_args(tiny_pipeline_dir, tiny_dataset_dir, out, "--init_adapter", str(learned_run))
    cache = ["--cache_latents", "--latent_cache_dir", str(tmp_path)]
    completed = run_faulty("none", [*args, "--max_train_steps", "2", *cache])
    assert completed.returncode == 0, completed.stderr[-2000:]
    # the continued LoRA was trained with the word, and is saved with it
    assert torch.equal(load_file(out / LEARNED_EMBEDS_FILE)[WORD], load_file(learned_run / LEARNED_EMBEDS_FILE)[WORD])


@pytest.mark.slow
def test_learned_words_block_adds_the_word_and_leaves_the_base_as_it_was(learned_run, tiny_pipeline_dir):
    pipe = load_pipeline(str(tiny_pipeline_dir))
    table_before, vocab_before = pipe.text_encoder.get_input_embeddings().weight.clone(), len(pipe.tokenizer)
    with learned_words(pipe, learned_run) as words:
        assert words == [WORD] and len(pipe.tokenizer) == vocab_before + 1
    assert len(pipe.tokenizer) == vocab_before
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, table_before)
