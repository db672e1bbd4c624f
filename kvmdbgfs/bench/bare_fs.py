"""The read-path floor: a bare mfusepy filesystem serving constants from memory, mounted with the options
kvmdbgfs mounts with (kvmdbgfs.fuse.mount_options).

    python -m kvmdbgfs.bench.bare_fs MOUNTPOINT [--blob-size BYTES]

serves ``/value`` and ``/vm/value`` (a stat file's text, at the depths of a top-level and of a VM's stat
file) and ``/blob`` (BYTES bytes, the size of a file the bench compares with) until unmounted or signalled.
Like the debugfs files, all report size 0 and are read with direct I/O.
"""

from __future__ import annotations

import argparse
import errno
import stat
from typing import Any

import mfusepy

from kvmdbgfs.fuse import mount_options

VALUE = b"123456789\n"


class BareOperations(mfusepy.Operations):
    """The fewest operations a read needs: getattr, readdir, read (libfuse answers open and release)."""

    use_ns = True

    def __init__(self, blob_size: int) -> None:
        self.files = {"/value": VALUE, "/vm/value": VALUE, "/blob": bytes(blob_size)}
        self.dirs = {"/": [".", "..", "value", "vm", "blob"], "/vm": [".", "..", "value"]}

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        if path in self.dirs:
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}
        if path in self.files:
            return {"st_mode": stat.S_IFREG | 0o444, "st_nlink": 1, "st_size": 0}
        raise mfusepy.FuseOSError(errno.ENOENT)

    def readdir(self, path: str, fh: int) -> list[str]:
        return self.dirs[path]

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return self.files[path][offset : offset + size]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kvmdbgfs.bench.bare_fs", description=__doc__.splitlines()[0])
    parser.add_argument("mountpoint")
    parser.add_argument("--blob-size", type=int, default=0)
    args = parser.parse_args(argv)
    options = dict(mount_options(allow_other=False), fsname="barefs", subtype="barefs")
    try:
        mfusepy.FUSE(BareOperations(args.blob_size), args.mountpoint, **options)
    except RuntimeError:
        pass  # libfuse 3 reports a signal-triggered exit as a non-zero return


if __name__ == "__main__":
    main()
