"""Snapshots: the whole debugfs tree read at one instant of host time, as plain files or one text archive.

The tree is read in-process, through the same file operations FUSE calls, while the guests' emulation is
held (kvmdbgfs.sched.emulation_held): no vCPU runs and no counter moves between the first file and the
last, so the top-level sums equal the per-VM files. Under a manual clock every VM first catches up with host
time, so the same scenario, seed and commands give the same bytes.

The archive (format ``kvmdbgfs-snapshot 1``), text a repository can commit and diff::

    kvmdbgfs-snapshot 1
    kernel: latest
    seed: 0
    clock: manual
    host_time_ns: 2071000000
    versions: kvmdbgfs 0.1.0; numpy 1.26.4; python 3.11.7
    entries: 3
                                         (an empty line ends the header)
    dir 0755 1043-12
    file 0444 3 1043-12/exits
    17
                                         (a newline after each file's bytes)
    error 0444 EIO 1043-12/vcpu0/...     (a file whose read failed, with the errno's name)

Entries are sorted by path ('/'-separated, relative to the tree's root) and carry their permission bits;
a file's line gives its size in bytes, and exactly that many bytes follow it. Nothing depends on when or
where the snapshot was taken (no timestamps, inode numbers or host names).
"""

from __future__ import annotations

import errno
import os
import platform
import shutil
import stat
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from kvmdbgfs.debugfs.dentry import Dentry, tree_lock
from kvmdbgfs.debugfs.file import vfs_open
from kvmdbgfs.scenario import build_host, load_scenario
from kvmdbgfs.sched import emulation_held
from kvmdbgfs.vmm.vmm import Vmm

FORMAT = "kvmdbgfs-snapshot 1"
HEADER_KEYS = ("kernel", "seed", "clock", "host_time_ns", "versions", "entries")
HOLD_TIMEOUT_S = 30.0  # how long a snapshot waits for the guests to pause, and for them to catch up
BOOT_TIMEOUT_S = 300.0  # a scenario of big guests boots for minutes on a busy machine
READ_CHUNK = 1 << 16


@dataclass(frozen=True)
class Entry:
    """One path of the tree: a directory, a file and its bytes, or a file whose read failed (``error``)."""

    path: str
    mode: int
    content: bytes | None = None
    error: str | None = None

    @property
    def kind(self) -> str:
        return "dir" if stat.S_ISDIR(self.mode) else "error" if self.error else "file"


@dataclass(frozen=True)
class Snapshot:
    header: dict[str, str]
    entries: list[Entry]

    def to_wire(self) -> dict[str, Any]:
        """As JSON for the control socket (bytes as latin-1 text, which maps each byte to one character)."""
        rows = [
            [entry.path, entry.mode, None if entry.content is None else entry.content.decode("latin-1"), entry.error]
            for entry in self.entries
        ]
        return {"header": self.header, "entries": rows}

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Snapshot:
        entries = [
            Entry(path, mode, None if content is None else content.encode("latin-1"), error)
            for path, mode, content, error in wire["entries"]
        ]
        return cls(dict(wire["header"]), entries)


def _read_file(dentry: Dentry) -> bytes:
    """open, read() to the end, release: what `cat` gets through the mount."""
    file = vfs_open(dentry, os.O_RDONLY)
    try:
        parts, offset = [], 0
        while chunk := file.f_op.read(file, READ_CHUNK, offset):
            parts.append(chunk)
            offset += len(chunk)
        return b"".join(parts)
    finally:
        file.f_op.release(file)


def read_tree(root: Dentry) -> list[Entry]:
    """Every directory and file below ``root``, sorted by path, files read in full."""
    entries: list[Entry] = []
    pending = [("", root)]
    while pending:
        prefix, directory = pending.pop()
        with tree_lock:
            children = list(directory.children.items())
        for name, child in children:
            path = prefix + name
            if child.is_dir:
                entries.append(Entry(path, child.mode))
                pending.append((path + "/", child))
                continue
            try:
                entries.append(Entry(path, child.mode, _read_file(child)))
            except OSError as exc:
                entries.append(Entry(path, child.mode, error=errno.errorcode.get(exc.errno or 0, "EIO")))
    return sorted(entries, key=lambda entry: entry.path)


def _versions() -> str:
    try:
        own = version("kvmdbgfs")
    except PackageNotFoundError:
        own = "unknown"
    return f"kvmdbgfs {own}; numpy {np.__version__}; python {platform.python_version()}"


def _busy(vm: dict[str, Any]) -> bool:
    """A VM running or queueing a workload: it will not wait for host time (the snapshot catches it mid-way)."""
    return bool(vm["workload"] or vm["queued"])


def _settle(vmm: Vmm, timeout: float) -> None:
    """Under a manual clock, wait (bounded) until every VM with no workload has run up to host time."""
    if not vmm.clock.manual:
        return
    deadline = time.monotonic() + timeout
    for vm in list(vmm.vms.values()):
        while not vm.caught_up(vm.host_target_ns()) and not _busy(vm.describe()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"VM {vm.name} did not reach host time within {timeout:g} s")
            vmm.clock.wake()
            time.sleep(0.001)


def scenario_host(scenario: str, kernel: str, timeout: float = BOOT_TIMEOUT_S) -> Vmm:
    """The scenario's host built in this process under a manual clock, once its guests have booted (ValueError
    with one line when the scenario is bad, a boot fails, or it takes longer than ``timeout`` seconds)."""
    vmm, boot = build_host(load_scenario(scenario), kernel, "manual")
    if not boot.wait(timeout) or boot.error is not None:
        vmm.shutdown()
        raise ValueError(boot.error or f"the scenario's guests did not boot within {timeout:g} s")
    return vmm


def take_snapshot(vmm: Vmm, timeout: float = HOLD_TIMEOUT_S) -> Snapshot:
    """The host's tree at one instant of host time: the guests are held while every file is read."""
    _settle(vmm, timeout)
    with emulation_held(timeout):
        host_time_ns = vmm.clock.now_ns()
        entries = read_tree(vmm.host.debugfs_dir)
    header = {
        "kernel": vmm.host.profile.name,
        "seed": str(vmm.host.seed),
        "clock": vmm.clock.mode,
        "host_time_ns": str(host_time_ns),
        "versions": _versions(),
        "entries": str(len(entries)),
    }
    return Snapshot(header, entries)


def format_archive(snapshot: Snapshot) -> bytes:
    """The snapshot as one archive (the format in this module's docstring)."""
    lines = [FORMAT.encode()]
    lines += [f"{key}: {snapshot.header[key]}".encode() for key in HEADER_KEYS]
    out = b"\n".join(lines) + b"\n\n"
    for entry in snapshot.entries:
        if "\n" in entry.path or " " in entry.path:
            raise ValueError(f"{entry.path!r}: a path with a space or a newline cannot be archived")
        mode = f"{stat.S_IMODE(entry.mode):04o}"
        if entry.kind == "file":
            assert entry.content is not None
            out += f"file {mode} {len(entry.content)} {entry.path}\n".encode() + entry.content + b"\n"
        else:
            out += f"{entry.kind} {mode}{' ' + entry.error if entry.error else ''} {entry.path}\n".encode()
    return out


def parse_archive(data: bytes) -> Snapshot:
    """An archive read back; ValueError with one line when it is not one."""
    head, sep, body = data.partition(b"\n\n")
    lines = head.decode().split("\n")
    if not sep or lines[0] != FORMAT:
        raise ValueError(f"not a {FORMAT} archive")
    header = dict(line.split(": ", 1) for line in lines[1:])
    entries, offset = [], 0
    while offset < len(body):
        end = body.index(b"\n", offset)
        kind, mode_text, *rest = body[offset:end].decode().split(" ")
        mode, offset = int(mode_text, 8), end + 1
        if kind == "dir":
            entries.append(Entry(rest[0], stat.S_IFDIR | mode))
        elif kind == "error":
            entries.append(Entry(rest[1], stat.S_IFREG | mode, error=rest[0]))
        elif kind == "file":
            size = int(rest[0])
            entries.append(Entry(rest[1], stat.S_IFREG | mode, body[offset : offset + size]))
            offset += size + 1
        else:
            raise ValueError(f"unknown archive entry {kind!r}")
    return Snapshot(header, entries)


def write_directory(snapshot: Snapshot, directory: Path) -> None:
    """The snapshot as plain files under ``directory`` (made if missing, which must be empty otherwise), with
    the tree's permission bits; files whose read failed are left out."""
    directory.mkdir(parents=True, exist_ok=True)
    if any(directory.iterdir()):
        raise ValueError(f"{directory}: not empty")
    for entry in snapshot.entries:
        target = directory / entry.path
        if entry.kind == "dir":
            target.mkdir()
        elif entry.kind == "file":
            assert entry.content is not None
            target.write_bytes(entry.content)
            target.chmod(stat.S_IMODE(entry.mode))


def replace_directory(snapshot: Snapshot, directory: Path) -> None:
    """Write the snapshot over an earlier one in ``directory`` (the snapshot fallback refreshes its tree)."""
    if directory.exists():
        shutil.rmtree(directory)
    write_directory(snapshot, directory)
