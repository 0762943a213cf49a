"""Learned input embeddings for a few concept words, trained beside the LoRA (pivotal tuning).

A LoRA learns a new look fastest when the prompt word already means something to the frozen text encoder.
When the base's text encoder does not know the concept word (a rare or made-up word, or the embedded world's
"purple", see embedded/README.md), the LoRA alone must turn a meaningless token into a concept, and the
large update that takes spills onto every prompt. Training that word's input embedding as well (textual
inversion, Gal et al., arXiv 2208.01618, combined with LoRA as "pivotal tuning") gives the word a meaning
without touching any other token. Only offsets of the named rows train; the embedding table stays frozen.

The learned rows are saved in diffusers' textual-inversion format (`{word: vector}`, the file name of the
diffusers textual-inversion example), beside the LoRA file.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from lorakit.atomic import atomic_write_bytes
from lorakit.config import ConfigError
from lorakit.filenames import LEARNED_EMBEDS_FILE


def word_token_ids(tokenizer, words: Sequence[str]) -> list[int]:
    """The single token id of each word; a word the tokenizer splits cannot own one embedding row."""
    ids = []
    for word in words:
        pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(pieces) != 1:
            shown = tokenizer.convert_ids_to_tokens(pieces)
            raise ConfigError(
                f"--train_token_embeddings: '{word}' is {len(pieces)} tokens for this tokenizer ({shown}), not one. "
                "Name words the tokenizer keeps whole (most common English words are), or drop the flag."
            )
        ids.append(pieces[0])
    return ids


class TokenEmbeddingOffsets(torch.nn.Module):
    """Trainable offsets added to a few rows of a frozen input-embedding table, through a forward hook."""

    def __init__(self, embedding: torch.nn.Embedding, words: Sequence[str], token_ids: Sequence[int]) -> None:
        super().__init__()
        if len(words) != len(token_ids):
            raise ValueError(f"{len(words)} words but {len(token_ids)} token ids")
        self.words = list(words)
        self.embedding = [embedding]  # a list, so the table is not registered (and saved) as a submodule
        self.register_buffer("token_ids", torch.tensor(list(token_ids), device=embedding.weight.device))
        self.offsets = torch.nn.Parameter(
            torch.zeros(len(token_ids), embedding.embedding_dim, device=embedding.weight.device)
        )
        self._hook = embedding.register_forward_hook(self._add_offsets)

    def _add_offsets(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        match = (args[0][..., None] == self.token_ids).to(self.offsets.dtype)  # (batch, length, words)
        return output + (match @ self.offsets).to(output.dtype)

    def rows(self) -> torch.Tensor:
        """The learned rows: the base rows plus the offsets, fp32."""
        return self.embedding[0].weight[self.token_ids].detach().float() + self.offsets.detach()

    def set_rows(self, rows: torch.Tensor) -> None:
        """Set the offsets so that `rows()` equals `rows` (resume from a checkpoint)."""
        with torch.no_grad():
            self.offsets.copy_(rows.to(self.offsets) - self.embedding[0].weight[self.token_ids].float())

    def remove(self) -> None:
        """Detach the hook: the embedding table behaves as the base again."""
        self._hook.remove()


def save_learned_embeds(folder: str | Path, words: Sequence[str], rows: torch.Tensor) -> Path:
    """Write `{word: vector}` to folder/learned_embeds.safetensors, atomically."""
    tensors = {word: row.detach().to("cpu", torch.float32).contiguous() for word, row in zip(words, rows, strict=True)}
    path = Path(folder) / LEARNED_EMBEDS_FILE
    atomic_write_bytes(path, save(tensors))
    return path


def read_learned_embeds(path: str | Path) -> dict[str, torch.Tensor]:
    """The `{word: vector}` of a learned-embeddings file."""
    return load_file(str(path))


@torch.no_grad()
def apply_learned_embeds(text_encoder: torch.nn.Module, tokenizer, embeds: dict[str, torch.Tensor]) -> list[str]:
    """Write each learned vector into its word's row of the text encoder's input embeddings; return the words.

    Training uses it (a run started from an adapter keeps its words in their own rows); pipelines that generate
    load the words with `load_learned_words` instead, as a stock diffusers user does.
    """
    table = text_encoder.get_input_embeddings().weight
    for word, token_id in zip(embeds, word_token_ids(tokenizer, list(embeds)), strict=True):
        vector = embeds[word].reshape(-1)
        if vector.numel() != table.shape[1]:
            raise ConfigError(
                f"Learned embedding for '{word}' has {vector.numel()} values, but this text encoder's are "
                f"{table.shape[1]} wide: load it with the base model it was trained on."
            )
        table[token_id] = vector.to(table)
    return list(embeds)


def load_learned_words(pipe, path: str | Path) -> list[str]:
    """Give `pipe` the words of a learned-embeddings file with diffusers' own `load_textual_inversion` (each word
    becomes an added token carrying its learned vector), exactly as the model card's snippet and the README do;
    return the words. A vector of the wrong width raises ConfigError naming the word."""
    embeds = read_learned_embeds(path)
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    for word, vector in embeds.items():
        if vector.numel() != width:
            raise ConfigError(
                f"Learned embedding for '{word}' has {vector.numel()} values, but this text encoder's are "
                f"{width} wide: load it with the base model it was trained on."
            )
    pipe.load_textual_inversion([{word: vector} for word, vector in embeds.items()], token=list(embeds))
    return list(embeds)


@contextmanager
def learned_words(pipe, adapter_dir: str | Path) -> Iterator[list[str]]:
    """Within the block, `pipe` knows the words learned beside the LoRA in `adapter_dir` (if any); afterwards they
    are unloaded again, as `unload_lora_weights` brings back the base UNet."""
    path = Path(adapter_dir) / LEARNED_EMBEDS_FILE
    if not path.is_file():
        yield []
        return
    words = load_learned_words(pipe, path)
    try:
        yield words
    finally:
        pipe.unload_textual_inversion(words)
