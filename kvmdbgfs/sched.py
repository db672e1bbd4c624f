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
never wait here. The VMs' threads also take turns on one emulation CPU (``emulating``), so that a reader
competes for the interpreter lock with one CPU-bound thread, never with all of them.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

GRACE_S = 0.002
MAX_WAIT_S = 0.05
RUN_QUANTUM_S = 0.01
SLICE_S = 0.05

_lock = threading.Lock()
_in_flight = 0
_quiet_after = 0.0  # monotonic time from which no reader is expected
_seen_now = 0.0  # a monotonic time cond_resched() read: the clock is at least there
_arrivals: dict[int, float] = {}  # id of each Arrival still awaiting its request -> when it stops holding back
# Per emulation thread: run_until (no yielding to readers before), on_cpu and slice_end (see _Cpu).
_emulation = threading.local()


class _Serving:
    """The context of one reader's request. A plain class: a FUSE request costs a few microseconds, and a
    generator-based context manager added about 1.5 of them to each (measured in `make bench`)."""

    def __enter__(self) -> None:
        global _in_flight
        with _lock:
            _in_flight += 1

    def __exit__(self, *_exc: object) -> None:
        global _in_flight, _quiet_after
        with _lock:
            _in_flight -= 1
            _quiet_after = max(_quiet_after, time.monotonic() + GRACE_S)  # another request may have ended later


_SERVING = _Serving()


def serving() -> _Serving:
    """A reader's request is being served (``with serving():``): the emulation yields until it has ended."""
    return _SERVING


class Arrival:
    """A reader that has arrived but whose request is not yet known (a control connection just accepted): the
    emulation yields as if a request were in flight until ``known()`` (the request is read, or the connection
    refused or gone), and for at most ``within_s``, so that a client polling `status` does not slow the guests
    for longer than its requests take."""

    def __init__(self, within_s: float) -> None:
        with _lock:
            _arrivals[id(self)] = time.monotonic() + within_s

    def known(self) -> None:
        """The request is read (its serving() takes over) or there will be none. Idempotent."""
        with _lock:
            _arrivals.pop(id(self), None)


def readers_waiting(now: float | None = None) -> bool:
    """True while a request is being served or has just been, or an arrival's request is awaited (``now``: the
    monotonic time, if just read)."""
    if _in_flight > 0:
        return True
    now = time.monotonic() if now is None else now
    return now < _quiet_after or (bool(_arrivals) and now < max(_arrivals.values(), default=0.0))


class _Cpu:
    """The one emulation CPU: the VMs' threads take turns on it, SLICE_S at a time, so that a reader needing the
    interpreter lock competes with one emulation thread rather than all of them (several CPU-bound threads
    hand the lock among themselves and kept a reader out for 40-130 ms at a time). A slice is long (readers do
    not wait for its end: cond_resched() checks them first) since a VM's emulation runs slower for a while after
    another VM's has run (cold caches): the default scenario booted in 15-16 s with 50 ms slices, 17-19 s with
    5 ms ones."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.waiting = 0

    def take(self) -> None:
        with _lock:
            self.waiting += 1
        self.lock.acquire()
        with _lock:
            self.waiting -= 1
        _emulation.slice_end = time.monotonic() + SLICE_S


_cpu = _Cpu()


def emulation_thread() -> None:
    """The calling thread emulates guests: it runs inside ``emulating()`` and yields in cond_resched()."""
    _emulation.run_until = 0.0


@contextlib.contextmanager
def emulating() -> Iterator[None]:
    """Run guest emulation on the emulation CPU (waiting for it if another VM's thread has it)."""
    _cpu.take()
    _emulation.on_cpu = True
    try:
        yield
    finally:
        _emulation.on_cpu = False
        _cpu.lock.release()


def cond_resched() -> None:
    """cond_resched() in an emulation thread: let the readers run first (at most MAX_WAIT_S, then at least
    RUN_QUANTUM_S of emulation), and hand the emulation CPU to another VM once the slice is used up.

    It runs at every exit of every vCPU, so the usual case (no reader announced, the last one's grace
    already seen to be over, no VM waiting for the CPU) is decided from module globals alone, before the
    thread-local and clock reads: that case does nothing in any thread."""
    global _seen_now
    if not (_in_flight or _arrivals or _cpu.waiting) and _quiet_after <= _seen_now:
        return
    run_until = getattr(_emulation, "run_until", None)
    if run_until is None:
        return
    now = _seen_now = time.monotonic()
    if now >= run_until and readers_waiting(now):
        deadline = now + MAX_WAIT_S
        while readers_waiting() and time.monotonic() < deadline:
            time.sleep(GRACE_S / 2)
        _emulation.run_until = time.monotonic() + RUN_QUANTUM_S
    if _cpu.waiting and getattr(_emulation, "on_cpu", False) and time.monotonic() >= _emulation.slice_end:
        _cpu.lock.release()
        time.sleep(0)
        _cpu.take()


@contextlib.contextmanager
def emulation_held(timeout: float) -> Iterator[None]:
    """No guest runs while the block does: the emulation CPU is taken from the VMs' threads, which stop at their
    next cond_resched(). Waited for at most ``timeout`` seconds (TimeoutError)."""
    with _lock:
        _cpu.waiting += 1
    try:
        taken = _cpu.lock.acquire(timeout=timeout)
    finally:
        with _lock:
            _cpu.waiting -= 1
    if not taken:
        raise TimeoutError(f"the guests' emulation did not pause within {timeout:g} s")
    try:
        yield
    finally:
        _cpu.lock.release()
