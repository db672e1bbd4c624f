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


def _fixup_radix(text: bytes, base: int) -> tuple[bytes, int]:
    """_parse_integer_fixup_radix(): base 0 is 16 for '0x' followed by a hex digit, 8 for any other leading
    '0' (which stays a digit), else 10; a '0x' prefix is skipped once in base 16."""
    if base == 0:
        if text[:1] == b"0":
            base = 16 if text[1:2].lower() == b"x" and len(text) > 2 and _digit(text[2]) < 16 else 8
        else:
            base = 10
    if base == 16 and text[:2].lower() == b"0x":
        text = text[2:]
    return text, base


def _digit(c: int) -> int:
    """The value of one ASCII digit or letter a-f in any base up to 16; 16 for anything else."""
    if 0x30 <= c <= 0x39:
        return c - 0x30
    lower = c | 0x20
    return lower - 0x61 + 10 if 0x61 <= lower <= 0x66 else 16


def kstrtoull(text: bytes, base: int = 0) -> int:
    """kstrtoull() on a C string (lib/kstrtox.c): an optional '+', the radix prefix, digits of that base only,
    one optional newline, then the end (a NUL ends the string); EINVAL without a digit or with anything
    left over, ERANGE past U64_MAX (checked first)."""
    text = text.split(b"\0", 1)[0]
    if text[:1] == b"+":
        text = text[1:]
    text, base = _fixup_radix(text, base)
    value = parsed = 0
    for c in text:
        digit = _digit(c)
        if digit >= base:
            break
        value = value * base + digit
        parsed += 1
    if value > U64_MAX:
        raise kernel_error(ERANGE)
    rest = text[parsed:]
    if parsed == 0 or rest not in (b"", b"\n"):
        raise kernel_error(EINVAL)
    return value


class SimpleAttrFops(FileOperations):
    """DEFINE_SIMPLE_ATTRIBUTE(get, set, fmt): simple_attr_open/read/write/release.

    The text is generated when a read starts at offset 0, or at any offset
    while nothing has been generated yet (a fresh open read with pread), and
    kept for the following reads of the same open, as simple_attr_read does.
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
            if offset == 0 or not attr.get_buf:
                attr.get_buf = format_u64(self.fmt, attr.get(file.data)).encode()
            return read_from_buffer(attr.get_buf, size, offset)

    def write(self, file: File, data: bytes, offset: int) -> int:
        attr: _SimpleAttr = file.private_data
        if attr.set is None:
            raise kernel_error(EACCES)
        with file.lock:
            value = kstrtoull(data[: SET_BUF_SIZE - 1])  # set_buf is NUL-terminated after what was copied
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
