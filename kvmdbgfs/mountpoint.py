"""Checks on a mountpoint before mounting, and recovery of a stale one (ENOTCONN)."""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess


class MountpointError(Exception):
    """The mountpoint cannot be used; the message is one line."""


def mounted_paths() -> set[str]:
    """Mountpoints from /proc/self/mountinfo (os.path.ismount is fooled by a dead FUSE mount)."""
    with open("/proc/self/mountinfo", "rb") as handle:
        return {unescape_mountinfo(line.split()[4]) for line in handle}


def unescape_mountinfo(field: bytes) -> str:
    """Undo mountinfo's octal escapes (space, tab, newline, backslash), keeping other bytes as they are."""
    raw = re.sub(rb"\\([0-7]{3})", lambda match: bytes([int(match.group(1), 8)]), field)
    return os.fsdecode(raw)


def fusermount_command() -> str | None:
    """fusermount3 (libfuse 3) or fusermount (libfuse 2), whichever is installed."""
    return shutil.which("fusermount3") or shutil.which("fusermount")


def detach(path: str) -> None:
    """fusermount -u, then a lazy unmount when busy."""
    helper = fusermount_command()
    if helper is None:
        raise MountpointError(f"{path}: stale FUSE mount and no fusermount to detach it")
    for flags in (["-u"], ["-u", "-z"]):
        if subprocess.run([helper, *flags, path], capture_output=True, check=False).returncode == 0:
            return
    raise MountpointError(f"{path}: stale FUSE mount that fusermount could not detach")


def prepare_mountpoint(path: str) -> str | None:
    """Refuse a missing, non-directory, non-empty or mounted path; detach a stale mount.

    Returns a note to print when a stale mount was detached, else None.
    """
    real = os.path.realpath(path)
    note = None
    try:
        os.stat(real)
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise MountpointError(f"{path}: {os.strerror(exc.errno or errno.ENOENT).lower()}") from None
        detach(real)
        note = f"{path}: detached a stale mount left by a server that is gone"
    if real in mounted_paths():
        raise MountpointError(f"{path}: already mounted")
    if not os.path.isdir(real):
        raise MountpointError(f"{path}: not a directory")
    if os.listdir(real):
        raise MountpointError(f"{path}: not empty")
    return note


def mount_type(path: str) -> str | None:
    """The filesystem type /proc/self/mountinfo gives for the mount at ``path`` (``fuse.kvmdbgfs`` for ours), None
    when nothing is mounted there."""
    real = os.path.realpath(path)
    found = None
    with open("/proc/self/mountinfo", "rb") as handle:
        for line in handle:
            fields = line.split()
            if unescape_mountinfo(fields[4]) == real:
                found = os.fsdecode(fields[fields.index(b"-") + 1])  # the last mount on top wins
    return found


def fuse_unavailable(need_helper: bool) -> str | None:
    """Why FUSE cannot be mounted here, in one line, or None: no /dev/fuse (no module, or a container without the
    device), one that cannot be opened, or (``need_helper``: a user other than root mounts and unmounts
    through it) no fusermount helper."""
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC))
    except FileNotFoundError:
        return "no /dev/fuse (load the fuse module; a container needs the device passed in)"
    except OSError as exc:
        return f"cannot open /dev/fuse: {exc.strerror}"
    if need_helper and fusermount_command() is None:
        return "no fusermount3 (or fusermount) on PATH (install the fuse3 package)"
    return None
