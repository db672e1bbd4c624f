"""argparse types the CLI and the mount command share (each one's name is in argparse's error)."""

from __future__ import annotations

import math


def seconds(text: str) -> float:
    """An argparse type (its name is in the error): a finite number of seconds above 0."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(text)
    return value


def processes(text: str) -> int:
    """An argparse type (its name is in the error): a whole number of processes, 0 or more."""
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value
