"""The errors a user causes and can fix: `rlhf train`, `rlhf eval` and recipe scripts print their message on one
line (`error: ...`, naming the culprit: the key, file, row, function or model) and exit with status 1.
Anything else is a bug in rlhf and keeps its traceback."""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator


class UserError(Exception):
    """A problem with what the user gave: config, data, reward function, model path, checkpoint, a run that
    cannot go on (NaN gradients). Subclasses say which."""


class NotFound(UserError, FileNotFoundError):
    """A file or directory the config names does not exist (a model, a reward function's file, a checkpoint)."""


class BadModel(UserError, ValueError):
    """A model that cannot be trained as given (quantized, a LoRA target it does not have, ...)."""


class RewardError(UserError, RuntimeError):
    """A reward function cannot be found or failed; the message names the function (and sample, where known)."""


@contextlib.contextmanager
def user_errors_exit(prog: str = "") -> Iterator[None]:
    """A user's error (rlhf.errors.UserError: config, data, reward function, model path, checkpoint) ends the command
    with its one-line message and exit status 1; anything else keeps its traceback (a bug)."""
    try:
        yield
    except UserError as e:
        sys.exit(f"{prog}{'config error' if type(e).__name__ == 'ConfigError' else 'error'}: {e}")
