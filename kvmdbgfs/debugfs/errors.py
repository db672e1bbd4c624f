"""Kernel-style errors: a file operation fails by raising OSError with the errno it would return."""

import errno
import os


def kernel_error(code: int) -> OSError:
    """The exception a file operation raises where the kernel returns ``-code``."""
    return OSError(code, os.strerror(code))


ENOENT = errno.ENOENT
EACCES = errno.EACCES
EINVAL = errno.EINVAL
EPERM = errno.EPERM
ERANGE = errno.ERANGE
EISDIR = errno.EISDIR
ENOTDIR = errno.ENOTDIR
EEXIST = errno.EEXIST
EBADF = errno.EBADF
EIO = errno.EIO
