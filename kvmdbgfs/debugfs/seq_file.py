"""single_open(): a file whose whole text comes from one show() call (fs/seq_file.c)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvmdbgfs.debugfs.file import File, FileOperations, read_from_buffer

Show = Callable[[Any], str]


class SingleOpenFops(FileOperations):
    """single_open(file, show, data) with seq_read/single_release.

    A read at offset 0 runs show() and keeps its text in the open file (the
    seq_file buffer), so one reader sees one snapshot; reading from 0 again
    regenerates, as seq_read does after a seek to 0. No write method.
    """

    def __init__(self, show: Show) -> None:
        self.show = show

    def open(self, file: File) -> None:
        file.private_data = None

    def read(self, file: File, size: int, offset: int) -> bytes:
        with file.lock:
            if offset == 0 or file.private_data is None:
                file.private_data = self.show(file.data).encode()
            return read_from_buffer(file.private_data, size, offset)

    def release(self, file: File) -> None:
        file.private_data = None


def single_open_fops(show: Show) -> SingleOpenFops:
    """File operations for a show()-generated file."""
    return SingleOpenFops(show)
