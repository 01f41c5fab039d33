"""The errors a user can meet and the check of an output place, importable without torch (the CLI's `--help`
must not wait for it)."""

from __future__ import annotations

import os
from pathlib import Path


class ConfigError(ValueError):
    """Invalid user input; str() is one line: ``field: what is wrong``."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""

    def __init__(self, step: int, loss: float):
        super().__init__(f"training loss became non-finite ({loss}) at step {step}")
        self.step = step


def check_writable_folder(path: Path, field_name: str) -> None:
    """`path` is a folder, or can be made one, that this process may write to."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(field_name, f"{existing} is a file, not a folder: pass a folder for {path}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(field_name, f"cannot write to {existing} (permission denied): pass a folder you can write")
