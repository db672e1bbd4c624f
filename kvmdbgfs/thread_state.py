"""One Python thread state per libfuse worker thread, for the thread's lifetime.

libfuse calls the FUSE operations from its own worker threads, which Python does not know. ctypes gives each
such callback a new thread state (PyGILState_Ensure) and frees it when the callback returns: a fresh frame
stack (mmap, munmap) and futex traffic on every FUSE request. In `make bench` that was over half the server's
CPU time per read of a stat file. Taking one more PyGILState_Ensure on each worker thread, never released,
keeps its thread state: later callbacks only take and drop the GIL.
"""

from __future__ import annotations

import ctypes
import threading

_kept = threading.local()  # lives in the thread state: empty again on a thread whose state was not kept


def keep_thread_state() -> None:
    """Called with the GIL held in a callback from a foreign thread: keep its thread state (once per thread)."""
    if not getattr(_kept, "done", False):
        ctypes.pythonapi.PyGILState_Ensure()
        _kept.done = True
