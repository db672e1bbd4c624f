"""The host scheduler's one rule here: a reader of the tree runs before the guests' emulation.

On a real host the guests run on their own CPUs and a reader of debugfs gets a CPU of its own. Here every
FUSE request, every control request and every emulated vCPU needs the same interpreter lock, and CPU-bound
emulation threads keep a reader waiting for it many times per read (one `cat` is about 11 FUSE requests;
see `make bench`). So the serving threads announce each request (``serving``), and the emulation threads
(``emulation_thread``) call ``cond_resched()`` where the kernel could reschedule (each time they take
mmu_lock, each workload step, each idle slice). While a request is in flight, or one ended less than
GRACE_S ago (a reader's next request follows within microseconds), such a thread sleeps until the readers
are done, at most MAX_WAIT_S, and then runs at least RUN_QUANTUM_S before it yields again: readers in a
tight loop slow the guests down, they never stop them. Other threads (a control request creating a VM)
never wait here.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

GRACE_S = 0.002
MAX_WAIT_S = 0.05
RUN_QUANTUM_S = 0.01

_lock = threading.Lock()
_in_flight = 0
_quiet_after = 0.0  # monotonic time from which no reader is expected
_emulation = threading.local()  # run_until: set in emulation threads, the time before which they run on


@contextlib.contextmanager
def serving() -> Iterator[None]:
    """A reader's request is being served: the emulation yields until it has ended."""
    global _in_flight, _quiet_after
    with _lock:
        _in_flight += 1
    try:
        yield
    finally:
        with _lock:
            _in_flight -= 1
            _quiet_after = time.monotonic() + GRACE_S


def readers_waiting() -> bool:
    """True while a request is being served or has just been."""
    return _in_flight > 0 or time.monotonic() < _quiet_after


def emulation_thread() -> None:
    """The calling thread emulates guests: its cond_resched() calls yield to readers."""
    _emulation.run_until = 0.0


def cond_resched() -> None:
    """cond_resched() in an emulation thread: let the readers run first, for at most MAX_WAIT_S."""
    run_until = getattr(_emulation, "run_until", None)
    if run_until is None or not readers_waiting() or time.monotonic() < run_until:
        return
    deadline = time.monotonic() + MAX_WAIT_S
    while readers_waiting() and time.monotonic() < deadline:
        time.sleep(GRACE_S / 2)
    _emulation.run_until = time.monotonic() + RUN_QUANTUM_S
