"""Keep secrets out of everything a run writes: metrics, completions, saved configs.

Three rules, applied recursively to dicts, lists and strings:
- a mapping key that names a secret (`hf_token`, `api_key`, `wandb_key`, `password`, ...)
  has its value replaced by `REDACTED`;
- the value of every secret-looking environment variable (`HF_TOKEN`, `WANDB_API_KEY`,
  `*_KEY`, `*_TOKEN`, `*_SECRET`, `*PASSWORD*`, ...; 8 characters or more) is replaced
  wherever it appears inside a string;
- well-known token formats (Hugging Face `hf_...`, OpenAI `sk-...`, GitHub `ghp_...`,
  Slack `xox?-...`, AWS access key ids) and passwords in URLs (`scheme://user:PASSWORD@host`)
  are replaced as well.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping, Optional

REDACTED = "<redacted>"
SECRET_NAME = re.compile(r"(^|[_\-.])(token|key|secret|password|passwd|pwd|credentials?|auth)$"
                         r"|api[_\-]?key|secret|password", re.I)
TOKEN_FORMATS = re.compile(
    r"\bhf_[A-Za-z0-9]{20,}|\bsk-[A-Za-z0-9_\-]{20,}|\bgh[pousr]_[A-Za-z0-9]{20,}|\bxox[abposr]-[A-Za-z0-9\-]{10,}"
    r"|\bAKIA[0-9A-Z]{16}\b"
)
URL_PASSWORD = re.compile(r"(?P<pre>[a-z][a-z0-9+.\-]*://[^/\s:@]+:)[^/\s@]+(?=@)", re.I)
MIN_SECRET_LEN = 8


def is_secret_name(name: str) -> bool:
    return bool(SECRET_NAME.search(name))


def env_secrets(environ: Optional[Mapping[str, str]] = None) -> list[str]:
    """Values of secret-named environment variables, longest first (so overlapping ones redact fully)."""
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if is_secret_name(k) and len(v) >= MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def redact_text(text: str, secrets: list[str]) -> str:
    for s in secrets:
        if s in text:
            text = text.replace(s, REDACTED)
    text = TOKEN_FORMATS.sub(REDACTED, text)
    return URL_PASSWORD.sub(lambda m: m.group("pre") + REDACTED, text)


def redact(obj: Any, secrets: Optional[list[str]] = None) -> Any:
    """A copy of `obj` (dicts, lists, tuples, strings, scalars) with secrets replaced by `REDACTED`."""
    secrets = env_secrets() if secrets is None else secrets
    if isinstance(obj, str):
        return redact_text(obj, secrets)
    if isinstance(obj, Mapping):
        return {k: (REDACTED if isinstance(k, str) and is_secret_name(k) and v not in (None, "")
                    else redact(v, secrets))
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v, secrets) for v in obj)
    return obj
