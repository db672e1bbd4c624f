"""The files a control server makes: bound and removed under a lock on their directory, and removed only
while they are still the ones it made (same device and inode), so two servers never remove each other's
and a file someone else put there is never deleted."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from kvmdbgfs.control.wire import connect

LOCK_TIMEOUT_S = 5.0  # servers hold the lock for a few file operations
PROBE_TIMEOUT_S = 1.0  # a listener that does not take a connection by then is alive but busy

FileId = tuple[int, int]


def file_id(path: Path) -> FileId | None:
    """The device and inode of what is at ``path`` (not following a link), None when nothing is."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino


@contextlib.contextmanager
def directory_lock(directory: Path) -> Iterator[None]:
    """An exclusive flock on ``directory``: the servers binding or removing files there take turns. Waited for at
    most LOCK_TIMEOUT_S (OSError EAGAIN after that)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise OSError(errno.EAGAIN, f"{directory} stays locked by another server") from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)


def bind_socket(path: Path, backlog: int) -> tuple[socket.socket, FileId]:
    """A socket listening at ``path`` (mode 0600), and the identity of its file. A dead socket of the user's there
    is replaced; a live one, another user's, or anything that is not a socket is refused (OSError)."""
    with directory_lock(path.parent):
        _remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old_umask = os.umask(0o177)
            try:
                sock.bind(str(path))
            finally:
                os.umask(old_umask)
        except BaseException:
            sock.close()
            raise
        made = file_id(path)
        assert made is not None
        try:
            sock.listen(backlog)
        except BaseException:
            sock.close()
            os.unlink(path)
            raise
    return sock, made


def _remove_stale_socket(path: Path) -> None:
    """Clear the way for a new socket: a dead one of the user's is removed; anything else is refused."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise OSError(errno.EEXIST, "exists and is not a socket")
    if info.st_uid != os.getuid():
        raise OSError(errno.EEXIST, f"a socket of uid {info.st_uid} is there")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            connect(probe, str(path), PROBE_TIMEOUT_S)
        except ConnectionRefusedError:
            os.unlink(path)
            return
        except TimeoutError:
            pass
    raise OSError(errno.EADDRINUSE, "another server is listening on it")


def remove_if_made(path: Path, made: FileId) -> None:
    """Unlink ``path`` if it is still the file ``made`` names: one that was removed and replaced since (by a tmp
    cleaner, then another server or a user) is left alone."""
    with contextlib.suppress(FileNotFoundError), directory_lock(path.parent):
        if file_id(path) == made:
            os.unlink(path)
