"""What every config section is built from: the error type, field help text, and the range checks."""
from __future__ import annotations

import dataclasses
import math
import string
from dataclasses import field


class ConfigError(ValueError):
    """A config field is missing, unknown or out of range."""


def _help(text: str, default=dataclasses.MISSING, factory=dataclasses.MISSING):
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


def _at_least(value, low, where: str, fix: str = "") -> None:
    if value is not None and not value >= low:
        raise ConfigError(f"{where}: {value!r} must be at least {low}{'; ' + fix if fix else ''}")


def _positive(value, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{where}: {value!r} must be a positive number")


ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flash_attention_2")
ATTN_HELP = ("attention kernel: auto (transformers' choice, sdpa where the model has it), eager, sdpa, or "
             "flash_attention_2 (CUDA and the flash-attn package); LoFiT's hook sits after attention, so each "
             "gives the same offsets")


def _check_attn_implementation(value: str, where: str = "attn_implementation") -> None:
    if value not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(f"{where}: '{value}' is not one of {', '.join(ATTN_IMPLEMENTATIONS)}")


def _check_dtype(dtype: str, where: str = "dtype") -> None:
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"{where}: '{dtype}' is not one of float32 (CPU), bfloat16, float16 (GPU)")


def template_fields(template: str) -> list[str]:
    """The column names a format string reads ("Q: {question}" -> ["question"])."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"task.template: {exc}; write columns as {{name}} and a literal brace as {{{{ or }}}}")
    return [name for _, name, _, _ in parsed if name is not None]
