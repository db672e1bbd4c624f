"""A test tree served through the project's FUSE adapter (kvmdbgfs.fuse), run as a subprocess:

    python tests/fuse_tree_server.py MOUNTPOINT READERS

``barrier/file<N>`` (N < READERS): a single_open file whose generation waits for all READERS generations to
be under way (a READERS-party barrier, 30 s bound), so they are all served only if the loop serves READERS
requests at once. ``broken``: a file whose generation fails with a bug (RuntimeError). ``ready``: "ready\\n".
``counter``: how many times it has been generated ("1\\n", "2\\n", ...).
"""

from __future__ import annotations

import itertools
import sys
import threading

from kvmdbgfs.debugfs.dentry import create_dir, create_file, new_root
from kvmdbgfs.debugfs.seq_file import single_open_fops
from kvmdbgfs.fuse import DebugfsOperations, serve

BARRIER_TIMEOUT_S = 30.0
BUG_MESSAGE = "a deliberate bug in a show() function"


def _broken(_data: object) -> str:
    raise RuntimeError(BUG_MESSAGE)


def main(mountpoint: str, readers: int) -> None:
    barrier = threading.Barrier(readers, timeout=BARRIER_TIMEOUT_S)

    def show(index: int) -> str:
        barrier.wait()
        return f"served {index}\n"

    root = new_root()
    directory = create_dir("barrier", root)
    for index in range(readers):
        create_file(f"file{index}", 0o444, directory, index, single_open_fops(show))
    create_file("broken", 0o444, root, None, single_open_fops(_broken))
    create_file("ready", 0o444, root, None, single_open_fops(lambda _data: "ready\n"))
    generations = itertools.count(1)
    create_file("counter", 0o444, root, None, single_open_fops(lambda _data: f"{next(generations)}\n"))
    serve(DebugfsOperations(root), mountpoint)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
