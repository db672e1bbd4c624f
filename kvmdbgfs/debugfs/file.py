"""Open files and file operations (struct file, struct file_operations, vfs_open/read/write)."""

from __future__ import annotations

import threading
from typing import Any

from kvmdbgfs.debugfs.dentry import Dentry
from kvmdbgfs.debugfs.errors import EINVAL, EIO, EISDIR, ENOENT, kernel_error


class File:
    """struct file: one open of a dentry, with its fops (``f_op``, the dentry's when opened) and their per-open
    ``private_data``."""

    def __init__(self, dentry: Dentry, f_op: FileOperations, flags: int) -> None:
        self.dentry = dentry
        self.f_op = f_op
        self.flags = flags
        self.private_data: Any = None
        # Serialises read/write on one open, as seq_file and simple_attr hold a mutex.
        self.lock = threading.Lock()

    @property
    def data(self) -> Any:
        """inode->i_private: the ``data`` given to create_file()."""
        return self.dentry.data


class FileOperations:
    """struct file_operations. A file without a write method answers writes with EINVAL (vfs_write)."""

    def open(self, file: File) -> None:
        """Called by vfs_open(); raising fails the open."""

    def read(self, file: File, size: int, offset: int) -> bytes:
        raise kernel_error(EINVAL)

    def write(self, file: File, data: bytes, offset: int) -> int:
        raise kernel_error(EINVAL)

    def release(self, file: File) -> None:
        """Called once when the last reference to the open file goes away."""


def vfs_open(dentry: Dentry, flags: int) -> File:
    """Open a file dentry (directories are read with readdir); a removed dentry is gone (ENOENT)."""
    if dentry.is_dir:
        raise kernel_error(EISDIR)
    if dentry.removed or dentry.fops is None:
        raise kernel_error(ENOENT)
    file = File(dentry, dentry.fops, flags)
    file.f_op.open(file)
    return file


def debugfs_file_get(file: File) -> None:
    """debugfs_file_get(): every read and write of a debugfs file goes through the full proxy, which
    fails with EIO once the file's dentry has been removed (debugfs_remove). Files whose open pins
    what they show are never removed while open; the others (the vCPU files) fail here."""
    if file.dentry.removed:
        raise kernel_error(EIO)


def vfs_read(file: File, size: int, offset: int) -> bytes:
    """vfs_read() on an open debugfs file: full_proxy_read()."""
    debugfs_file_get(file)
    return file.f_op.read(file, size, offset)


def vfs_write(file: File, data: bytes, offset: int) -> int:
    """vfs_write() on an open debugfs file: full_proxy_write()."""
    debugfs_file_get(file)
    return file.f_op.write(file, data, offset)


def read_from_buffer(buf: bytes, size: int, offset: int) -> bytes:
    """simple_read_from_buffer(): the slice of ``buf`` a read of ``size`` at ``offset`` returns."""
    if offset < 0:
        raise kernel_error(EINVAL)
    return buf[offset : offset + size]
