"""The FUSE adapter: paths to dentries, file handles to open files, errors to errnos.

It adds no semantics of its own. Tree-changing operations answer EPERM, as
debugfs answers root, and touch nothing; truncating to size 0 succeeds so
that ``echo 0 > file`` (open with O_TRUNC) works. An exception that is not an
errno (a bug) answers EIO and logs its traceback.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import mmap
import os
import posixpath
import threading
from typing import Any

import mfusepy

from kvmdbgfs.debugfs.dentry import Dentry, dcache_readdir, lookup, tree_lock
from kvmdbgfs.debugfs.errors import kernel_error
from kvmdbgfs.debugfs.file import File, vfs_open, vfs_read, vfs_write
from kvmdbgfs.sched import serving
from kvmdbgfs.thread_state import keep_thread_state

DEBUGFS_MAGIC = 0x64626720
ENOATTR = getattr(errno, "ENOATTR", errno.ENODATA)
# The size a generated file reports: one page, as sysfs attribute files do. Reads use direct I/O and end where
# the text ends whatever the size; the size only matters to splice/sendfile, which FUSE serves from the page
# cache and which read nothing from a size-0 file (README, "Tools and copying"). Every file here is shorter.
GENERATED_FILE_SIZE = mmap.PAGESIZE
# Requests served at once (libfuse 3.12+ defaults to 10): a reader blocked in a file's generation must not
# hold up the others.
MAX_THREADS = 64

log = logging.getLogger(__name__)


def _open_mask(flags: int) -> int:
    """What an open asks of the file's mode: read, write or both; O_TRUNC writes too."""
    wanted = {os.O_RDONLY: os.R_OK, os.O_WRONLY: os.W_OK}
    mask = wanted.get(flags & os.O_ACCMODE, os.R_OK | os.W_OK)
    return mask | (os.W_OK if flags & os.O_TRUNC else 0)


def _refuse(*_args: Any, **_kwargs: Any) -> int:
    raise kernel_error(errno.EPERM)


class DebugfsOperations(mfusepy.Operations):
    """mfusepy operations over a debugfs root."""

    use_ns = True

    def __init__(self, root: Dentry) -> None:
        self.root = root
        self.uid = os.getuid()
        self.gid = os.getgid()
        self._open_files: dict[int, File] = {}
        self._fh_counter = itertools.count(1)
        self._open_files_lock = threading.Lock()
        self.mounted = False

    def init(self, path: str) -> None:
        self.mounted = True

    # Lookups and permissions. The mount has no default_permissions: the kernel would then refresh a
    # directory's attributes before every walk through it, and a process whose cwd is a removed VM
    # directory could not even `cd ..` (its GETATTR finds nothing). The checks generic_permission() makes
    # are made here instead, on every path a request names.

    def _lookup(self, path: str, mask: int = 0) -> Dentry:
        """The dentry at ``path``, if the caller may search every directory above it and has ``mask``
        (os.R_OK | os.W_OK | os.X_OK) on it; EACCES otherwise."""
        dentry = lookup(self.root, path)
        uid, gid, _pid = mfusepy.fuse_get_context()
        parent = dentry.parent
        while parent is not None:
            if not self._permitted(parent, uid, gid, os.X_OK):
                raise kernel_error(errno.EACCES)
            parent = parent.parent
        if mask and not self._permitted(dentry, uid, gid, mask):
            raise kernel_error(errno.EACCES)
        return dentry

    def _permitted(self, dentry: Dentry, uid: int, gid: int, mask: int) -> bool:
        """generic_permission(): the owner's, the group's or the others' bits; root may read and write
        anything and search any directory (CAP_DAC_OVERRIDE)."""
        if uid == 0:
            return not mask & os.X_OK or dentry.is_dir or bool(dentry.mode & 0o111)
        shift = 6 if uid == self.uid else 3 if gid == self.gid else 0
        return (dentry.mode >> shift) & mask == mask

    def access(self, path: str, amode: int) -> int:
        """access(2) and chdir's check (FUSE_ACCESS)."""
        self._lookup(path, amode & (os.R_OK | os.W_OK | os.X_OK))
        return 0

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        dentry = self._file(fh).dentry if fh else self._stat_target(path)
        ns = int(dentry.ctime * 1e9)
        return {
            "st_mode": dentry.mode,
            "st_ino": dentry.ino,
            "st_nlink": 0 if dentry.removed else dentry.nlink,  # simple_unlink() dropped it; an open file holds it
            "st_uid": self.uid,
            "st_gid": self.gid,
            "st_size": 0 if dentry.is_dir else GENERATED_FILE_SIZE,
            "st_atime": ns,
            "st_mtime": ns,
            "st_ctime": ns,
        }

    def _stat_target(self, path: str) -> Dentry:
        """The dentry a stat of ``path`` describes: the one in the tree, else one debugfs removed while a file
        was open on it (the kernel sends fstat(2) on that file here by path, and the inode still exists)."""
        try:
            return self._lookup(path)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
            with self._open_files_lock:
                held = [file.dentry for file in self._open_files.values() if file.dentry.removed]
            for dentry in held:
                if dentry.path() == path:
                    return dentry
            raise

    def readdir(self, path: str, fh: int) -> list[tuple[str, dict[str, int], int]]:
        """dcache_readdir(): every entry with its type (d_type), so that a walker needs no stat to tell a
        directory from a file, and a VM directory removed meanwhile is never taken for a file."""
        dentry = self._lookup(path, os.R_OK)
        if not dentry.is_dir:
            raise kernel_error(errno.ENOTDIR)
        with tree_lock:
            entries = [(".", dentry), ("..", dentry.parent or dentry)]
            entries += [(name, dentry.children[name]) for name in dcache_readdir(dentry)]
        return [(name, {"st_mode": child.mode, "st_ino": child.ino}, 0) for name, child in entries]

    def statfs(self, path: str) -> dict[str, int]:
        return {"f_bsize": 4096, "f_frsize": 4096, "f_namemax": 255}

    # Files

    def open(self, path: str, flags: int) -> int:
        file = vfs_open(self._lookup(path, _open_mask(flags)), flags)
        fh = next(self._fh_counter)
        with self._open_files_lock:
            self._open_files[fh] = file
        return fh

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return vfs_read(self._file(fh), size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        return vfs_write(self._file(fh), data, offset)

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        dentry = self._file(fh).dentry if fh else self._lookup(path, os.W_OK)
        if dentry.is_dir:
            raise kernel_error(errno.EISDIR)
        if length != 0:
            raise kernel_error(errno.EPERM)
        return 0

    def release(self, path: str, fh: int) -> int:
        with self._open_files_lock:
            file = self._open_files.pop(fh, None)
        if file is not None:
            file.f_op.release(file)
        return 0

    def open_file_count(self) -> int:
        with self._open_files_lock:
            return len(self._open_files)

    def _file(self, fh: int | None) -> File:
        with self._open_files_lock:
            file = self._open_files.get(fh or 0)
        if file is None:
            raise kernel_error(errno.EBADF)
        return file

    # Extended attributes: debugfs has none.

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        self._lookup(path)
        raise kernel_error(ENOATTR)

    def listxattr(self, path: str) -> list[str]:
        self._lookup(path)
        return []

    # Everything that would change the tree's shape or its metadata.

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        """A new name in a debugfs directory: vfs_create() without ->create gives EACCES. A directory removed
        since the path walk (a VM destroyed meanwhile) is dead: creating in it gives ENOENT (lookup_open)."""
        self._lookup(posixpath.dirname(path))
        raise kernel_error(errno.EACCES)

    mkdir = rmdir = unlink = rename = link = symlink = mknod = _refuse
    chmod = chown = setxattr = removexattr = utimens = _refuse


def mount_options(allow_other: bool) -> dict[str, Any]:
    """Options for FUSE(): direct I/O for generated files, no caching of entries or attributes, permissions
    checked by the server (see DebugfsOperations._lookup), and MAX_THREADS requests at once where libfuse
    limits them (3.12 and later; older loops start a thread per waiting request)."""
    options: dict[str, Any] = {
        "foreground": True,
        "direct_io": True,
        "entry_timeout": 0,
        "attr_timeout": 0,
        "negative_timeout": 0,
        "fsname": "kvmdbgfs",
        "subtype": "kvmdbgfs",
    }
    if (mfusepy.fuse_version_major, mfusepy.fuse_version_minor) >= (3, 12):
        options["max_threads"] = MAX_THREADS
        # Idle threads kept: as many as may run. Left unset, libfuse 3.14 logs "Ignoring invalid max threads
        # value 4294967295" at every mount (its "unlimited" default goes through the range check).
        options["max_idle_threads"] = MAX_THREADS
    if allow_other:
        options["allow_other"] = True
    return options


def _eio_for_bugs(operation: Any) -> Any:
    """``operation``, with any exception other than an OSError (an errno the kernel would give) logged with
    its traceback and turned into EIO, the errno of an I/O that failed. mfusepy would answer EINVAL, which
    reads as bad input (the answer to a bad write) and hides the bug."""

    @functools.wraps(operation)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return operation(*args, **kwargs)
        except OSError:
            raise
        except Exception as exc:
            log.exception("FUSE operation %s failed; answering EIO", operation.__name__)
            raise OSError(errno.EIO, os.strerror(errno.EIO)) from exc

    return guarded


class _Fuse(mfusepy.FUSE):
    """mfusepy's FUSE loop, each request announced to the host scheduler (kvmdbgfs.sched) while it runs,
    answered EIO if it fails with a bug (_eio_for_bugs), on a worker thread that keeps its Python thread state
    (kvmdbgfs.thread_state)."""

    def __init__(self, operations: DebugfsOperations, mountpoint: str, **options: Any) -> None:
        self._guarded: dict[Any, Any] = {}  # set before the loop starts: FUSE() serves until unmounted
        super().__init__(operations, mountpoint, **options)

    def _wrapper(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        keep_thread_state()
        guarded = self._guarded.get(func) or self._guarded.setdefault(func, _eio_for_bugs(func))
        with serving():
            return super()._wrapper(guarded, *args, **kwargs)


def serve(operations: DebugfsOperations, mountpoint: str, allow_other: bool = False) -> None:
    """Mount and serve until unmounted or signalled (SIGINT/SIGTERM end the loop and unmount)."""
    try:
        _Fuse(operations, mountpoint, **mount_options(allow_other))
    except RuntimeError:
        # libfuse 3 reports a signal-triggered exit as a non-zero return; a
        # mount that never came up is a real failure.
        if not operations.mounted:
            raise
