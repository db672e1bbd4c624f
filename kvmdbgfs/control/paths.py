"""Where a mount's control socket lives, and how the CLI finds it from the mountpoint.

Nothing in a shared directory is trusted: the runtime directory is used only if it is a real directory of
the user's own that no one else may enter, and a pointer file is replaced by a rename, never written
through a link that was planted there.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
from pathlib import Path

MAX_POINTER_BYTES = 4096


class UnsafeRuntimeDir(Exception):
    """The runtime directory cannot be made or cannot be trusted; the message is one line."""


def runtime_dir() -> Path:
    """$XDG_RUNTIME_DIR/kvmdbgfs, else kvmdbgfs-<uid> in the temporary directory ($TMPDIR, else /tmp): made
    with mode 0700 when missing, and used only if it is a directory (not a link) of the user's with no group
    or other access."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = Path(base) / "kvmdbgfs" if base else Path(tempfile.gettempdir()) / f"kvmdbgfs-{os.getuid()}"
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
        info = os.lstat(path)
    except OSError as exc:
        raise UnsafeRuntimeDir(f"runtime directory {path}: {exc.strerror} (use --control SOCKET)") from None
    problem = _untrusted(info)
    if problem:
        raise UnsafeRuntimeDir(f"runtime directory {path} {problem}: not using it (use --control SOCKET)")
    return path


def _untrusted(info: os.stat_result) -> str | None:
    """Why a directory with this lstat() is not the user's private one, or None when it is."""
    if stat.S_ISLNK(info.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(info.st_mode):
        return "is not a directory"
    if info.st_uid != os.getuid():
        return f"is owned by uid {info.st_uid}, not {os.getuid()}"
    if info.st_mode & 0o077:
        return f"has mode {stat.S_IMODE(info.st_mode):04o} (group or others have access)"
    return None


def _mount_key(mountpoint: str) -> str:
    return hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:16]


def default_socket_path(mountpoint: str) -> Path:
    """The socket a mount listens on unless --control names one."""
    return runtime_dir() / f"{_mount_key(mountpoint)}.sock"


def pointer_path(mountpoint: str) -> Path:
    """A small file naming the socket of the mount at ``mountpoint``, so the CLI finds it from -m."""
    return runtime_dir() / f"{_mount_key(mountpoint)}.control"


def write_pointer(pointer: Path, socket_path: Path) -> None:
    """Name ``socket_path`` in ``pointer``: written under a fresh name beside it, then renamed over it (a link at
    ``pointer`` is replaced, never followed)."""
    fd, temporary = tempfile.mkstemp(dir=pointer.parent, prefix=f".{pointer.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{socket_path.resolve()}\n")
        os.replace(temporary, pointer)
    except BaseException:
        os.unlink(temporary)
        raise


def find_socket(mountpoint: str) -> Path:
    """The control socket of the mount at ``mountpoint``: the one its pointer file names, else the default."""
    try:
        fd = os.open(pointer_path(mountpoint), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return default_socket_path(mountpoint)
    with os.fdopen(fd, "rb") as handle:
        return Path(os.fsdecode(handle.read(MAX_POINTER_BYTES).strip()))


def default_log_path(mountpoint: str) -> Path:
    """Where a background server (`kvmdbgfs mount --background`) logs unless --log names a file."""
    return runtime_dir() / f"{_mount_key(mountpoint)}.log"
