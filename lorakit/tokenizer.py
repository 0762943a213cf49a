"""A small CLIP BPE tokenizer made locally, so tiny pipelines need no download.

The vocabulary holds every byte (alone and word-final), so any text tokenizes; the given words
get merges that make each of them a single token.
"""

from __future__ import annotations

import itertools

from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
WORD_END = "</w>"


def _bytes_to_unicode() -> list[str]:
    """The byte-to-character table of GPT-2/CLIP byte-level BPE, as an ordered list."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: repeatedly join the adjacent pair with the best (lowest) rank."""
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(itertools.pairwise(symbols))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def _word_merges(word: str, ranks: dict[tuple[str, str], int]) -> list[tuple[str, str]]:
    """Merges, after those in `ranks`, that make `word</w>` one token.

    The earlier merges are applied first, as the tokenizer will ("simple" meets the "im" of "image" before any of
    its own merges), and the pieces they leave are joined left to right. The new merges rank after every earlier
    one, so the words already built still tokenize exactly as before.
    """
    pieces = _apply_merges(list(word[:-1]) + [word[-1] + WORD_END], ranks)
    merges, current = [], pieces[0]
    for piece in pieces[1:]:
        merges.append((current, piece))
        current += piece
    return merges


def build_clip_tokenizer(words: list[str], model_max_length: int = 77) -> CLIPTokenizer:
    """Build a CLIP tokenizer whose vocabulary has all bytes plus `words` as whole tokens."""
    byte_chars = _bytes_to_unicode()
    vocab_list = byte_chars + [c + WORD_END for c in byte_chars]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in sorted({w.lower() for w in words if w}):
        for left, right in _word_merges(word, ranks):
            if (left, right) not in ranks:
                ranks[(left, right)] = len(merges)
                merges.append((left, right))
                if left + right not in vocab_list:
                    vocab_list.append(left + right)
    vocab_list += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(vocab_list))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
