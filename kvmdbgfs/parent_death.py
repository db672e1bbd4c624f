"""PR_SET_PDEATHSIG: a child process that must not outlive the process that started it."""

from __future__ import annotations

import ctypes

PR_SET_PDEATHSIG = 1

_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent(signum: int) -> None:
    """prctl(PR_SET_PDEATHSIG): ``signum`` arrives once the thread that started this process has exited, even
    by SIGKILL (the caller checks getppid() if its parent may have gone before this call)."""
    _libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)
