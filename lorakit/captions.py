"""Caption handling at training time: a trigger-word prefix, dropout to the empty caption, shuffled parts.

Every random choice comes from a generator seeded by (seed, epoch, index) alone, separate from the image's
crop and flip draws, so a sample's caption is the same in any worker, on any process and after a resume, and
runs without these flags draw exactly the crops they drew before the flags existed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from lorakit.config import DataConfig


@dataclass(frozen=True)
class CaptionOptions:
    """The caption flags of a run (see `DataConfig`); the defaults leave captions as written."""

    prefix: str = ""
    dropout_rate: float = 0.0
    shuffle: bool = False
    keep_tokens: int = 0
    separator: str = ", "

    @classmethod
    def from_config(cls, data: DataConfig) -> CaptionOptions:
        return cls(
            prefix=data.caption_prefix or "",
            dropout_rate=data.caption_dropout_rate,
            shuffle=data.shuffle_caption,
            keep_tokens=data.keep_tokens,
            separator=data.caption_separator,
        )

    @property
    def changes_captions(self) -> bool:
        return bool(self.prefix) or self.dropout_rate > 0 or self.shuffle


def caption_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The generator of one sample's caption choices in one epoch."""
    return random.Random(f"caption/{seed}/{epoch}/{index}")


def drops_caption(rate: float, seed: int, epoch: int, index: int) -> bool:
    """Whether this sample trains on the empty caption this epoch (the first draw of its caption generator)."""
    return rate > 0 and caption_rng(seed, epoch, index).random() < rate


def shuffle_parts(caption: str, separator: str, keep_tokens: int, rng: random.Random) -> str:
    """The caption's parts in a random order, the first `keep_tokens` parts left in place."""
    parts = [part.strip() for part in caption.split(separator.strip() or separator)]
    parts = [part for part in parts if part]
    kept, rest = parts[:keep_tokens], parts[keep_tokens:]
    rng.shuffle(rest)
    return separator.join(kept + rest)


def apply_options(caption: str, options: CaptionOptions, seed: int, epoch: int, index: int) -> str:
    """The caption a sample trains on: empty when dropped, else shuffled (when asked) and prefixed."""
    rng = caption_rng(seed, epoch, index)
    # Always drawn first, so the dropout decision does not depend on the other flags (and matches drops_caption).
    if rng.random() < options.dropout_rate:
        return ""
    if options.shuffle:
        caption = shuffle_parts(caption, options.separator, options.keep_tokens, rng)
    return options.prefix + caption


def trigger_word(prefix: str | None) -> str | None:
    """The prefix as a word to put in prompts: without the separator that joined it to the captions."""
    word = (prefix or "").strip().strip(",;:|").strip()
    return word or None


def with_trigger(prompt: str, prefix: str | None) -> str:
    """A prompt that carries the trigger word: the prefix put in front unless the prompt has the word already."""
    word = trigger_word(prefix)
    if word is None or word in prompt:
        return prompt
    return prefix + prompt


def count_truncated(captions: list[str], tokenizer, prefix: str = "") -> tuple[int, str | None]:
    """How many captions (with the prefix) are longer than the tokenizer's limit, and the first such one."""
    limit = tokenizer.model_max_length
    unique = list(dict.fromkeys(prefix + caption for caption in captions))
    lengths = tokenizer(unique, truncation=False)["input_ids"] if unique else []
    too_long = {caption for caption, ids in zip(unique, lengths, strict=True) if len(ids) > limit}
    count = sum(1 for caption in captions if prefix + caption in too_long)
    example = next((prefix + caption for caption in captions if prefix + caption in too_long), None)
    return count, example
