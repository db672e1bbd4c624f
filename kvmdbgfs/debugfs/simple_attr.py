"""Simple attributes: a u64 file from a getter, a setter and a printf format (fs/libfs.c simple_attr_*)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvmdbgfs.debugfs.errors import EACCES, EINVAL, ERANGE, kernel_error
from kvmdbgfs.debugfs.file import File, FileOperations, read_from_buffer

Getter = Callable[[Any], int]
Setter = Callable[[Any, int], None]

# struct simple_attr keeps char set_buf[24]: a write looks at no more than 23 bytes.
SET_BUF_SIZE = 24
U64_MAX = (1 << 64) - 1


def format_u64(fmt: str, value: int) -> str:
    """snprintf(fmt, u64) for the formats debugfs attributes use: ``%llu`` unsigned, ``%lld`` signed."""
    value &= U64_MAX
    if "%lld" in fmt and value >> 63:
        value -= 1 << 64
    return fmt.replace("%llu", "%d").replace("%lld", "%d") % value


def kstrtoull(text: bytes, base: int = 0) -> int:
    """kstrtoull(): one unsigned number, optional '+', one trailing newline; EINVAL/ERANGE otherwise."""
    if text.endswith(b"\n"):
        text = text[:-1]
    if text.startswith(b"+"):
        text = text[1:]
    if base == 0:
        if text[:2].lower() == b"0x" and len(text) > 2:
            base, text = 16, text[2:]
        elif text.startswith(b"0") and len(text) > 1:
            base, text = 8, text[1:]
        else:
            base = 10
    try:
        decoded = text.decode("ascii")
        if not decoded or not all(c.isalnum() for c in decoded):
            raise ValueError
        value = int(decoded, base)
    except ValueError:
        raise kernel_error(EINVAL) from None
    if value > U64_MAX:
        raise kernel_error(ERANGE)
    return value


class SimpleAttrFops(FileOperations):
    """DEFINE_SIMPLE_ATTRIBUTE(get, set, fmt): simple_attr_open/read/write/release.

    The text is generated when a read starts at offset 0 and kept for the
    following reads of the same open; a read past offset 0 with nothing
    generated yet returns end of file, as simple_attr_read does.
    """

    def __init__(self, get: Getter, set: Setter | None, fmt: str) -> None:
        self.get = get
        self.set = set
        self.fmt = fmt

    def open(self, file: File) -> None:
        self.simple_attr_open(file, self.get, self.set)

    def simple_attr_open(self, file: File, get: Getter, set: Setter | None) -> None:
        file.private_data = _SimpleAttr(get, set)

    def read(self, file: File, size: int, offset: int) -> bytes:
        attr: _SimpleAttr = file.private_data
        with file.lock:
            if offset == 0:
                attr.get_buf = format_u64(self.fmt, attr.get(file.data)).encode()
            return read_from_buffer(attr.get_buf, size, offset)

    def write(self, file: File, data: bytes, offset: int) -> int:
        attr: _SimpleAttr = file.private_data
        if attr.set is None:
            raise kernel_error(EACCES)
        with file.lock:
            value = kstrtoull(data[: SET_BUF_SIZE - 1])
            attr.set(file.data, value)
        return len(data)

    def release(self, file: File) -> None:
        file.private_data = None


class _SimpleAttr:
    """struct simple_attr: the per-open buffers and callbacks."""

    __slots__ = ("get", "set", "get_buf")

    def __init__(self, get: Getter, set: Setter | None) -> None:
        self.get = get
        self.set = set
        self.get_buf = b""


def simple_attribute_fops(get: Getter, set: Setter | None, fmt: str) -> SimpleAttrFops:
    """DEFINE_DEBUGFS_ATTRIBUTE(name, get, set, fmt) in one call."""
    return SimpleAttrFops(get, set, fmt)
