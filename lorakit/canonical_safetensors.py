"""Same tensors and metadata, same file bytes: a safetensors header with its metadata keys in sorted order.

safetensors 0.8 keeps `__metadata__` in a Rust HashMap, seeded at random in every process, so two saves of the same
adapter write its keys in a different order (safetensors issue #584): the file's checksum, and so the Hub's LFS
object, changes with every run even when the weights do not. Sorting the keys afterwards restores a canonical file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from lorakit.atomic import atomic_write_bytes

HEADER_LENGTH_BYTES = 8  # little-endian u64 length of the JSON header, then the header, then the tensor data
METADATA_KEY = "__metadata__"


def canonical_safetensors(data: bytes) -> bytes:
    """`data` (a safetensors file) with its metadata keys sorted; tensor entries and data untouched.

    The new header holds the same entries, so it has the same length and the tensor offsets stay valid; a header
    that would not fit (never seen) is left as it was.
    """
    (length,) = struct.unpack("<Q", data[:HEADER_LENGTH_BYTES])
    header_end = HEADER_LENGTH_BYTES + length
    header = json.loads(data[HEADER_LENGTH_BYTES:header_end])
    if METADATA_KEY not in header:
        return data
    metadata = dict(sorted(header.pop(METADATA_KEY).items()))
    text = json.dumps({METADATA_KEY: metadata, **header}, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > length:
        return data
    return data[:HEADER_LENGTH_BYTES] + text.ljust(length, b" ") + data[header_end:]


def canonicalize_file(path: str | Path) -> None:
    """Rewrite the safetensors file at `path` in canonical form (atomically; untouched when already canonical)."""
    path = Path(path)
    data = path.read_bytes()
    canonical = canonical_safetensors(data)
    if canonical != data:
        atomic_write_bytes(path, canonical)
