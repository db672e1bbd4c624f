"""The interpreter's cyclic garbage collector, kept off the guests' long-lived state.

A full collection walks every object the collector tracks while it holds the interpreter lock: with booted
guests that took 50-180 ms on this project's bench machine (`make bench BENCHES=running`), and no FUSE or
control request is answered meanwhile. What a VM holds once its boot or workload has ended lives as long as
the VM, so whenever no VM runs or awaits a workload, everything alive is moved out of the collector's sight
(gc.freeze); a collection then walks only what was made since. Freezing only at such quiet moments keeps a
workload's short-lived objects out of it: they stay collectable. A destroyed VM's objects are handed back
(gc.unfreeze), so that its reference cycles are still reclaimed; the next quiet moment freezes the rest again.
"""

from __future__ import annotations

import gc


def freeze_long_lived() -> None:
    """Every VM is idle: what is alive now lives as long as its VM."""
    gc.freeze()


def release_frozen() -> None:
    """A VM was destroyed: its objects (frozen with the rest) become collectable again."""
    gc.unfreeze()
