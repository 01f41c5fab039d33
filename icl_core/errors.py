"""The errors a user can meet, the strict base of every validated input and its error translator, and the check
of an output place; importable without torch (the CLI's `--help` must not wait for it)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError


class ConfigError(ValueError):
    """Invalid user input (a family spec, run config, sweep file or check); str() is one line: ``field: what is
    wrong``. Raised inside a validator, its field is relative to the value validated there."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message

    def under(self, prefix: str) -> ConfigError:
        """The same error with its field placed under `prefix` (``mixture`` + ``[0].nnz``)."""
        return ConfigError(join_field(prefix, self.field), self.message)


def join_field(prefix: str, field: str) -> str:
    """``a`` + ``b`` -> ``a.b``; ``a`` + ``[0]`` -> ``a[0]``; either may be empty."""
    if not prefix or not field:
        return prefix or field
    return prefix + (field if field.startswith("[") else "." + field)


class Strict(BaseModel):
    """The base of every validated input: unknown keys are errors, and so is coercion (`steps: "50"`, `cpu: true`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _loc_path(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out


def from_validation_error(err: ValidationError) -> ConfigError:
    """The first error of a pydantic validation as one ConfigError naming the field."""
    first = err.errors()[0]
    path = _loc_path(first["loc"])
    raised = (first.get("ctx") or {}).get("error")
    if isinstance(raised, ConfigError):
        return raised.under(path)
    if first["type"] == "extra_forbidden":
        return ConfigError(path, "unknown key")
    if first["type"] == "missing":
        return ConfigError(path, "required")
    msg = first["msg"].removeprefix("Value error, ")
    return ConfigError(path, f"{msg} (got {first.get('input')!r})" if "input" in first else msg)


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
