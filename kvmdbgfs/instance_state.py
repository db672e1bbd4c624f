"""Giving an unpickled object its attributes without turning them into a dict.

CPython 3.11 keeps an instance's attributes inline (the values in the object, the names shared by its class)
until something asks for its ``__dict__``; from then on they live in a dict of their own and every attribute
load and store on that object takes a slower path, for good. The unpickler's default (``__dict__.update``) asks
for it, so a VM restored from a boot snapshot ran `rmap_fork` about 15% slower than the same VM booted. Set one
attribute at a time, the values stay inline.
"""

from __future__ import annotations

from typing import Any


def set_attributes(obj: object, state: dict[str, Any]) -> None:
    """Store each of ``state``'s attributes on ``obj``, in order, as the unpickler's dict update would (past any
    __setattr__ of its class: a frozen dataclass's refuses)."""
    for name, value in state.items():
        object.__setattr__(obj, name, value)
