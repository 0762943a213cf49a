"""The Hub token: where it is read from, and how it is kept out of every message, card and log.

Its own small module so that both the Hub client (`lorakit.hub`) and the card renderer (`lorakit.card`) can
use it without importing each other.
"""

from __future__ import annotations

import os
import re

# Hub user access tokens look like `hf_` followed by 30+ letters and digits.
TOKEN_SHAPE = re.compile(r"hf_[A-Za-z0-9]{30,}")
TOKEN_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
REDACTED = "***"


def resolve_token() -> str | None:
    """The Hub token from `HF_TOKEN`, else huggingface_hub's login cache, else None."""
    token = (os.environ.get("HF_TOKEN") or "").strip()
    if token:
        return token
    from huggingface_hub import get_token

    return get_token() or None


def redact_secrets(text: str) -> str:
    """`text` with any Hub token (the configured one, or anything shaped like one) replaced by `***`."""
    secrets = {os.environ.get(name, "").strip() for name in TOKEN_ENV_VARS}
    try:
        secrets.add(resolve_token() or "")
    except Exception:  # a broken login cache must not stop redaction of what we do know
        pass
    # Short strings would redact ordinary words; a real token is far longer.
    for secret in sorted((s for s in secrets if len(s) >= 8), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return TOKEN_SHAPE.sub(REDACTED, text)
