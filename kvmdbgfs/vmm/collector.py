"""The interpreter's cyclic garbage collector, kept off the guests' long-lived state.

A full collection walks every object the collector tracks while it holds the interpreter lock: with booted
guests that took 50-180 ms on this project's bench machine (`make bench BENCHES=running`), and no FUSE or
control request is answered meanwhile. What a VM holds once its boot or workload has ended lives as long as
the VM, so whenever no VM runs or awaits a workload, everything alive is moved out of the collector's sight
(gc.freeze); a collection then walks only what was made since. Freezing only at such quiet moments keeps a
workload's short-lived objects out of it: they stay collectable.

A destroyed VM's objects are handed back (gc.unfreeze), and its reference cycles (a guest model is full of
them) are garbage only the collector reclaims. The next quiet moment therefore collects before it freezes:
frozen again uncollected, they would never be reclaimed, and a host whose VMs come and go would grow by a
guest's worth of memory per VM destroyed. That full collection runs once per quiet moment after any number of
destroys; until then, the unfrozen objects are the collector's as usual.
"""

from __future__ import annotations

import gc
import threading

_lock = threading.Lock()
_released = False  # a VM was destroyed since the last freeze: its cycles are not yet collected


def freeze_long_lived() -> None:
    """Every VM is idle: what is alive now lives as long as its VM (once any destroyed VM's garbage is gone)."""
    global _released
    with _lock:
        if _released:
            gc.collect()
            _released = False
        gc.freeze()


def release_frozen() -> None:
    """A VM was destroyed: its objects (frozen with the rest) become collectable again."""
    global _released
    with _lock:
        gc.unfreeze()
        _released = True
