"""Reading a small file a user names (a scenario, a kernel profile) without blocking on a FIFO or a device."""

from __future__ import annotations

import errno
import os
import stat


def read_regular_file(path: str, limit: int) -> bytes:
    """The file's bytes, if it is a regular file of at most ``limit`` bytes (a FIFO or a device is refused without
    blocking on it); OSError otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if info.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit >> 10} KiB")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:  # it grew after the fstat
        raise OSError(errno.EFBIG, f"larger than {limit >> 10} KiB")
    return data
